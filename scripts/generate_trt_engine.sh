#!/usr/bin/env bash
# Build a TensorRT engine from an exported ONNX with trtexec: INT8+FP16 (the Q/DQ nodes decide what
# runs in INT8), a dynamic-batch optimisation profile and a timing cache beside the engine so that
# rebuilds are fast. The ONNX must come from `export_qat.py --dynamic` unless min=opt=max.
#
#   scripts/generate_trt_engine.sh model.onnx [--imgsz 640] [--min-batch 1] [--opt-batch 8]
#       [--max-batch 32] [--input images] [--engine model.engine] [--fp16-only] [--workspace-mib N]
#
# --fp16-only: for an FP (no Q/DQ) ONNX; with --int8 and no Q/DQ trtexec would use dummy scales.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[ "$#" -ge 1 ] || usage
onnx="$1"; shift
imgsz=640; min_b=1; opt_b=8; max_b=32; input=images; engine=""; precision="--fp16 --int8"; workspace=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --imgsz) imgsz="$2"; shift 2 ;;
    --min-batch) min_b="$2"; shift 2 ;;
    --opt-batch) opt_b="$2"; shift 2 ;;
    --max-batch) max_b="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --engine) engine="$2"; shift 2 ;;
    --fp16-only) precision="--fp16"; shift ;;
    --workspace-mib) workspace="--memPoolSize=workspace:${2}MiB"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
[ -f "$onnx" ] || { echo "error: $onnx: ONNX file not found" >&2; exit 2; }
if ! { [ "$min_b" -le "$opt_b" ] && [ "$opt_b" -le "$max_b" ]; }; then
  echo "error: need --min-batch <= --opt-batch <= --max-batch (got $min_b, $opt_b, $max_b)" >&2; exit 2
fi
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] || { echo "error: trtexec not found (install TensorRT 10 or set TRTEXEC=/path/to/trtexec)" >&2; exit 2; }

engine="${engine:-${onnx%.*}.engine}"
shape() { echo "${input}:${1}x3x${imgsz}x${imgsz}"; }
# shellcheck disable=SC2086  # $precision and $workspace are lists of flags on purpose
"$TRTEXEC" --onnx="$onnx" --saveEngine="$engine" $precision $workspace \
  --minShapes="$(shape "$min_b")" --optShapes="$(shape "$opt_b")" --maxShapes="$(shape "$max_b")" \
  --timingCacheFile="${engine%.*}.timing.cache" --skipInference 2>&1 | tee "${engine%.*}.build.log"
echo "engine: $engine (batch ${min_b}..${max_b}, opt ${opt_b}, ${imgsz}x${imgsz}); log: ${engine%.*}.build.log"
