#!/usr/bin/env bash
# Refresh static/vendor/ from npm at pinned versions. The page has no build step and makes no
# request outside its origin, so the browser-side libraries it uses are committed here.
#   scripts/update-vendor.sh            # fetch the pinned version and copy its files
# To move to a new version: change the pin below, run this, test the page, commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."

OPUS_RECORDER_VERSION=8.0.5 # MIT; bundles libopus 1.3.1 and speexdsp 1.2.0 (BSD)
dest=static/vendor/opus-recorder
files=(recorder.min.js encoderWorker.min.js decoderWorker.min.js decoderWorker.min.wasm)

command -v npm >/dev/null || { echo "update-vendor: npm is needed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# npm pack downloads the exact published tarball (and checks its integrity); nothing is installed.
(cd "$work" && npm pack --silent "opus-recorder@${OPUS_RECORDER_VERSION}" >/dev/null)
tar -xzf "$work/opus-recorder-${OPUS_RECORDER_VERSION}.tgz" -C "$work"
pkg="$work/package"
got=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$pkg/package.json")
[ "$got" = "$OPUS_RECORDER_VERSION" ] || { echo "update-vendor: got $got, wanted $OPUS_RECORDER_VERSION" >&2; exit 1; }

mkdir -p "$dest"
for f in "${files[@]}"; do
  install -m 0644 "$pkg/dist/$f" "$dest/$f"
done
install -m 0644 "$pkg/LICENSE.md" "$dest/LICENSE.md"
{
  echo "opus-recorder ${OPUS_RECORDER_VERSION} from https://www.npmjs.com/package/opus-recorder"
  echo "Copied by scripts/update-vendor.sh; do not edit by hand. Licence: LICENSE.md (MIT, BSD for libopus/speexdsp)."
  echo
  (cd "$dest" && sha256sum "${files[@]}")
} > "$dest/VERSION"
echo "update-vendor: opus-recorder ${OPUS_RECORDER_VERSION} -> $dest"
