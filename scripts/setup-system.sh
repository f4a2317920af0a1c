#!/usr/bin/env bash
# System packages the tests need: espeak-ng + sox (Japanese test speech), chromium +
# fonts-noto-cjk (the page in a real browser), haproxy (multi-GPU routing test).
# Installs only what is missing; needs root (CI runs as root) or sudo.
set -euo pipefail
declare -A want=([espeak-ng]=espeak-ng [sox]=sox [chromium]=chromium [haproxy]=haproxy)
missing=()
for tool in "${!want[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${want[$tool]}")
done
[ -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || missing+=(fonts-noto-cjk)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup-system: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
