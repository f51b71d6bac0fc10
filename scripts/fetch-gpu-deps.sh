#!/usr/bin/env bash
# Run on a machine with apt (this project's development machines), before sending the tree to a GPU
# machine that has nvcc and CMake but no apt and no internet: downloads the Debian packages the
# GPU build needs (Catch2 v2, Google Benchmark) and unpacks them with `dpkg -x` into .deps/root
# (ignored by git). scripts/gpu-check.sh finds them there. With the device tool: carry [".deps"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs .deps/root
(cd .deps/debs && apt-get download catch2 libbenchmark-dev libbenchmark1debian)
for deb in .deps/debs/*.deb; do dpkg -x "$deb" .deps/root; done
echo "unpacked into .deps/root: $(ls .deps/debs | tr '\n' ' ')"
