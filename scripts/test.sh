#!/usr/bin/env bash
# Set up (once) and run every test: `bash scripts/test.sh [pytest options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export MISTRAL_T4_CACHE=${MISTRAL_T4_CACHE:-$PWD/.cache/mistral_t4}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
