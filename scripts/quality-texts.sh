#!/usr/bin/env bash
# scripts/quality-texts.sh DIR: the training and evaluation texts of the quality table (docs/quality.md),
# from Debian's python3.11-doc package (the reStructuredText sources of the Python documentation).
#
#   DIR/train.txt  howto/{functional,descriptor,regex,logging,enum,unicode}.rst.txt   (calibration,
#                  fit, distillation and fine-tuning read only this)
#   DIR/finetune.txt  howto/*.rst.txt and reference/*.rst.txt (fine-tuning's text: a superset of
#                  train.txt, 1.1 MB)
#   DIR/eval.txt   tutorial/{controlflow,datastructures,errors}.rst.txt (never trained on; the text
#                  docs/agreement.md measures perplexity on)
#   DIR/ood.txt    the first 90 KB (whole lines) of chapters scope, archive, binary, source and
#                  controlfields of debian-policy 4.6.2.0's reStructuredText sources: English of
#                  another domain, to tell adaptation to the Python docs from recovered quality
# The .deb is fetched with `apt-get download` (nothing is installed) and unpacked with dpkg -x. Prints
# the sizes and SHA-256 of both files; exit 2 when the package cannot be fetched.
set -euo pipefail
dir=${1:?usage: quality-texts.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
src=$dir/pydoc/usr/share/doc/python3.11/html/_sources
if [ ! -d "$src" ]; then
  deb=$(ls "$dir"/python3.11-doc_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    if ! (cd "$dir" && apt-get download python3.11-doc >/dev/null 2>&1); then
      echo "quality-texts: cannot download Debian's python3.11-doc (run 'apt-get update' first?)" >&2
      exit 2
    fi
    deb=$(ls "$dir"/python3.11-doc_*.deb | head -n 1)
  fi
  dpkg -x "$deb" "$dir/pydoc"
fi
cat "$src"/howto/{functional,descriptor,regex,logging,enum,unicode}.rst.txt > "$dir/train.txt"
cat "$src"/howto/*.rst.txt "$src"/reference/*.rst.txt > "$dir/finetune.txt"
pol=$dir/policy/usr/share/doc/debian-policy/policy.html/_sources
if [ ! -d "$pol" ]; then
  deb=$(ls "$dir"/debian-policy_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    if ! (cd "$dir" && apt-get download debian-policy >/dev/null 2>&1); then
      echo "quality-texts: cannot download Debian's debian-policy (run 'apt-get update' first?)" >&2
      exit 2
    fi
    deb=$(ls "$dir"/debian-policy_*.deb | head -n 1)
  fi
  dpkg -x "$deb" "$dir/policy"
fi
cat "$pol"/ch-{scope,archive,binary,source,controlfields}.rst.txt | head -c 90000 | sed '$d' > "$dir/ood.txt"
cat "$src"/tutorial/{controlflow,datastructures,errors}.rst.txt > "$dir/eval.txt"
for f in train finetune eval ood; do
  printf '%s.txt: %s bytes, sha256 %s\n' "$f" "$(wc -c < "$dir/$f.txt")" "$(sha256sum "$dir/$f.txt" | cut -d' ' -f1)"
done
