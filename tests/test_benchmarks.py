"""The speed/memory benchmark (benchmarks/bench_ntk_speed.py) in its --quick form."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ntk_speed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_ntk_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_measures_every_variant_and_length(tmp_path):
    bench = load_bench()
    out = tmp_path / "q.json"
    bench.main(["--quick", "--out", str(out)])

    report = json.loads(out.read_text())
    assert set(report["variants"]) == set(bench.QUICK_VARIANTS)
    assert report["lengths"] == [128, 256]
    for variant in bench.QUICK_VARIANTS:
        for length in report["lengths"]:
            result = report["results"][variant][str(length)]
            assert result["status"] == "ok", result
            assert result["step_ms"] > 0 and all(t > 0 for t in result["step_ms_all"]), result
            assert result["peak_mib"] >= 0, result

    config = report["config"]
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    for length in report["lengths"]:
        fused = report["results"]["ntk-fused"][str(length)]
        assert fused["trainable_params"] == config["num_hidden_layers"] * heads * (head_dim**2 + head_dim)
        assert fused["attention_path"] == "fused"
        assert report["results"]["ntk-reference"][str(length)]["attention_path"] == "reference"
        assert report["results"]["base"][str(length)]["trainable_params"] == 0
    assert {"torch", "transformers", "peft", "device", "threads"} <= set(report["environment"])
