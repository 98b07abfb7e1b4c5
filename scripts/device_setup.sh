#!/usr/bin/env bash
# Prepares a bare GPU machine of the device tool for our benchmarks (see BENCHMARKS.md): installs
# the carried wheels (.whl) into /tmp/site. Nothing is compiled: the fake quantization runs on
# PyTorch's own kernels (models/fake_quant.py), so Model Optimizer's CUDA extension is never built.
# Source it:  source scripts/device_setup.sh
# Once per machine: on a warm machine (2026-11-30, H200 x2) a second `--upgrade` install over the
# first left /tmp/site without modelopt for child processes; a fresh target folder worked.
if [ ! -f /tmp/site/.installed ]; then
  rm -rf /tmp/site
  # bytecode compiled at install, as pip does for a user: otherwise the first import of Model Optimizer
  # compiles its sources, and the first timed run on a machine pays for it
  python3 -m pip install -q --no-index --no-deps --no-cache-dir \
      --target /tmp/site .whl/*.whl || return 1
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
