#!/usr/bin/env bash
# Run the server from a fresh clone: installs into .venv on first use, then starts it.
# Examples: scripts/run.sh --demo          (any machine: tiny random model on CPU)
#           scripts/run.sh                 (CUDA GPU: downloads J-Moshi once, ~16 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
exec .venv/bin/jmoshi-server "$@"
