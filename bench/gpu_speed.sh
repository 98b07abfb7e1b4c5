#!/usr/bin/env bash
# Issue 15, goals 1-3, on one x2 H200 machine (2 GPUs, 32 CPU cores) in one device command:
#
#   source scripts/device_setup.sh && bash bench/gpu_speed.sh
#
# Two lanes run at the same time, each on one GPU (CUDA_VISIBLE_DEVICES) and pinned to its own
# half of the CPU cores (taskset), so each lane is the 1-GPU, 16-core machine the goals name and
# neither lane's loader workers or compiler threads take the other's cores:
#   lane A (GPU 0): a short FP32 training of gelan-s (the checkpoint time-to-best starts from; not
#                   timed), then qat_time_to_best_fresh_gelan-s (bench/bench_time_to_int8.py), then
#                   train_throughput_gelan-c at 640, batch 32, augmenting loader (bench_train.py).
#   lane B (GPU 1): qat_step_time_ratio_gelan-s, then _gelan-c (bench/bench_qat_step.py: FP32 and
#                   QAT steps side by side, eager and compiled).
# Then both GPUs: DDP gelan-c on two GPUs against lane A's one-GPU record (the same settings; 16
# cores per GPU in both), ddp_speedup_2gpu and ddp_per_gpu_throughput_ratio_2gpu.
#
# Fresh: bench_time_to_int8.py runs `qat.py quantize` as a new process with empty folders for every
# kernel cache (TORCH_EXTENSIONS_DIR, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH)
# and a copy of the data without label caches, and its record says whether a CUDA extension was
# built there. Nothing earlier in lane A compiles anything (train.py runs eagerly). The OS file
# cache is not dropped.
#
# Every stage has a time limit (a stage past it is stopped; the records already written stay: the
# step benches write the eager ratio before compiling), and each lane's last stage gets what is
# left of the lane's LANE_SECONDS, so the whole script ends within about LANE_SECONDS + DDP_SECONDS
# (default 330 + 90 s) plus 20 s of grace per stopped stage. Records and one log land in SPEED_OUT (default
# bench/results/gpu_speed; 6 records + gpu_speed.log). DATA (default .data/bccd/bccd.yaml) is BCCD
# in YOLO form with real image files (the device cannot follow links into /work/shared) and a
# `path` relative to the repository root, carried as .data/bccd:
#   python tools/voc2yolo.py --voc ../shared/datasets/bccd/BCCD --out /tmp/bccd && mkdir -p .data &&
#   cp -rL /tmp/bccd .data/bccd && sed 's#^path: .*#path: .data/bccd#' /tmp/bccd/data.yaml >.data/bccd/bccd.yaml
#
# SPEED_DRY=1: the same stages on this CPU at toy size (tiny config, 64 px, one epoch, aot_eager
# instead of Inductor, gloo instead of NCCL), records in a temporary folder unless SPEED_OUT is set.
set -uo pipefail  # not -e: a stage that fails leaves the others running and their records written
cd "$(dirname "$0")/.."
# NVLink multicast stays off (the device machines' rule: it can take shared GPUs out of service);
# every child process inherits these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
DATA=${DATA:-.data/bccd/bccd.yaml}
DRY=${SPEED_DRY:-0}
if [ "$DRY" = 1 ]; then
  OUT_DIR=${SPEED_OUT:-$(mktemp -d /tmp/gpu_speed_dry.XXXXXX)}
  LANE_SECONDS=${LANE_SECONDS:-1500} DDP_SECONDS=${DDP_SECONDS:-400}  # 2 shared cores
  S_CFG=tests/assets/gelan-tiny.yaml C_CFG=tests/assets/gelan-tiny.yaml S_NAME=tiny-as-s C_NAME=tiny-as-c
  DEVICE=cpu IMGSZ=64 FP32_EPOCHS=1 WORKERS=1 AMP=off BACKEND=(--backend aot_eager)
  TTB=(--imgsz 64 --batch-size 4 --epochs 1 --iters 2 --calib-batches 2)
  STEP=(--imgsz 64 --batch-size 2 --iters 2 --repeats 1)
  TPUT=(--imgsz 64 --batch-size 4 --warmup 1 --iters 3)
else
  OUT_DIR=${SPEED_OUT:-bench/results/gpu_speed}
  LANE_SECONDS=${LANE_SECONDS:-330} DDP_SECONDS=${DDP_SECONDS:-90}
  S_CFG=gelan-s.yaml C_CFG=gelan-c.yaml S_NAME=gelan-s C_NAME=gelan-c
  DEVICE=0 IMGSZ=640 FP32_EPOCHS=${FP32_EPOCHS:-30} WORKERS=14 AMP=bf16 BACKEND=()
  TTB=(--imgsz 640 --batch-size 16 --epochs 4 --iters 80 --calib-batches 16)  # as the H100 record before
  STEP=(--imgsz 640 --batch-size 16 --iters 20 --repeats 2)
  TPUT=(--imgsz 640 --batch-size 32 --warmup 10 --iters 50)
fi
mkdir -p "$OUT_DIR"
if compgen -G "$OUT_DIR/*.json" >/dev/null; then  # DDP reads lane A's record: none may be left from before
  echo "gpu_speed.sh: $OUT_DIR already holds records; empty it or name another SPEED_OUT" >&2
  exit 2
