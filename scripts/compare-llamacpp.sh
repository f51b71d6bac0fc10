#!/usr/bin/env bash
# scripts/compare-llamacpp.sh: agreement and speed of our runner against llama.cpp (docs/agreement.md).
#
# llama.cpp is not part of this project: build it yourself, outside this repository, and point
# LLAMACPP_DIR at its build directory (the one holding bin/llama-perplexity). Nothing of it is
# copied here; this script only runs its binaries on the same files as ours.
#
#   LLAMACPP_DIR=/work/llamacpp/build MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
#   TEXT=/path/eval.txt scripts/compare-llamacpp.sh [quantize] [ppl] [greedy] [bench] [rf]
#
# Steps (default: all): quantize (F32, F16, Q8_0 from MODEL with llama-quantize
# --allow-requantize), ppl (perplexity, ours with fp32 and f16 caches, llama.cpp with f16 and fp32
# caches), greedy (64 greedy tokens from 4 prompts, F32 file, against llama-simple), bench (llama-bench vs recurformer
# bench at depth 0 and 4096), rf (calibrate + convert --ratio 0.5 --init fit, then bench the
# RecurFormer at 4096 and 32768 beside the original).
# Optional: RF (our runner, default build/bin/recurformer), MODELS (derived files, default the
# directory of MODEL), OUT (logs, default build/compare-llamacpp), THREADS (2), CALIB (calibration
# text for rf, default examples/data/calibration.txt), TYPES ("F32 F16 Q8_0 Q4_1"), REPS (llama-bench
# repetitions, 2), OURS_F16 (0: skip our f16-cache perplexity runs).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
: "${LLAMACPP_DIR:?set LLAMACPP_DIR to the llama.cpp build directory (with bin/)}"
: "${MODEL:?set MODEL to the Q4_1 (or any) GGUF file}"
: "${TEXT:?set TEXT to the evaluation text}"
RF=${RF:-$here/build/bin/recurformer}
MODELS=${MODELS:-$(dirname "$MODEL")}
OUT=${OUT:-$here/build/compare-llamacpp}
THREADS=${THREADS:-2}
CALIB=${CALIB:-$here/examples/data/calibration.txt}
TYPES=${TYPES:-F32 F16 Q8_0 Q4_1}
REPS=${REPS:-2}
OURS_F16=${OURS_F16:-1}
LB=$LLAMACPP_DIR/bin
steps=${*:-quantize ppl greedy bench rf}
mkdir -p "$OUT" "$MODELS"
base=$(basename "$MODEL" .gguf)
base=${base%.*}  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
file_of() { if [ "$1" = Q4_1 ]; then echo "$MODEL"; else echo "$MODELS/$base.$1.gguf"; fi; }
has() { case " $steps " in *" $1 "*) return 0 ;; esac; return 1; }
log() { echo "== $*" >&2; }

echo "# $(date -u '+%F %T') UTC; $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

if has quantize; then
  for t in F32 F16 Q8_0; do
    f=$(file_of $t)
    [ -f "$f" ] || "$LB/llama-quantize" --allow-requantize "$MODEL" "$f" $t > "$OUT/quantize-$t.log" 2>&1
    echo "quantize $t: $f $(sha256sum "$f" | cut -c1-16)"
  done
fi

ppl_of() { [ -f "$1" ] || return 0; sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$1" | tail -1; }
if has ppl; then
  echo "| file | ours f32 cache | ours f16 cache | llama.cpp f32 cache | llama.cpp f16 cache | ours/llama.cpp - 1 (f32) | (f16) |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for t in $TYPES; do
    f=$(file_of $t)
    log "perplexity $t"
    # a log that already holds a final estimate is kept (rerun after a cut-off run)
    run() { local o=$1; shift; grep -q 'Final estimate' "$o" 2>/dev/null || "$@" > "$o" 2>&1; }
    run "$OUT/ppl-ours-$t-f32.log" "$RF" perplexity -m "$f" -f "$TEXT" -c 512 -t "$THREADS"
    [ "$OURS_F16" = 0 ] ||
      run "$OUT/ppl-ours-$t-f16.log" "$RF" perplexity -m "$f" -f "$TEXT" -c 512 -t "$THREADS" --cache-type f16
    run "$OUT/ppl-llama-$t-f32.log" "$LB/llama-perplexity" -m "$f" -f "$TEXT" -c 512 -t "$THREADS" -ctk f32 -ctv f32
    run "$OUT/ppl-llama-$t-f16.log" "$LB/llama-perplexity" -m "$f" -f "$TEXT" -c 512 -t "$THREADS"
    o32=$(ppl_of "$OUT/ppl-ours-$t-f32.log"); o16=$(ppl_of "$OUT/ppl-ours-$t-f16.log")
    l32=$(ppl_of "$OUT/ppl-llama-$t-f32.log"); l16=$(ppl_of "$OUT/ppl-llama-$t-f16.log")
    awk -v t=$t -v a="$o32" -v b="$o16" -v c="$l32" -v d="$l16" 'function rel(x, y) {
        return x == "" || y == "" ? "-" : sprintf("%+.3f%%", 100 * (x / y - 1)) }
      BEGIN { printf "| %s | %s | %s | %s | %s | %s | %s |\n", t, a, b, c, d, rel(a, c), rel(b, d) }'
  done
  grep -h 'tokens, .* chunks' "$OUT"/ppl-ours-*-f32.log | sort -u | sed 's/^/ours: /'
  grep -h 'tokenizing the input\|tokenization took\|calculating perplexity over' "$OUT"/ppl-llama-*-f32.log | sort -u |
    sed 's/^/llama.cpp: /'
