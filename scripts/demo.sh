#!/usr/bin/env bash
# Set-up (once) and the main job on the built-in demo corpus: trains MiSTER-E on features/demo, writes runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m bridges.demo --out features >/dev/null
.venv/bin/python -m bridges.check features/demo
