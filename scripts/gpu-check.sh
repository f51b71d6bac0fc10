#!/usr/bin/env bash
# The first-run protocol on a GPU machine (nvcc and CMake, no apt, no internet), in one call of at
# most 9 minutes on a 16-core machine (BUDGET seconds, default 540, counted from the start with
# $SECONDS; each stage gets what is left):
#   1. the machine: card, driver, nvcc, gcc, glibc -> machine.txt; no GPU visible fails here;
#   2. build the GPU tests only, for this card, and run them with RECURFORMER_REQUIRE_GPU=1: a test
#      that would skip fails instead, and a run where ctest reports anything skipped or not run fails,
#      so a broken driver cannot read as green;
#   3. compute-sanitizer memcheck on the two riskiest binaries (the hybrid layer, the scan), each
#      capped at MEMCHECK_SECONDS (default 60) and at what the budget has left;
#   4. build the CUDA benchmarks separately (a link failure there, e.g. the Debian libbenchmark
#      needing a newer glibc than the machine's, is reported and does not hide the test results)
#      and run a focused set (BENCH_FILTER) for what time is left; one screen of op, shape, dtype,
#      time, GB/s, % of the device copy bandwidth measured in the same run, TFLOP/s for prefill.
#
# Catch2 and Google Benchmark: installed system-wide, or unpacked into .deps/root by
# scripts/fetch-gpu-deps.sh on a machine with apt and carried along with the tree (the device tool:
# carry [".deps"]). Run: `bash scripts/gpu-check.sh` (the device tool: timeout_s 600).
# Output: $OUT (when set, e.g. by the device tool) or build-gpu/out: every log, bench JSON, summary.
# Exit status: 0 only when the tests ran on the GPU and passed and memcheck found nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${BUDGET:-540}
out=${OUT:-build-gpu/out}
mkdir -p "$out"
deps=$(pwd)/.deps/root
prefix="$deps/usr;$deps/usr/lib/x86_64-linux-gnu/cmake"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
jobs=$(nproc)
status=0
left() { local l=$((budget - SECONDS)); echo $((l > 1 ? l : 1)); }  # >= 1: `timeout 0` would mean no limit
stage() { printf '\n=== %s (%d s in, %d s left) ===\n' "$*" "$SECONDS" "$(left)"; }
fail() { echo "FAILED: $*"; status=1; }

stage "1. the machine"
{
  echo "card: $(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>&1 | head -n 1)"
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1)"
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
  echo "gcc: $(gcc -dumpfullversion 2>&1)"
  echo "glibc: $(ldd --version 2>&1 | head -n 1)"
  echo "cmake: $(cmake --version 2>&1 | head -n 1)"
  echo "cores: $jobs"
} | tee "$out/machine.txt"
gpu=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$gpu" ] || { fail "no GPU visible to nvidia-smi"; exit 1; }
arch=$(echo "$gpu" | awk -F', ' '{gsub(/\./, "", $2); print $2}')

stage "2. GPU tests (sm_$arch), required to run"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DRECURFORMER_ENABLE_CUDA=ON -DRECURFORMER_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$prefix" \
  > "$out/configure.log" 2>&1 || { tail -n 30 "$out/configure.log"; fail "configure"; exit 1; }
# the gpu-labelled tests' binaries: tests/<name>_test.cu (not the host-only *_host_test.cu) and the
# op x backend matrix, whose CUDA columns are the backend_ops_gpu test
targets="$(cd tests && ls *_test.cu | grep -v '_host_test\.cu$' | sed 's/\.cu$/_gpu/' | tr '\n' ' ')backend_ops_test"
if ! timeout "$(left)" cmake --build build-gpu -j"$jobs" --target $targets > "$out/build-tests.log" 2>&1; then
  tail -n 40 "$out/build-tests.log"
  fail "building the GPU tests"
  exit 1
fi
echo "built in $SECONDS s: $targets"
RECURFORMER_REQUIRE_GPU=1 timeout "$(left)" ctest --test-dir build-gpu -L gpu --output-on-failure \
  > "$out/tests.log" 2>&1 || fail "GPU tests (see tests.log)"
tail -n 15 "$out/tests.log"
if grep -qiE 'skipped|not run|did not run' "$out/tests.log"; then fail "a GPU test was skipped or not run on a machine with a GPU"; fi

stage "3. memcheck on the riskiest binaries"
if command -v compute-sanitizer > /dev/null; then
  # the layer, and the scan and attention columns of the op matrix (CUDA only)
  for run in "hybrid_head_attention_test_gpu" "backend_ops_test [selective_scan],[attention]"; do
    t=${run%% *}; args=${run#"$t"}
    cap=$(( $(left) - 120 ))  # keep two minutes for the benchmarks
    [ "$cap" -gt "${MEMCHECK_SECONDS:-60}" ] && cap=${MEMCHECK_SECONDS:-60}
    if [ "$cap" -lt 10 ]; then echo "memcheck $t: no time left"; continue; fi
    rc=0
    # shellcheck disable=SC2086  # args: the Catch filter, one word
    RECURFORMER_REQUIRE_GPU=1 RECURFORMER_BACKENDS=cuda timeout "$cap" compute-sanitizer --tool memcheck \
      --error-exitcode 9 "build-gpu/bin/$t" $args \
      > "$out/memcheck-$t.log" 2>&1 || rc=$?
    case $rc in
      0) echo "memcheck $t: clean" ;;
      124) echo "memcheck $t: stopped after $cap s, no error until then (memcheck-$t.log)" ;;
      *) fail "memcheck $t (memcheck-$t.log)" ;;
    esac
  done
else
  echo "compute-sanitizer not found: memcheck not run"
fi

stage "4. CUDA benchmarks"
if [ "$(left)" -lt 60 ]; then
  echo "no time left for the benchmarks"
elif ! timeout "$(( $(left) - 30 ))" cmake --build build-gpu -j"$jobs" --target recurformer-bench-cuda \
    > "$out/build-bench.log" 2>&1; then
  tail -n 20 "$out/build-bench.log"
  echo "the benchmarks did not build (see build-bench.log); the test results above stand"
else
  filter=${BENCH_FILTER:-'DeviceCopy|CudaSelectiveScan|CudaStateUpdate|CudaAttentionDecode|CudaAttentionPrefill|HybridDecodeCuda'}
  min_time=0.1
  if timeout "$(( $(left) - 10 ))" build-gpu/bin/recurformer-bench-cuda --benchmark_filter="$filter" \
      --benchmark_out="$out/bench.json" --benchmark_out_format=json --benchmark_min_time=$min_time \
      > "$out/bench.log" 2>&1; then
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
  else
    tail -n 20 "$out/bench.log"
    echo "the benchmarks failed or ran out of time (see bench.log); the test results above stand"
  fi
fi

stage "done"
[ "$status" = 0 ] && echo "GPU check passed: the tests ran on $gpu and passed" || echo "GPU check FAILED (see above and $out)"
exit $status
