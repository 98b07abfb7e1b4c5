#!/usr/bin/env bash
# Packs what a GPU stage produced (records, run reports, logs; no weights) into $1 (a .tgz),
# so the device tool can bring it back in one file.
set -uo pipefail
cd "$(dirname "$0")/.."
tar -czf "$1" --exclude='*.pt' --exclude='*.onnx' --exclude='*.engine' --exclude='*.cache' \
    bench/results $(ls -d runs/train runs/qat runs/val logs 2>/dev/null) 2>/dev/null
ls -la "$1"
