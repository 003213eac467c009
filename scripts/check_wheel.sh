#!/usr/bin/env bash
# Builds the sdist and wheel, checks them with twine, installs the wheel alone (with the [train] extra) into a fresh
# venv and runs the README's NTK quickstart there, on the converted SmolLM2 checkpoint of ./.venv (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python -m pip install -q build twine
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m build --outdir "$work/dist" . > "$work/build.log"
twine check "$work"/dist/*
model="$(python -c 'from ntk_rankgen_assets.models import causal_lm_path; print(causal_lm_path())')"
python - "$model" > "$work/quickstart.py" <<'PY'
import re, sys
text = open("README.md").read()
blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang == "python"]
print("\n".join(blocks[:2]).replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(sys.argv[1])))
PY
deactivate
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$work/venv/bin/python" -m pip install -q "$(ls "$work"/dist/*.whl)[train]"
(cd "$work" && HF_HUB_OFFLINE=1 "$work/venv/bin/python" quickstart.py)
echo "the wheel installed alone and ran the README's quickstart"
