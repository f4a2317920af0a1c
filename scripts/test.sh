#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: system packages, .venv, lint, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-system.sh
scripts/venv.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