fi

prompts=("The capital of France is" "def fibonacci(n):" "Once upon a time, in a small village," \
         "The three laws of thermodynamics are")
if has greedy; then
  f=$(file_of F32)
  i=0
  for p in "${prompts[@]}"; do
    i=$((i + 1))
    # ours: the generated text on stdout (prompt not echoed)
    "$RF" generate -m "$f" -p "$p" -n 64 --temp 0 -t "$THREADS" > "$OUT/gen-ours-$i.txt" 2> "$OUT/gen-ours-$i.err"
    "$RF" generate -m "$f" -p "$p" -n 64 --temp 0 -t "$THREADS" --cache-type f16 > "$OUT/gen-ours16-$i.txt" \
      2> "$OUT/gen-ours16-$i.err"
    # llama.cpp: examples/simple is greedy, raw prompt (no chat template), f16 cache; it echoes the
    # prompt and ends with one newline, which are cut off; ours ends its text with two newlines
    "$LB/llama-simple" -m "$f" -n 64 "$p" > "$OUT/gen-llama-$i.raw" 2> "$OUT/gen-llama-$i.err"
    python3 -c 'import sys; p, r, o = sys.argv[1:]; s = open(r, encoding="utf-8").read(); assert s.startswith(p)
open(o, "w", encoding="utf-8").write(s[len(p):-1] if s.endswith("\n") else s[len(p):])' "$p" "$OUT/gen-llama-$i.raw" \
      "$OUT/gen-llama-$i.txt"
    python3 - "$OUT/gen-ours-$i.txt" "$OUT/gen-ours16-$i.txt" "$OUT/gen-llama-$i.txt" "$p" <<'EOF'
import sys
a, c, b = (open(x, encoding="utf-8", errors="replace").read() for x in sys.argv[1:4])
a, c = (x[:-2] if x.endswith("\n\n") else x for x in (a, c))
def cmp(x, y):
    n = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
    return "identical" if x == y else f"differ from char {n}: ...{x[max(0,n-20):n+20]!r} vs ...{y[max(0,n-20):n+20]!r}"
print(f"prompt {sys.argv[4]!r}: ours (f32 cache) vs llama-simple: {cmp(a, b)}; ours (f16 cache): {cmp(c, b)}")
EOF
  done
fi

if has bench; then
  echo "| file | llama.cpp pp512 @0 | ours | llama.cpp tg128 @0 | ours | llama.cpp pp512 @4096 | ours | llama.cpp tg128 @4096 | ours |"
  for t in $TYPES; do
    f=$(file_of $t)
    log "bench $t"
    "$LB/llama-bench" -m "$f" -t "$THREADS" -p 512 -n 128 -d 0,4096 -r "$REPS" -o md > "$OUT/bench-llama-$t.md" 2>&1
    # ours: -c is the depth at which the measured tokens end, so 512 prefill + 128 decode (+1) after D
    "$RF" bench -m "$f" -t "$THREADS" -b 512 -n 128 -c 641,4737 > "$OUT/bench-ours-$t.txt" 2>&1
    cat "$OUT/bench-llama-$t.md" "$OUT/bench-ours-$t.txt"
  done
fi

if has rf; then
  f=$(file_of F32)
  d="$MODELS/$base-rf50"
  if [ ! -d "$d" ]; then
    log "calibrate + convert (--ratio 0.5 --init fit) on $CALIB"
    "$RF" calibrate -m "$f" -f "$CALIB" -o "$OUT/scores.json" -t "$THREADS" > "$OUT/calibrate.log" 2>&1
    "$RF" convert -m "$f" --scores "$OUT/scores.json" --ratio 0.5 --init fit -f "$CALIB" -o "$d" -t "$THREADS" \
      > "$OUT/convert.log" 2>&1
  fi
  for m in "$f" "$d"; do
    "$RF" bench -m "$m" -t "$THREADS" -b 512 -n 128 -c 4737,32768 | tee "$OUT/bench-rf-$(basename "$m").txt"
  done
  "$LB/llama-bench" -m "$f" -t "$THREADS" -p 512 -n 128 -d 32768 -r 1 -o md | tee "$OUT/bench-llama-F32-32k.md"
fi
