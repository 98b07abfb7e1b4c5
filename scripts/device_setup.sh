#!/usr/bin/env bash
# Prepares a bare GPU machine of the device tool for our benchmarks (see BENCHMARKS.md):
# installs the carried wheels (.whl) into /tmp/site and points modelopt at a prebuilt CUDA
# extension (.ext) when one was carried, so no run pays the 60 s compile again (loading it took
# 0.1 s on a fresh H100 machine, 2026-11-25).
# Source it:  source scripts/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ -d .ext/torch_extensions ]; then
  # ninja rebuilds when an output's mtime differs from what its logs recorded (so copy with -a,
  # and never over a build made on this machine) or when a source is newer than the output (pip
  # just wrote the kernel sources, so date them back).
  [ -e /tmp/torch_extensions ] || cp -a .ext/torch_extensions /tmp/torch_extensions
  find /tmp/site/modelopt -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) \
      -exec touch -d '2000-01-01' {} +
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
