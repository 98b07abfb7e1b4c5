#!/usr/bin/env bash
# Time an exported ONNX with trtexec at several batch sizes and write the same table, JSON and
# plot as `val_trt.py --benchmark` (via tools/trtexec_report.py). Each batch size gets an engine
# built for it (min 1, opt = max = batch; a shared timing cache keeps rebuilds short), or with
# --one-engine a single dynamic engine up to the largest batch. Timing runs use CUDA graphs, no
# host<->device copies and spin-wait, so the numbers are the engine's own GPU time per call.
#
#   scripts/benchmark_trt.sh model.onnx [--imgsz 640] [--batch-sizes "1 4 8 12 16 32"] [--out DIR]
#       [--fp16-only] [--one-engine] [--warmup-ms 500] [--duration-s 10] [--input images]
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[ "$#" -ge 1 ] || usage
onnx="$1"; shift
imgsz=640; batches="1 4 8 12 16 32"; out=""; precision="--fp16 --int8"; one_engine=false
warmup=500; duration=10; input=images
while [ "$#" -gt 0 ]; do
  case "$1" in
    --imgsz) imgsz="$2"; shift 2 ;;
    --batch-sizes) batches="${2//,/ }"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fp16-only) precision="--fp16"; shift ;;
    --one-engine) one_engine=true; shift ;;
    --warmup-ms) warmup="$2"; shift 2 ;;
    --duration-s) duration="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
[ -f "$onnx" ] || { echo "error: $onnx: ONNX file not found" >&2; exit 2; }
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] || { echo "error: trtexec not found (install TensorRT 10 or set TRTEXEC=/path/to/trtexec)" >&2; exit 2; }

name="$(basename "${onnx%.*}")"
out="${out:-runs/benchmark/${name}}"
mkdir -p "$out"
cache="$out/${name}.timing.cache"
timing_flags=(--useCudaGraph --noDataTransfers --useSpinWait "--warmUp=$warmup" "--duration=$duration")
shape() { echo "${input}:${1}x3x${imgsz}x${imgsz}"; }
max_b=$(echo "$batches" | tr ' ' '\n' | sort -n | tail -1)

if $one_engine; then
  engine="$out/${name}.engine"
  # shellcheck disable=SC2086
  "$TRTEXEC" --onnx="$onnx" --saveEngine="$engine" $precision --timingCacheFile="$cache" --skipInference \
    --minShapes="$(shape 1)" --optShapes="$(shape "$max_b")" --maxShapes="$(shape "$max_b")" > "$out/build.log" 2>&1 \
    || { echo "error: engine build failed, see $out/build.log" >&2; exit 1; }
fi
logs=()
for b in $batches; do
  log="$out/trtexec_bs${b}.log"
  echo "batch $b -> $log"
  if $one_engine; then
    "$TRTEXEC" --loadEngine="$engine" --shapes="$(shape "$b")" "${timing_flags[@]}" > "$log" 2>&1 \
      || { echo "error: trtexec failed at batch $b, see $log" >&2; exit 1; }
  else
    # shellcheck disable=SC2086
    "$TRTEXEC" --onnx="$onnx" $precision --timingCacheFile="$cache" --saveEngine="$out/${name}_bs${b}.engine" \
      --minShapes="$(shape 1)" --optShapes="$(shape "$b")" --maxShapes="$(shape "$b")" --shapes="$(shape "$b")" \
      "${timing_flags[@]}" > "$log" 2>&1 || { echo "error: trtexec failed at batch $b, see $log" >&2; exit 1; }
  fi
  logs+=("$log")
done
python3 tools/trtexec_report.py "${logs[@]}" --out "$out" --stem trtexec_benchmark \
  --title "$name $([ "$precision" = "--fp16" ] && echo FP16 || echo INT8+FP16), ${imgsz}x${imgsz}"
