#!/usr/bin/env bash
# Run on a machine with apt (this project's development machines), before sending the tree to a GPU
# machine that has nvcc and CMake but no apt and no internet: downloads the Debian packages the
# GPU build needs (Catch2 v2, Google Benchmark) and unpacks them with `dpkg -x` into .deps/root
# (ignored by git). scripts/gpu-check.sh finds them there. With the device tool: carry [".deps"].
# Checks what it unpacked (Catch2's header, Benchmark's CMake package and library) and prints the
# newest glibc / libstdc++ symbol versions the library needs: a GPU machine with an older glibc
# cannot link the benchmarks (gpu-check.sh then still runs the tests, which need only Catch2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs .deps/root
(cd .deps/debs && apt-get download catch2 libbenchmark-dev libbenchmark1debian)
for deb in .deps/debs/*.deb; do dpkg -x "$deb" .deps/root; done
root=.deps/root/usr
missing=0
for f in include/catch2/catch.hpp lib/x86_64-linux-gnu/cmake/benchmark/benchmarkConfig.cmake; do
  [ -f "$root/$f" ] || { echo "fetch-gpu-deps: $root/$f is missing from the unpacked packages" >&2; missing=1; }
done
lib=$(ls "$root"/lib/x86_64-linux-gnu/libbenchmark.so.* 2>/dev/null | head -n 1 || true)
[ -n "$lib" ] || { echo "fetch-gpu-deps: no libbenchmark.so.* under $root/lib/x86_64-linux-gnu" >&2; missing=1; }
[ "$missing" = 0 ] || exit 1
echo "unpacked into .deps/root: $(ls .deps/debs | tr '\n' ' ')"
if command -v objdump > /dev/null; then
  need() { objdump -T "$lib" | grep -o "$1_[0-9.]*" | sort -uV | tail -n 1; }
  echo "$(basename "$lib") needs $(need GLIBC) and $(need GLIBCXX) (this machine: $(ldd --version | head -n 1))"
fi
