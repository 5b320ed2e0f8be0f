#!/usr/bin/env bash
# Set-up (once), the formatter and linter over the whole tree, then the whole test suite, in two
# processes (pytest-xdist; a test file stays in one, so its module fixtures are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
