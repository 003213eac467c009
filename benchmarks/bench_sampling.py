"""Drawing a token with top-p / top-k: transformers' warpers + ``torch.multinomial`` against ``TokenSampler``.

Both draw from the same distribution (tests/test_sampling.py); this measures what it costs. Rows of Gaussian logits
with a given spread stand in for an LM's: the wider the spread, the fewer tokens top-p keeps (the table shows how
many). Time is the median over ``--repeats`` calls after one warm-up, on one CPU thread (``--threads``; or CUDA,
synchronised).

    python benchmarks/bench_sampling.py            # 50,257-token vocabulary, 20 and 160 rows (~1 min)
    python benchmarks/bench_sampling.py --quick    # what the tests run

Writes ``benchmarks/results/sampling_{device}.json`` and ``.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import torch
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from ntk_rankgen_assets import bench
from ntk_rankgen_assets.training import quiet_run
from rankgen_logits.sampling import TokenSampler

ROOT = Path(__file__).resolve().parent
SETTINGS = {  # name: (warpers, logit spread)
    "top-p 0.9, peaked": ([TopPLogitsWarper(0.9)], 6.0),
    "top-p 0.9, medium": ([TopPLogitsWarper(0.9)], 4.5),
    "top-p 0.9, flat": ([TopPLogitsWarper(0.9)], 3.0),
    "top-k 50 + top-p 0.9": ([TopKLogitsWarper(50), TopPLogitsWarper(0.9)], 1.5),
}


def seconds(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(bench.timed_calls(fn, repeats=repeats, warmup=1, device=device))


def measure(vocab: int, rows_list: list[int], repeats: int, device: torch.device) -> list[dict]:
    results = []
    for rows in rows_list:
        ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        for name, (warpers, spread) in SETTINGS.items():
            logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul(spread).to(device)
            processors = LogitsProcessorList(warpers)
            sampler = TokenSampler(processors)
            kept = (sampler.probabilities(logits) > 0).sum(-1).float()

            def stock(processors=processors, logits=logits, ids=ids):
                return torch.multinomial(torch.softmax(processors(ids, logits), dim=-1), 1)

            transformers_s = seconds(stock, device, repeats)
            ours_s = seconds(lambda sampler=sampler, logits=logits, ids=ids: sampler(ids, logits), device, repeats)
            results.append(
                {
                    "rows": rows,
                    "setting": name,
                    "nucleus_median": float(kept.median()),
                    "nucleus_max": float(kept.max()),
                    "transformers_ms": 1e3 * transformers_s,
                    "ours_ms": 1e3 * ours_s,
                    "speedup": transformers_s / ours_s,
                }
            )
    return results


def main(argv=None) -> dict:
    parser = bench.argument_parser(__doc__, quick="a 5,000-token vocabulary, 20 rows, 3 repeats")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 50257 (quick 5000)")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="default 20 160 (quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (quick 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    vocab = args.vocab_size or (5000 if args.quick else 50257)
    rows_list = args.rows or ([20] if args.quick else [20, 160])
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.device(args.device)
    out = args.out or ROOT / "results" / f"sampling_{device.type}.json"
    with quiet_run(args.threads):
        results = measure(vocab, rows_list, repeats, device)
    threads = f"{args.threads} thread" + "s" * (args.threads > 1)
    print(f"Sampling one token per row, vocabulary {vocab:,}, {device} ({threads}), median of {repeats}")
    print(f"{'rows':>5}  {'setting':<22}{'kept (median/max)':>19}{'transformers ms':>17}{'ours ms':>9}{'x':>7}")
    for r in results:
        print(
            f"{r['rows']:>5}  {r['setting']:<22}{r['nucleus_median']:>10.0f} / {r['nucleus_max']:<6.0f}"
            f"{r['transformers_ms']:>17.2f}{r['ours_ms']:>9.2f}{r['speedup']:>7.1f}"
        )
    report = {
        "config": {"vocab_size": vocab, "rows": rows_list, "repeats": repeats, "quick": args.quick},
        "results": results,
        "environment": bench.environment(device, args.threads),
    }
    bench.save_report(report, out, lambda png: plot(report, png))
    return report


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    results = report["results"]
    labels = [f"{r['setting']}\n{r['rows']} rows, kept ~{r['nucleus_median']:.0f}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["transformers_ms"] for r in results], 0.4, label="transformers warpers")
    ax.bar([x + 0.2 for x in xs], [r["ours_ms"] for r in results], 0.4, label="TokenSampler")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per draw")
    ax.legend()
    ax.set_title(f"Top-p / top-k sampling, vocabulary {report['config']['vocab_size']:,}")
    return bench.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
