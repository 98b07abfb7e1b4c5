#!/usr/bin/env bash
# The BCCD study of BENCHMARKS.md, in stages that each fit one 10-minute GPU command:
#
#   bench/study_bccd.sh train MODEL GPU EPOCHS   train MODEL from scratch on BCCD (train split)
#   bench/study_bccd.sh qat   MODEL GPU          PTQ (every calibration method) + QAT + ORT check
#   bench/study_bccd.sh speed                    training / validation throughput, DDP speed-up
#
# DATA (default .data/bccd/bccd_device.yaml) is the yaml tools/voc2yolo.py wrote, with a path
# the GPU machine can read. Every figure lands in bench/results/ through the bench scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/bccd/bccd_device.yaml}
IMGSZ=${IMGSZ:-640}
WORKERS=${WORKERS:-7}
stage=$1
shift

case "$stage" in
train)
  model=$1 gpu=$2 epochs=$3
  python3 train.py --cfg "$model.yaml" --data "$DATA" --hyp data/hyps/hyp.bccd.yaml --optimizer AdamW \
      --epochs "$epochs" --batch-size 32 --imgsz "$IMGSZ" --workers "$WORKERS" --cache ram \
      --close-mosaic 20 --device "$gpu" --project runs/train --name "bccd-$model" --exist-ok
  if [ "$model" = gelan-s ]; then  # the issue's headline record is the gelan-s run
    python3 bench/bench_train.py bccd --run "runs/train/bccd-$model" --data "$DATA" --imgsz "$IMGSZ" --device "$gpu"
  fi
  ;;
qat)
  model=$1 gpu=$2
  weights=runs/train/bccd-$model/weights/best.pt
  python3 bench/bench_qat.py --weights "$weights" --data "$DATA" --model "$model" --imgsz "$IMGSZ" \
      --batch-size 16 --epochs "${QAT_EPOCHS:-5}" --iters "${QAT_ITERS:-100}" --calib-batches 16 \
      --task test --device "$gpu" --workers "$WORKERS"
  # ORT on the CPU runs the exported Q/DQ graph; the record is named after the checkpoint's stem.
  cp "runs/qat/bench-$model/weights/qat_best.pt" "runs/qat/bench-$model/weights/$model.pt"
  python3 bench/bench_ort.py map --weights "runs/qat/bench-$model/weights/$model.pt" --data "$DATA" \
      --task test --imgsz "$IMGSZ" --device "$gpu" --out "runs/qat/bench-$model/onnx"
  ;;
speed)
  python3 bench/bench_train.py throughput --cfg gelan-c.yaml --data "$DATA" --imgsz 640 --batch-size 32 \
      --workers 14 --device 0
  python3 bench/bench_eval.py --throughput --cfg models/detect/gelan-c.yaml --data "$DATA" --batch-size 32 \
      --imgsz 640 --half --device 0 --workers 14
  python3 bench/bench_train.py ddp --cfg gelan-c.yaml --data "$DATA" --batch-size 32 --workers 14 \
      --warmup 5 --iters 30
  ;;
*)
  echo "usage: bench/study_bccd.sh train|qat|speed ..." >&2
  exit 2
  ;;
esac
