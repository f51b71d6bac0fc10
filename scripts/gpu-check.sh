#!/usr/bin/env bash
# One-call GPU check, for a fresh GPU machine with nvcc, CMake and no internet (fits one 10-minute
# device call including the build): builds the CUDA tests and benchmarks for this GPU only, runs
# the gpu-labelled tests (then under compute-sanitizer memcheck when it is installed), runs the
# CUDA benchmarks, and prints one screen: op, shape, dtype, time, GB/s, % of the device copy
# bandwidth measured in the same run, and TFLOP/s where a benchmark counts flops (prefill).
#
# Catch2 and Google Benchmark: installed system-wide, or unpacked into .deps/root by
# scripts/fetch-gpu-deps.sh on a machine with apt, and carried along with the tree.
# Output: $OUT (when set, e.g. by the device tool) or build-gpu/out: test log, bench JSON, summary.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-gpu/out}
mkdir -p "$out"
deps=$(pwd)/.deps/root
prefix="$deps/usr;$deps/usr/lib/x86_64-linux-gnu/cmake"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
jobs=$(nproc)

gpu=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -n 1)
arch=$(echo "$gpu" | awk -F', ' '{gsub(/\./, "", $2); print $2}')
echo "GPU: $gpu (sm_$arch); $(nvcc --version | tail -n 1)"

cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DRECURFORMER_ENABLE_CUDA=ON -DRECURFORMER_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$prefix" \
  > "$out/configure.log"
targets=$(cd tests && ls *_test.cu | sed 's/\.cu$/_gpu/' | tr '\n' ' ')
time cmake --build build-gpu -j"$jobs" --target $targets recurformer-bench-cuda > "$out/build.log" 2>&1 ||
  { tail -n 40 "$out/build.log"; exit 1; }

status=0
ctest --test-dir build-gpu -L gpu --output-on-failure 2>&1 | tee "$out/tests.log" || status=1
if command -v compute-sanitizer > /dev/null; then
  # Each under a time limit, so one slow run (memcheck costs 10-100x) cannot eat the device call.
  for t in $targets; do
    rc=0
    timeout "${MEMCHECK_SECONDS:-120}" compute-sanitizer --tool memcheck --error-exitcode 9 "build-gpu/bin/$t" \
      > "$out/memcheck-$t.log" 2>&1 || rc=$?
    case $rc in
      0) echo "memcheck $t: clean" ;;
      124) echo "memcheck $t: timed out after ${MEMCHECK_SECONDS:-120} s (see $out/memcheck-$t.log)" ;;
      *) echo "memcheck $t: FAILED (see $out/memcheck-$t.log)"; status=1 ;;
    esac
  done
fi

build-gpu/bin/recurformer-bench-cuda --benchmark_out="$out/bench.json" --benchmark_out_format=json \
  --benchmark_min_time=0.2 > "$out/bench.log" 2>&1 || { tail -n 20 "$out/bench.log"; status=1; }
python3 - "$out/bench.json" "$gpu" <<'PY' | tee "$out/summary.txt"
import json, sys
runs = [b for b in json.load(open(sys.argv[1]))["benchmarks"] if b.get("run_type") != "aggregate"]
copy = max((b["bytes/s"] for b in runs if b["name"].startswith("BM_DeviceCopy")), default=0)
print(f"{sys.argv[2]}: device copy {copy / 1e9:.0f} GB/s (read + write)")
print(f"{'op':<28} {'shape':<34} {'dtype':<9} {'time':>10} {'GB/s':>8} {'% copy':>7} {'TFLOP/s':>8}")
for b in runs:
    name = b["name"].split("/")
    op, dtype = name[0].removeprefix("BM_"), ""
    if "<" in op: op, dtype = op.split("<")[0], op.split("<")[1].rstrip(">")
    t = f"{b['real_time']:.3f} {b['time_unit']}"
    gbs = b.get("bytes/s", 0) / 1e9
    pct = 100 * b.get("bytes/s", 0) / copy if copy else 0
    tflops = f"{b['flop/s'] / 1e12:8.1f}" if "flop/s" in b else ""  # compute-bound runs (prefill)
    print(f"{op:<28} {'/'.join(name[1:]).replace('/manual_time', ''):<34} {dtype:<9} {t:>10} {gbs:>8.0f} {pct:>6.0f}% {tflops}")
PY
exit $status
