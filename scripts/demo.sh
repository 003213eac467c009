#!/usr/bin/env bash
# The main job: fine-tune a small offline language model with NTK-Attention, save the adapter, reload it, show the
# effect. Sets up ./.venv first. Extra arguments go to examples/ntk_demo.py (e.g. --quick, --output-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python examples/ntk_demo.py "$@"
