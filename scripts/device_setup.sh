#!/usr/bin/env bash
# Prepares a bare GPU machine of the device tool for our benchmarks (see BENCHMARKS.md): installs
# the carried wheels (.whl) into /tmp/site. Nothing is compiled: the fake quantization runs on
# PyTorch's own kernels (models/fake_quant.py), so Model Optimizer's CUDA extension is never built.
# Source it:  source scripts/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
