#!/usr/bin/env bash
# Set up (once) and run the benchmark: `bash scripts/bench.sh [bench options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mistral_t4 bench "$@"
