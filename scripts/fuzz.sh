#!/usr/bin/env bash
# Runs every libFuzzer target (fuzz/<name>_fuzz.cpp) for SECONDS each and prints a table of what it
# did: executions, executions/s, coverage, corpus size, peak memory, and whether it found anything.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 3600: the long run),
#                                             TARGET e.g. gguf_fuzz (default: all)
#   PARALLEL=2 scripts/fuzz.sh 1800           two targets at a time (one core each)
#
# Builds build-fuzz/ with clang first (the fuzz targets need libFuzzer). Each target starts from its
# committed seeds (fuzz/corpus/<name>) and regressions (fuzz/regressions/<name>) plus what earlier
# runs found (build-fuzz/corpus/<name>, kept between runs). A finding is written under
# build-fuzz/artifacts/ and makes the script exit 1; reduce it and add it to fuzz/regressions/<name>,
# which ctest replays. CI runs this with 60 s per target; docs/design.md ("Input rules") records the
# long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3600}
shift || true
parallel=${PARALLEL:-1}
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -ge 1 ] || { echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2; exit 2; }
[[ "$parallel" =~ ^[0-9]+$ ]] && [ "$parallel" -ge 1 ] || { echo "fuzz.sh: PARALLEL must be a positive integer" >&2; exit 2; }
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is needed (apt install clang)" >&2; exit 2; }

cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DRECURFORMER_BUILD_FUZZERS=ON \
  -DRECURFORMER_BUILD_TESTS=OFF -DRECURFORMER_BUILD_BENCHMARKS=OFF -DRECURFORMER_BUILD_EXAMPLES=OFF \
  -DRECURFORMER_ENABLE_CUDA=OFF -DRECURFORMER_INSTALL=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc 2>/dev/null || echo 2)"

targets=()
if [ $# -gt 0 ]; then
  for t in "$@"; do
    [ -x "build-fuzz/bin/$t" ] || { echo "fuzz.sh: no fuzz target '$t' in build-fuzz/bin" >&2; exit 2; }
    targets+=("$t")
  done
else
  for f in build-fuzz/bin/*_fuzz; do [ -x "$f" ] && targets+=("$(basename "$f")"); done
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz targets were built" >&2; exit 2; }

mkdir -p build-fuzz/logs build-fuzz/artifacts
run_one() {
  local name=$1 seeds=()
  mkdir -p "build-fuzz/corpus/$name"
  [ -d "fuzz/corpus/$name" ] && seeds+=("fuzz/corpus/$name")
  [ -d "fuzz/regressions/$name" ] && seeds+=("fuzz/regressions/$name")
  local rc=0
  "build-fuzz/bin/$name" -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/artifacts/$name-" "build-fuzz/corpus/$name" "${seeds[@]}" \
    > "build-fuzz/logs/$name.log" 2>&1 || rc=$?
  echo "$rc" > "build-fuzz/logs/$name.rc"
}

echo "fuzz.sh: ${#targets[@]} targets x ${seconds} s, ${parallel} at a time; logs in build-fuzz/logs/ ($(date -u +%H:%M:%S) UTC)"
running=0
for name in "${targets[@]}"; do
  echo "-- $name"
  run_one "$name" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true

fuzz_stat() { sed -n "s/^stat::$2: *//p" "build-fuzz/logs/$1.log" | tail -1; }
found=0
printf '\n| target | seconds | executions | per second | coverage (cov / ft) | corpus | peak RSS | result |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
for name in "${targets[@]}"; do
  log=build-fuzz/logs/$name.log
  rc=$(cat "build-fuzz/logs/$name.rc")
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\).*/\1 \/ \2/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  if [ "$rc" = 0 ]; then result="no finding"; else result="**finding** (exit $rc, see $log)"; found=1; fi
  printf '| %s | %s | %s | %s | %s | %s | %s MB | %s |\n' "$name" "$seconds" "$(fuzz_stat "$name" number_of_executed_units)" \
    "$(fuzz_stat "$name" average_exec_per_sec)" "${cov:-?}" "${corp:-?}" "$(fuzz_stat "$name" peak_rss_mb)" "$result"
done
echo "(clang $(clang++ -dumpversion), $(nproc) cores, $(date -u +%Y-%m-%d) UTC)"
if [ "$found" = 1 ]; then
  echo "fuzz.sh: a target found an input that breaks it; the input is in build-fuzz/artifacts/" >&2
  exit 1
fi
