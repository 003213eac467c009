#!/usr/bin/env bash
# The test suite: sets up ./.venv, lints and checks formatting, then runs pytest (CPU, offline). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .  # the formatter's style is pinned with ruff's minor version (dev extra)
export NTK_RANKGEN_REQUIRE_ASSETS=1  # the real-model tests must run, never skip
python -m pytest -q -p no:cacheprovider "$@"
