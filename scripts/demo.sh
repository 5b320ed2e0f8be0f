#!/usr/bin/env bash
# Set-up (once) and the main job: trains MiSTER-E (3 seeds) on the built-in demo corpus, which it
# builds under features/demo if absent; results, report and checkpoints go to runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Transparent huge pages for XLA's large buffers on glibc (opt-in; ignored elsewhere; docs/BENCHMARKS.md).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
exec .venv/bin/python -m mister_jax.train --dataset demo "$@"