fi
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_speed.log
RUNS=$(mktemp -d /tmp/gpu_speed_runs.XXXXXX)
cores=$(nproc --all)
half=$(( cores / 2 ))
LANE_A_CORES=0-$(( half - 1 )) LANE_B_CORES=$half-$(( cores - 1 ))
PIN_A=(taskset -c "$LANE_A_CORES") PIN_B=(taskset -c "$LANE_B_CORES")
command -v taskset >/dev/null || PIN_A=() PIN_B=()  # unpinned: the log's first lines say so
TPUT_RECORD=$OUT_DIR/train_throughput_$(basename "$C_CFG" .yaml).json

# stage NAME SECONDS COMMAND...: run one bench under a time limit, say how it ended
stage() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*"
  timeout -s INT -k 20 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(( SECONDS - start )) s$([ $rc = 124 ] && echo " (stopped at its $limit s limit)")"
  return $rc
}

# what is left of this lane's LANE_SECONDS (a lane runs in its own bash, whose SECONDS start at 0)
left() { echo $(( LANE_SECONDS - SECONDS > 10 ? LANE_SECONDS - SECONDS : 10 )); }

lane_a() {
  export CUDA_VISIBLE_DEVICES=0
  stage fp32-train-$S_NAME $(( LANE_SECONDS * 32 / 100 )) python3 train.py --cfg "$S_CFG" --data "$DATA" \
    --hyp data/hyps/hyp.bccd.yaml --optimizer AdamW --epochs "$FP32_EPOCHS" --batch-size 32 --imgsz "$IMGSZ" \
    --workers "$WORKERS" --cache ram --device "$DEVICE" --project "$RUNS" --name fp32 --exist-ok
  # a run stopped at its limit leaves best.pt of the last finished epoch (train.py writes it each epoch)
  stage time-to-best-$S_NAME $(( LANE_SECONDS * 40 / 100 )) python3 bench/bench_time_to_int8.py \
    --weights "$RUNS/fp32/weights/best.pt" --data "$DATA" --model "$S_NAME" "${TTB[@]}" --device "$DEVICE" \
    --workers "$WORKERS" --results-dir "$OUT_DIR"
  stage throughput-$C_NAME "$(left)" python3 bench/bench_train.py throughput --cfg "$C_CFG" \
    --data "$DATA" "${TPUT[@]}" --workers "$WORKERS" --amp "$AMP" --cache --device "$DEVICE" \
    --results-dir "$OUT_DIR"
}

lane_b() {
  export CUDA_VISIBLE_DEVICES=1
  stage qat-step-$S_NAME $(( LANE_SECONDS * 40 / 100 )) python3 bench/bench_qat_step.py --cfg "$S_CFG" \
    --model "$S_NAME" --data "$DATA" "${STEP[@]}" --workers 4 --device "$DEVICE" "${BACKEND[@]}" --results-dir "$OUT_DIR"
  stage qat-step-$C_NAME "$(left)" python3 bench/bench_qat_step.py --cfg "$C_CFG" \
    --model "$C_NAME" --data "$DATA" "${STEP[@]}" --workers 4 --device "$DEVICE" \
    "${BACKEND[@]}" --results-dir "$OUT_DIR"
}

{
  echo "gpu_speed.sh $(date -u +%FT%TZ) dry=$DRY data=$DATA out=$OUT_DIR cores=$cores"
  echo "lane A: ${PIN_A[*]:-unpinned (no taskset)}; lane B: ${PIN_B[*]:-unpinned (no taskset)}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$LOG" 2>&1
start=$SECONDS
# Job control: without it the lanes, started with &, and all they run would ignore SIGINT, and a
# stage past its limit could not stop as Ctrl-C stops it (train.py then finishes its checkpoint).
set -m
"${PIN_A[@]}" bash -c "$(declare -f stage left lane_a); $(declare -p DATA DEVICE IMGSZ FP32_EPOCHS WORKERS \
  AMP S_CFG C_CFG S_NAME C_NAME TTB TPUT RUNS OUT_DIR LANE_SECONDS); lane_a" >"$RUNS/lane_a.log" 2>&1 &
pid_a=$!
"${PIN_B[@]}" bash -c "$(declare -f stage left lane_b); $(declare -p DATA DEVICE S_CFG C_CFG S_NAME C_NAME STEP \
  BACKEND OUT_DIR LANE_SECONDS); lane_b" >"$RUNS/lane_b.log" 2>&1 &
pid_b=$!
wait "$pid_a" "$pid_b"
echo "lanes done after $(( SECONDS - start )) s" >>"$LOG"
if [ -f "$TPUT_RECORD" ]; then
  stage ddp-$C_NAME "$DDP_SECONDS" python3 bench/bench_train.py ddp --cfg "$C_CFG" --data "$DATA" "${TPUT[@]}" \
    --workers "$WORKERS" --amp "$AMP" --cache --device "$DEVICE" --one-gpu-record "$TPUT_RECORD" \
    --results-dir "$OUT_DIR" >"$RUNS/ddp.log" 2>&1
else
  echo "no one-GPU throughput record: DDP not run" >"$RUNS/ddp.log"
fi
for part in lane_a lane_b ddp; do
  printf '\n######## %s\n' "$part" >>"$LOG"
  tr '\r' '\n' <"$RUNS/$part.log" | grep -v '^\s*$' >>"$LOG"  # progress bars redraw with \r
done
echo "total $(( SECONDS - start )) s; records:" | tee -a "$LOG"
ls "$OUT_DIR" | tee -a "$LOG"
grep '^== ' "$LOG"
rm -rf "$RUNS"
