"""The end-to-end demo (examples/ntk_demo.py) in its --quick form."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "ntk_demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("ntk_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_demo_adapts_to_the_target_domain(tmp_path):
    demo = load_demo()
    summary = demo.main(["--quick", "--output-dir", str(tmp_path)])

    path = tmp_path / "summary.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved["perplexity"] == summary["perplexity"]

    assert saved["reload_identical"] is True and saved["reload_max_abs_diff"] == 0.0
    ppl = saved["perplexity"]
    assert ppl["ntk"]["target"] < ppl["base"]["target"], ppl
    # Disabling the adapter gives the base model back.
    for domain in ("target", "general"):
        assert abs(ppl["ntk_disabled"][domain] - ppl["base"][domain]) < 1e-4 * ppl["base"][domain], ppl
    # The base really was pretrained (a uniform guess over the vocabulary would be ~512) and stays usable.
    assert ppl["base"]["general"] < 0.5 * saved["args"]["vocab_size"], ppl
    assert all(v > 1.0 for model in ppl.values() for v in model.values()), ppl

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(saved["adapter_files"])
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert (tmp_path / "base" / "model.safetensors").is_file()
    assert saved["model"]["ntk_trainable_parameters"] == 2 * 4 * (32 * 32 + 32)  # 2 layers x 4 heads x (Z, k)
    assert isinstance(saved["samples"]["ntk"], str) and saved["samples"]["ntk"]
