#!/usr/bin/env bash
# The test suite: sets up ./.venv, lints, then runs pytest (CPU, offline). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
