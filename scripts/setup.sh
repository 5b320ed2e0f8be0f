#!/usr/bin/env bash
# Creates .venv and installs mister with every stage into it; a re-run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.mister-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: a CPU wheel lies on these machines, an unpinned torch pulls a multi-GB CUDA build.
# On a CUDA machine of your own, install the torch you want before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[jax,torch,dev]"
echo "$want" > "$stamp"
