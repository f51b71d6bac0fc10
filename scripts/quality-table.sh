#!/usr/bin/env bash
# scripts/quality-table.sh [WORK_DIR]: the quality table of docs/quality.md on SmolLM2-135M-Instruct.
#
# Fetches the model (scripts/fetch-smollm2.sh) and the texts (scripts/quality-texts.sh), calibrates on
# the first 64 KB of train.txt, and for each ratio in RATIOS converts with --init default and --init
# fit, distils the fit model (STEPS steps per group on the same 64 KB, with the learning rates of
# `recurformer distill`'s defaults unless LR / LR_PROJ are set), and measures every model's perplexity on
# eval.txt (never trained on) at each context in CTXS, and with PROBE=1 also on the long-range probe
# (`perplexity --repeat -c 2048`), and with OOD=1 on ood.txt (another domain) at ctx 512. FT_STEPS > 0 (default 0) fine-tunes the distilled model for that many
# steps of one 512-token sequence of finetune.txt (lr FT_LR, default 3e-4; with FT_KL > 0 plus that
# weight of KL to the original), the streaming baselines alike (their q/k/v rows: the same budget), and
# the original itself with every tensor trained (`convert --ratio 0`, `finetune --train all`): the
# control that says how much of a fine-tuned row's gain is the domain alone.
# Each ratio also gets streaming heads on the same groups, sink 4 and
# the window that takes a recurrent state's bytes. WINDOWED=1 adds windowed groups (the streaming
# heads + alpha x a recurrent state, --init fit, distilled, fine-tuned as above) and the streaming
# heads at their cache (a ring of two states' bytes). Prints one markdown row per model and keeps
# everything in WORK_DIR (default build/quality). Needs build/bin/recurformer (README command 1 builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/quality}
R=${RECURFORMER:-build/bin/recurformer}
RATIOS=${RATIOS:-0.5}
CTXS=${CTXS:-512}
STEPS=${STEPS:-100}
FT_STEPS=${FT_STEPS:-0}
FT_LR=${FT_LR:-3e-4}
FT_KL=${FT_KL:-0}
PROBE=${PROBE:-0}
OOD=${OOD:-0}
WINDOWED=${WINDOWED:-0}
THREADS=${THREADS:-$(nproc)}
extra=()
[ -n "${LR:-}" ] && extra+=(--lr "$LR")
[ -n "${LR_PROJ:-}" ] && extra+=(--lr-proj "$LR_PROJ")
mkdir -p "$work"
M=$(scripts/fetch-smollm2.sh "$work/smollm2")
scripts/quality-texts.sh "$work" >&2
head -c 65536 "$work/train.txt" | sed '$d' > "$work/calib.txt"
[ -f "$work/scores.json" ] || "$R" calibrate -m "$M" -f "$work/calib.txt" -o "$work/scores.json" -c 512 -t "$THREADS" >&2
final_ppl() {  # perplexity's arguments -> its final estimate
  "$R" perplexity "$@" -t "$THREADS" 2>&1 | sed -n 's/^Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
ppl() {  # model -> "ppl@ctx1 | ppl@ctx2 ... [| probe] [| ood]"
  local row="" c
  for c in $CTXS; do row="$row | $(final_ppl -m "$1" -f "$work/eval.txt" -c "$c")"; done
  [ "$PROBE" = 1 ] && row="$row | $(final_ppl --repeat -m "$1" -f "$work/eval.txt" -c 2048)"
  [ "$OOD" = 1 ] && row="$row | $(final_ppl -m "$1" -f "$work/ood.txt" -c 512)"
  echo "$row"
}
kl=(); [ "$FT_KL" != 0 ] && kl=(--teacher "$M" --kl "$FT_KL")
finetune_row() {  # label, model dir [, finetune options]: with FT_STEPS > 0, fine-tunes it into DIR-finetune and prints its row
  [ "$FT_STEPS" -gt 0 ] || return 0
  local label=$1 dir=$2 t0; t0=$(date +%s)
  shift 2
  "$R" finetune -m "$dir" -f "$work/finetune.txt" -c 512 --steps "$FT_STEPS" --lr "$FT_LR" "${kl[@]}" "$@" \
    -t "$THREADS" -o "$dir-finetune" --force > "$dir-finetune.log" 2>&1
  echo "| $label + finetune ($FT_STEPS x 512 tokens, lr $FT_LR, KL $FT_KL) | $r $(ppl "$dir-finetune") | $(( $(date +%s) - t0 )) s finetune |"
}
probe_head=""; [ "$PROBE" = 1 ] && probe_head=", probe"; [ "$OOD" = 1 ] && probe_head="$probe_head, ood.txt at 512"
echo "| model | ratio | perplexity at ctx $(echo $CTXS | sed 's/ /, /g')$probe_head | time |"
echo "| --- | --- | --- | --- |"
echo "| original | 0 $(ppl "$M") | |"
if [ "$FT_STEPS" -gt 0 ]; then  # the control: the original fine-tuned alike, every tensor (what the domain alone gives)
  "$R" convert -m "$M" --scores "$work/scores.json" --ratio 0 -o "$work/original" --force > "$work/original.log" 2>&1
  r=0 finetune_row "original, every tensor trained" "$work/original" --train all
fi
for r in $RATIOS; do
  for init in default fit; do
    t0=$(date +%s)
    "$R" convert -m "$M" --scores "$work/scores.json" --ratio "$r" --init $init -f "$work/calib.txt" -c 512 \
      -t "$THREADS" -o "$work/rf$r-$init" --force > "$work/rf$r-$init.log" 2>&1
    echo "| $init | $r $(ppl "$work/rf$r-$init") | $(( $(date +%s) - t0 )) s convert |"
  done
  t0=$(date +%s)
  "$R" distill -m "$work/rf$r-fit" --teacher "$M" -f "$work/calib.txt" -c 512 --steps "$STEPS" -t "$THREADS" \
    "${extra[@]}" -o "$work/rf$r-distill" --force > "$work/rf$r-distill.log" 2>&1
  echo "| fit + distill ($STEPS steps/group) | $r $(ppl "$work/rf$r-distill") | $(( $(date +%s) - t0 )) s distill |"
  finetune_row "fit + distill" "$work/rf$r-distill"
  "$R" convert -m "$M" --scores "$work/scores.json" --ratio "$r" --kind streaming -o "$work/st$r" --force \
    > "$work/st$r.log" 2>&1
  echo "| streaming ($(sed -n 's/^streaming heads keep the first \([0-9]*\) and the last \([0-9]*\).*/sink \1, window \2/p' "$work/st$r.log")) | $r $(ppl "$work/st$r") | |"
  finetune_row "streaming" "$work/st$r"  # the fair baseline: its q/k/v rows trained at the same budget
  [ "$WINDOWED" = 1 ] || continue
  t0=$(date +%s)
  "$R" convert -m "$M" --scores "$work/scores.json" --ratio "$r" --kind windowed --init fit -f "$work/calib.txt" -c 512 \
    -t "$THREADS" -o "$work/w$r-fit" --force > "$work/w$r-fit.log" 2>&1
  "$R" distill -m "$work/w$r-fit" --teacher "$M" -f "$work/calib.txt" -c 512 --steps "$STEPS" -t "$THREADS" \
    "${extra[@]}" -o "$work/w$r-distill" --force > "$work/w$r-distill.log" 2>&1
  echo "| windowed, fit + distill | $r $(ppl "$work/w$r-distill") | $(( $(date +%s) - t0 )) s convert + distill |"
  finetune_row "windowed, fit + distill" "$work/w$r-distill"
  # the streaming heads at a windowed group's cache: a ring of two recurrent states' bytes (f32, head_dim 64)
  w2=$(( 2 * (64 * 64 * 4 + 3 * 64 * 4) / (2 * 64 * 4) - 4 ))
  "$R" convert -m "$M" --scores "$work/scores.json" --ratio "$r" --kind streaming --stream-window "$w2" \
    -o "$work/st$r-w$w2" --force > "$work/st$r-w$w2.log" 2>&1
  echo "| streaming (sink 4, window $w2: a windowed group's bytes) | $r $(ppl "$work/st$r-w$w2") | |"
  finetune_row "streaming, window $w2" "$work/st$r-w$w2"
done
