#!/usr/bin/env bash
# Install the TensorRT 10 API stubs that tests/test_trt_api.py checks utils/trt_runtime.py against,
# one folder per pinned release (tests/data/tensorrt_stubs_versions.txt) under .trt-stubs/.
#
#   scripts/install_trt_stubs.sh
#
# --no-deps: the stubs depend on `tensorrt`, whose PyPI package downloads the real wheels from
# NVIDIA's index. --target: the stubs ship a `tensorrt/` folder holding only .pyi files, which in
# site-packages would make `import tensorrt` succeed as an empty namespace package, so every
# "is TensorRT installed?" check (ours, Model Optimizer's) would wrongly answer yes.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tests/data/tensorrt_stubs_versions.txt)
for version in $versions; do
  target=".trt-stubs/$version"
  if [ -f "$target/tensorrt_stubs-$version.dist-info/METADATA" ]; then
    continue
  fi
  rm -rf "$target"
  python3 -m pip install -q --no-deps --no-compile --target "$target" "tensorrt-stubs==$version"
done
echo "tensorrt-stubs installed: $(echo $versions) in .trt-stubs/"
