#!/usr/bin/env bash
# Create .venv and install the project into it (idempotent; fast when already done).
# Usage: scripts/venv.sh [extra]   e.g. scripts/venv.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-${extra:-base}"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  spec="."
  [ -z "$extra" ] || spec=".[$extra]"
  .venv/bin/python -m pip install -q -e "$spec"
  touch "$stamp"
fi
