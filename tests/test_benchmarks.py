"""The benchmarks in their --quick form: NTK speed/memory (bench_ntk_speed.py), RankGen decoding speed
(bench_rankgen_loop.py) and RankGen quality (bench_rankgen_quality.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """A benchmarks/ module, loaded from its file; benchmarks/ goes on sys.path as ``python benchmarks/<name>.py``
    puts it, for the scripts that import a sibling (profile_rankgen_loop.py imports bench_rankgen_loop.py)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return _load("bench_ntk_speed")


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


def test_ntk_speed_inference_timings_and_summary(tmp_path):
    """--inference adds prefill and decode timings (the GPU preset's default); the summary reads the issue's targets."""
    bench = load_bench()
    out = tmp_path / "inference.json"
    bench.main(["--quick", "--inference", "--lengths", "64", "--variants", "base", "ntk-fused", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["inference"] is True
    for variant in ("base", "ntk-fused"):
        result = report["results"][variant]["64"]
        assert result["status"] == "ok" and "inference_error" not in result, result
        assert result["infer_ms"] > 0 and result["decode_ms"] > 0 and len(result["infer_ms_all"]) == 2, result
    assert report["results"]["ntk-fused"]["64"]["attention_path"] == "fused"
    assert set(report["summary"]["fused_infer_vs_base"]) == {"64"}
    table = bench.format_table(64, {v: report["results"][v]["64"] for v in ("base", "ntk-fused")})
    assert "infer ms" in table and "decode ms" in table


def test_ntk_speed_summary_and_gpu_preset():
    bench = load_bench()
    ok = {"status": "ok"}
    results = {
        "base": {"1024": {**ok, "step_ms": 10.0, "infer_ms": 4.0}, "2048": {**ok, "step_ms": 20.0, "infer_ms": 8.0}},
        "ntk-fused": {
            "1024": {**ok, "step_ms": 10.5, "infer_ms": 4.1, "peak_mib": 100.0},
            "2048": {**ok, "step_ms": 21.0, "infer_ms": 8.2, "peak_mib": 200.0},
        },
        "lora-r8": {"1024": {**ok, "step_ms": 11.0}, "2048": {"status": "oom"}},
    }
    summary = bench.summarize(results)
    assert summary["fused_step_vs_base"] == {"1024": 1.05, "2048": 1.05}
    assert summary["fused_step_vs_lora_r8"] == {"1024": 10.5 / 11.0}
    assert summary["fused_memory_growth_per_length"] == {"1024->2048": 1.0}  # linear
    assert summary["fused_infer_vs_base"]["2048"] == 8.2 / 8.0
    gpu = bench.PRESETS["gpu"]
    assert gpu["device"] == "cuda" and {4096, 32768} <= set(gpu["lengths"])
    # The GPU preset's ntk-fused variant asks for the fused path (no silent "auto" fallback to the reference).
    task = {
        "variant": "ntk-fused",
        "device": "meta",
        "dtype": "bfloat16",
        "model": {**gpu["model"], "num_hidden_layers": 1},
    }
    model, _ = bench._build_model(task)
    assert model.peft_config["default"].attention_backend == "fused"


# --------------------------------------------------------------------------------------------------------------------
# RankGen: decoding speed (benchmarks/bench_rankgen_loop.py) and quality (benchmarks/bench_rankgen_quality.py)


def test_quick_rankgen_loop_benchmark_counts_forward_calls(tmp_path):
    """One forward per new token for nucleus, the batched B·N call, rerank and beam; the official-style loop one per
    token per beam per prompt; scoring rounds every L tokens."""
    bench = _load("bench_rankgen_loop")
    out = tmp_path / "loop.json"
    bench.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    new_tokens, beams, samples, every = 40, bench.BEAMS, bench.SAMPLES, bench.EVERY
    assert report["config"]["batch_sizes"] == [1, 8] and report["config"]["max_new_tokens"] == new_tokens
    for batch in ("1", "8"):
        r = report["results"][batch]
        assert set(r) == set(bench.PEERS)
        for peer in ("forward-only", "nucleus", "sampling-BxN", "rerank", "beam"):
            assert r[peer]["forward_calls"] == new_tokens, (batch, peer)
        # the prompts prefilled once (one row each), then B·N rows per prompt for every further token
        prompts, rows = int(batch), int(batch) * beams * samples
        assert r["forward-only"]["rows_per_forward_mean"] == (prompts + (new_tokens - 1) * rows) / new_tokens
        assert r["official-style"]["forward_calls"] == int(batch) * beams * new_tokens
        assert r["sampling-BxN"]["rows_per_forward_mean"] == int(batch) * beams * samples
        assert r["beam"]["scorer_calls"] == new_tokens // every and r["rerank"]["scorer_calls"] == 1
        assert r["official-style"]["scorer_calls"] == int(batch) * (new_tokens // every)
        # the prompt is prefilled once per prompt, not once per sample
        assert r["beam"]["tokens_fed"] < r["sampling-BxN"]["tokens_fed"]
        assert all(t > 0 for p in r.values() for t in p["seconds_all"])
        ratios = report["ratios"][batch]
        assert ratios["official_over_beam_forward_calls"] == int(batch) * beams
        assert ratios["beam_over_sampling_BxN_time"] > 0
        forward_only = r["forward-only"]["seconds"]
        assert ratios["official_over_forward_only_time"] == r["official-style"]["seconds"] / forward_only
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_official_style_peer_calls_generate_as_the_released_loop_does():
    """Per prompt, round and beam: one ``generate`` on the re-tokenised prompt + beam text, asking for scores and a
    dict output as the released ``beam_search`` does."""
    import torch

    bench = _load("bench_rankgen_loop")
    tok = bench.build_tokenizer(bench.corpus()[:40], vocab_size=300)
    model = bench.build_model(tok)
    calls = []
    generate = model.generate

    def spy(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "attention_mask"})
        return generate(**kwargs)

    model.generate = spy

    class SameScore:
        def score(self, prefixes, continuations):
            return torch.zeros(len(continuations))

    no_specials = [tok.pad_token_id, tok.unk_token_id, tok.eos_token_id]  # so that no beam ends early
    gen_kwargs = {"do_sample": True, "top_p": 0.9, "suppress_tokens": no_specials, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    texts = bench.official_style(model, tok, SameScore(), ["def f(x):", "class A:"], gen_kwargs, 2 * bench.EVERY)
    assert len(texts) == 2
    assert len(calls) == 2 * 2 * bench.BEAMS  # prompts x rounds x beams
    for call in calls:
        assert call["output_scores"] is True and call["return_dict_in_generate"] is True
        assert call["num_return_sequences"] == bench.SAMPLES and call["max_new_tokens"] == bench.EVERY
    # the second round re-feeds the whole prompt plus the surviving beam's 20 tokens (re-tokenised: about as many)
    first, second = calls[0]["input_ids"].shape[1], calls[bench.BEAMS]["input_ids"].shape[1]
    assert second > first


def test_rankgen_loop_benchmark_presets_vocabulary_and_prompt_cut(tmp_path):
    bench = _load("bench_rankgen_loop")
    args = bench.parse_args(["--preset", "paper", "--hidden=96", "--repeats", "2"])
    assert (args.hidden, args.layers, args.vocab_size, args.prompt_tokens, args.new_tokens) == (96, 12, 50257, 256, 115)
    assert args.repeats == 2 and args.batch_sizes == [1]
    out = tmp_path / "loop.json"
    report = bench.main(
        [
            "--quick",
            "--vocab-size",
            "12000",
            "--prompt-tokens",
            "12",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "21",
            "--out",
            str(out),
        ]
    )
    config = report["config"]
    assert config["vocab_size"] == 12000  # the reference docs alone stop near 9,200 tokens: the stdlib source is used
    assert all(abs(n - 12) <= 1 for n in config["prompt_tokens"])  # decode/re-encode may move one boundary
    assert len(config["nucleus_sizes_at_prompt_end"]) == len(bench.PROMPT_SPECS)
    assert report["results"]["1"]["beam"]["forward_calls"] == 21


def test_quick_sampling_benchmark(tmp_path):
    bench = _load("bench_sampling")
    report = bench.main(["--quick", "--out", str(tmp_path / "sampling.json")])
    rows = report["results"]
    assert [r["setting"] for r in rows] == list(bench.SETTINGS)
    assert all(r["transformers_ms"] > 0 and r["ours_ms"] > 0 for r in rows)
    kept = {r["setting"]: r["nucleus_median"] for r in rows}
    # the spreads give the range of nucleus sizes the table claims: peaked rows keep far fewer tokens than flat ones
    assert kept["top-p 0.9, peaked"] < kept["top-p 0.9, medium"] < kept["top-p 0.9, flat"]
    assert kept["top-k 50 + top-p 0.9"] <= 50


def test_quick_rankgen_quality_benchmark(tmp_path):
    bench = _load("bench_rankgen_quality")
    out = tmp_path / "quality.json"
    report = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == set(bench.METHODS)
    results = report["results"]
    # the scorer chooses: reranked and beam-searched continuations score higher than plain samples
    assert results["rerank-20"]["rankgen_score"]["mean"] > results["nucleus"]["rankgen_score"]["mean"]
    assert results["beam"]["rankgen_score"]["mean"] > results["nucleus"]["rankgen_score"]["mean"]
    for method in bench.METHODS:
        for key in ("mauve", "mauve_lm_features"):  # MiniLM features, and the small LM's own
            mauve = results[method][key]
            assert mauve is None or 0 <= mauve["mean"] <= 1
        assert 0 <= results[method]["repetition"]["mean"] <= 1
    for kind in ("in_document", "generated"):
        assert 0 <= report["identification_accuracy"][kind]["accuracy"] <= 1
    assert report["scorer"]["last_loss"] < report["scorer"]["first_loss"]


def test_quick_rankgen_loop_profile(tmp_path):
    """benchmarks/profile_rankgen_loop.py on CPU: time, aten ops and top ops per step for RankGen's beam search and one
    batched B·N sampling call; the beam search's ordinary decode steps read the device once."""
    profile = _load("profile_rankgen_loop")
    out = tmp_path / "profile.json"
    report = profile.main(["--quick", "--device", "cpu", "--threads", "1", "--top", "3", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results.keys() == {"beam", "sampling-BxN"}
    for r in results.values():
        assert r["steps"] == 24 and r["wall_ms_per_step"] > 0 and r["aten_ops_per_step"] > 0
        assert r["cuda_kernels_per_step"] is None and "cuda_syncs" not in r and len(r["top_self_cpu"]) == 3
    assert report["results"]["beam"]["host_reads"]["median_per_decode_step"] == 1


def test_causal_lm_adaptation_methods_and_their_default_rates():
    bench = _load("causal_lm_adaptation")
    favor = bench.method_config("ntk-relative-favor")
    assert (favor.prefix_mass, favor.feature_map) == ("relative", "favor")
    assert bench.method_config("lora-value").target_modules == {"v_proj"}
    args = bench.parse_args(["--methods", "ntk-relative-favor", "lora-value", "--lr", "lora-value=1e-2"])
    assert args.rates["ntk-relative-favor"] == 1e-2 and args.rates["ntk-relative"] == 3e-3
    assert args.rates["lora-value"] == 1e-2 and args.rates["lora"] == 1e-3
    assert bench.method_config("ntk-relative-favor-32").feature_dim == 32
    # the value-only control and the half-width variant run only when named
    default_methods = bench.parse_args([]).methods
    assert "ntk-relative-favor" in default_methods
    assert "lora-value" not in default_methods and "ntk-relative-favor-32" not in default_methods


@pytest.mark.real_model
def test_quick_causal_lm_adaptation_on_smollm2(tmp_path, smollm2_path, two_threads):
    """benchmarks/causal_lm_adaptation.py --quick: NTK and LoRA on the real SmolLM2, curves, diagnostics, JSON + PNG."""
    bench = _load("causal_lm_adaptation")
    report = bench.main(["--quick", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "causal_lm_adaptation_quick.json").read_text())
    assert saved["summary"] == report["summary"] and set(saved["summary"]) == {"ntk", "lora"}
    assert saved["summary"]["ntk"]["trainable_params"] == 30 * 9 * (64 * 64 + 64)
    assert saved["summary"]["lora"]["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
    ntk = saved["runs"]["ntk"][0]
    assert [step for step, _ in ntk["validation_curve"]] == [0, 2, 4]
    assert ntk["prefix_share"][0]["max"] == 0.0 < ntk["prefix_share"][-1]["mean"]  # zeros init: no prefix at first
    assert all(1 < r[0]["test_ppl"] < 100 for r in saved["runs"].values())
    assert (tmp_path / "causal_lm_adaptation_quick.png").is_file()
