"""The end-to-end demo (examples/ntk_demo.py) in its --quick form: a tiny Llama pretrained on the spot stands in for
SmolLM2; the scorer is the real MiniLM-L6."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "ntk_demo.py"

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("minilm_path", "two_threads")]


def load_demo():
    spec = importlib.util.spec_from_file_location("ntk_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_demo_trains_reloads_and_decodes(tmp_path, capsys):
    summary = load_demo().main(["--quick", "--output-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["perplexity"] == summary["perplexity"]
    ppl = saved["perplexity"]
    # both methods adapt to the held-out topics' domain; disabling the NTK adapter gives the base back
    assert ppl["ntk"] < ppl["base"] and ppl["lora"] < ppl["base"], ppl
    assert abs(saved["ntk_disabled_perplexity"] - ppl["base"]) <= 1e-4 * ppl["base"]
    assert 1.0 < ppl["base"] < 0.5 * 512  # really pretrained: a uniform guess over 512 tokens is 512

    assert saved["reload"] == {"identical": True, "max_abs_diff": 0.0}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(saved["adapter_files"])
    methods = saved["methods"]
    assert methods["ntk"]["trainable"] == 2 * 4 * (32 * 32 + 32)  # 2 layers x 4 heads x (Z 32x32, k 32)
    assert methods["lora"]["trainable"] == 2 * (8 * (128 + 128) + 8 * (128 + 64))  # r=8 on q (128->128), v (128->64)
    assert all(methods[m]["losses"] and methods[m]["train_seconds"] > 0 for m in ("ntk", "lora"))

    samples = saved["samples"]
    assert len(samples["prompts"]) == 2 and all(len(samples[m]) == 2 for m in ("base", "ntk", "lora"))
    rankgen = saved["rankgen"]
    prompts = rankgen["prompts"]
    assert prompts and all(len(rankgen["continuations"][m]) == len(prompts) for m in ("nucleus", "rankgen_beam"))
    scores = rankgen["rankgen_score"]
    assert set(scores) == {"human", "nucleus", "rankgen_beam"} and all(math.isfinite(v) for v in scores.values())
    # the beam keeps the candidates that the scorer ranks highest: on average above plain nucleus samples
    assert scores["rankgen_beam"] > scores["nucleus"], scores

    printed = capsys.readouterr().out
    assert "Summary" in printed and "LoRA r=8" in printed and "rankgen_beam" in printed
