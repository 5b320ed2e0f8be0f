#!/usr/bin/env bash
# Set-up (once) and the main job: trains MiSTER-E (3 seeds) on the built-in demo corpus, which it
# builds under features/demo if absent; results, report and checkpoints go to runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mister_jax.train --dataset demo "$@"
