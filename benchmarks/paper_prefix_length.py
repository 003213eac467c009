"""How well does NTK-Attention stand in for a long prefix?  The paper's Sec. 4.4 experiment, redone.

Setup (as in the paper where it says, our choice where it does not)
-----------------------------------------------------------------
One attention head, model and head width ``d = 64``, input length ``L = 128``, random frozen ``W_Q, W_K, W_V``
(entries N(0, 1/d)), input tokens and prefix tokens N(0, 1) in model space; keys/values of the prefix are the prefix
tokens through the same ``W_K, W_V``. The input attends to itself (bidirectionally, no mask) and to a random prefix of
``m`` tokens, ``m ∈ {2, 4, ..., 2^k}``. The *true* output is softmax attention over ``[prefix; input]``. It is
computed by streaming the prefix in chunks with a running log-sum-exp, so the ``(m + L)²`` score matrix is never
built and memory does not grow with ``m``; the prefix itself is regenerated chunk by chunk from seeds and never held.

Every method sees the same frozen weights, the same training inputs and is scored on *fresh* test inputs (drawn
independently of the training and validation inputs). The error is the relative Frobenius error
``||out - true|| / ||true||`` over all test outputs.

Methods (``d² + d = 4160`` parameters for NTK; the truncated prefixes get ``m' = (d² + d) // (2d) = 32`` tokens, i.e.
``2·m'·d = 4096`` key/value numbers):

* ``no_prefix``: attention over the input only (what the model does without any prefix); the ceiling.
* ``phi_closed_form``: NTK-Attention with the untrained kernel closed form ``Z = Σ φ(k_p) v_pᵀ``, ``k = Σ φ(k_p)``.
* ``ntk_trained``: NTK-Attention, ``Z`` and ``k`` trained with Adam to match the true output (paper: Adam, lr 1e-3).
  ``Z`` and ``k`` are sums over ``m`` prefix tokens, so they are trained as ``Z = m·Ẑ``, ``k = m·|k̂|``: the same
  function class, with a step size that scales with ``m`` (plain Adam moves each entry by about lr per step and cannot
  reach entries of size ~m in a fixed budget). Initialised as the official code does, N(0, 1)·1e-4.
  (Starting from the closed form instead was tried and trained worse: its error is ~1, no better than no prefix.)
* ``ntk_trained_paper_init``: the literal recipe: raw ``Z``, ``k`` (``k`` used as ``|k|``), initialised N(0, 1)·1e-4
  as in the official code, Adam.
* ``truncated_last``: the last ``m'`` real prefix tokens (exact attention over them and the input).
* ``prefix_tuned``: ``m'`` trained key/value vectors (prefix tuning / P-Tuning v2 for one head), started at the last
  ``m'`` real prefix tokens. For ``m <= m'`` both truncated methods hold the whole prefix and are exact.

Each trained method runs for the same number of steps at each learning rate of a small grid; the learning rate with the
lowest *validation* error is chosen and its *test* error reported (so test inputs never choose anything).

How to run
----------
    python benchmarks/paper_prefix_length.py --quick        # ~1 min on one CPU thread, m up to 2^10
    python benchmarks/paper_prefix_length.py                # CPU preset, m up to 2^16 (45 min on a busy shared core)
    python benchmarks/paper_prefix_length.py --full         # GPU: m up to 2^18, 3 seeds, longer training

It prints a table (error per method and m, and its ratio to ``phi_closed_form``) and writes
``benchmarks/results/paper_prefix_length[_quick|_full].json`` and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import peft_ntk
from ntk_rankgen_assets import bench
from ntk_rankgen_assets.training import quiet_run

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = (
    "no_prefix",
    "phi_closed_form",
    "ntk_trained",
    "ntk_trained_paper_init",
    "truncated_last",
    "prefix_tuned",
)
TRAINED_METHODS = ("ntk_trained", "ntk_trained_paper_init", "prefix_tuned")


@dataclass
class Settings:
    """Sizes of one run (see the presets in :data:`PRESETS`)."""

    dim: int = 64
    length: int = 128
    max_log2_m: int = 16
    train_inputs: int = 256
    val_inputs: int = 32
    test_inputs: int = 64
    steps: int = 800
    batch_size: int = 16
    lrs: Sequence[float] = field(default_factory=lambda: (1e-3, 1e-2))
    seeds: Sequence[int] = field(default_factory=lambda: (0,))
    chunk: int = 4096
    device: str = "cpu"

    @property
    def prefix_lengths(self) -> list[int]:
        return [2**i for i in range(1, self.max_log2_m + 1)]

    @property
    def truncated_tokens(self) -> int:
        """Tokens of a truncated prefix with NTK's parameter count: ``2·m'·d ≈ d² + d``."""
        return (self.dim * self.dim + self.dim) // (2 * self.dim)


PRESETS: dict[str, Settings] = {
    "quick": Settings(max_log2_m=10, train_inputs=48, val_inputs=16, test_inputs=32, steps=250, lrs=(1e-3, 1e-2)),
    "cpu": Settings(lrs=(1e-3, 3e-3, 1e-2)),
    "full": Settings(
        max_log2_m=18,
        train_inputs=1024,
        val_inputs=128,
        test_inputs=256,
        steps=5000,
        batch_size=32,
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        seeds=(0, 1, 2),
        chunk=16384,
        device="cuda",
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic layer and the streamed exact attention
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Head:
    """Frozen random projections of one attention head."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor

    @classmethod
    def random(cls, dim: int, seed: int, device: str = "cpu") -> Head:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(3, dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        return cls(*(x.to(device) for x in w))

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tokens @ self.w_q, tokens @ self.w_k, tokens @ self.w_v


def prefix_chunks(
    head: Head, m: int, seed: int, chunk: int, device: str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the prefix's (keys, values) in chunks of at most ``chunk`` tokens, float64.

    Chunk ``c`` of the prefix of length ``m`` under ``seed`` is drawn from its own generator seeded from
    ``(seed, m, c)``, so the prefix can be read again (it depends on ``chunk`` too) and is never held as a whole.
    """
    for index, start in enumerate(range(0, m, chunk)):
        size = min(chunk, m - start)
        gen = torch.Generator().manual_seed(((seed * 1_000_003 + m) * 1_000_003 + index) % 2**63)
        tokens = torch.randn(size, head.w_k.shape[0], generator=gen, dtype=torch.float64).to(device)
        yield tokens @ head.w_k, tokens @ head.w_v


@dataclass
class PrefixSummary:
    """What one pass over the prefix gives: exact attention over it for given queries, and its compressed forms."""

    out: torch.Tensor  # (n, d) softmax attention output over the prefix alone
    lse: torch.Tensor  # (n,) log-sum-exp of the scaled scores over the prefix
    z: torch.Tensor  # (d_phi, d) closed-form Σ φ(k_p) v_pᵀ
    k: torch.Tensor  # (d_phi,) closed-form Σ φ(k_p)
    tail_keys: torch.Tensor  # (min(m, m'), d) the last prefix keys
    tail_values: torch.Tensor


def summarise_prefix(
    queries: torch.Tensor,
    chunks: Iterator[tuple[torch.Tensor, torch.Tensor]],
    tail: int,
    query_block: int = 8192,
) -> PrefixSummary:
    """Stream the prefix once: running log-sum-exp attention for ``queries`` (n, d), φ-sums, and the last ``tail`` tokens.

    Memory is O(n·d + chunk·(d + query_block)); the (n × m) score matrix is never built. Scores are computed in
    ``queries.dtype`` (float32 keeps long prefixes affordable on CPU); the running sums are float64.
    """
    n, dim = queries.shape
    scaling = dim**-0.5
    out = torch.zeros(n, dim, dtype=torch.float64, device=queries.device)
    lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=queries.device)
    z = k = None
    tail_k = queries.new_zeros(0, dim, dtype=torch.float64)
    tail_v = tail_k
    for keys, values in chunks:
        keys_c, values_c = keys.to(queries.dtype), values.to(queries.dtype)
        for start in range(0, n, query_block):
            rows = slice(start, start + query_block)
            scores = (queries[rows] @ keys_c.T) * scaling
            chunk_lse = torch.logsumexp(scores, dim=-1).double()
            chunk_out = (torch.softmax(scores, dim=-1) @ values_c).double()
            new_lse = torch.logaddexp(lse[rows], chunk_lse)
            out[rows] = (
                out[rows] * torch.exp(lse[rows] - new_lse)[:, None]
                + chunk_out * torch.exp(chunk_lse - new_lse)[:, None]
            )
            lse[rows] = new_lse
        chunk_z, chunk_k = peft_ntk.prefix_state_from_keys_values(keys[None], values[None], "elu")
        z = chunk_z[0] if z is None else z + chunk_z[0]
        k = chunk_k[0] if k is None else k + chunk_k[0]
        tail_k = torch.cat([tail_k, keys])[-tail:]
        tail_v = torch.cat([tail_v, values])[-tail:]
    if z is None:
        raise ValueError("the prefix is empty; use m >= 1")
    return PrefixSummary(out, lse, z, k, tail_k, tail_v)


def combine_with_input(
    in_out: torch.Tensor, in_lse: torch.Tensor, pre_out: torch.Tensor, pre_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over [prefix; input] from the two parts' (out, lse); also returns the input's share of the mass."""
    w = torch.sigmoid(in_lse - pre_lse)[..., None]
    return w * in_out + (1 - w) * pre_out, w[..., 0]


def input_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention of the input (N, L, d) over itself."""
    out, lse, _ = peft_ntk.softmax_attention_with_lse(q[:, None], k[:, None], v[:, None])
    return out[:, 0], lse[:, 0]


def exact_attention_materialised(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
) -> torch.Tensor:
    """The (m + L)² reference for tests: softmax over the concatenated [prefix; input] keys of each input."""
    n = q.shape[0]
    keys = torch.cat([prefix_k.expand(n, -1, -1), k], dim=1)
    values = torch.cat([prefix_v.expand(n, -1, -1), v], dim=1)
    scores = q @ keys.transpose(1, 2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ values


# ----------------------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------------------


def ntk_output(q, k, v, z, kvec) -> torch.Tensor:
    """NTK-Attention of inputs (N, L, d) with a prefix state ``z`` (r, d), ``kvec`` (r,) through the package's op."""
    return peft_ntk.ntk_attention(q[:, None], k[:, None], v[:, None], z[None], kvec[None])[:, 0]


def prefix_output(q, k, v, prefix_k, prefix_v) -> torch.Tensor:
    """Exact attention of the inputs over [given prefix keys/values; input], from (out, lse) parts."""
    in_out, in_lse = input_attention(q, k, v)
    out, lse, _ = peft_ntk.softmax_attention_with_lse(q[:, None], prefix_k[None, None], prefix_v[None, None])
    return combine_with_input(in_out, in_lse, out[:, 0], lse[:, 0])[0]


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(pred - target) / torch.linalg.vector_norm(target))


@dataclass
class Split:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q[index], self.k[index], self.v[index], self.target[index]


def make_trainable(method: str, summary: PrefixSummary, m: int):
    """Initial trainable tensors and the function mapping them (and q, k, v) to outputs."""
    if method in ("ntk_trained", "ntk_trained_paper_init"):
        # Both start where the official code does (N(0, 1)·1e-4, i.e. practically no prefix); they differ in step size.
        gen = torch.Generator().manual_seed(1234)
        params = [
            (torch.randn(summary.z.shape, generator=gen) * 1e-4).to(summary.z.device).requires_grad_(),
            (torch.randn(summary.k.shape, generator=gen) * 1e-4).to(summary.z.device).requires_grad_(),
        ]
        scale = m if method == "ntk_trained" else 1

        def forward(q, k, v, ps):
            return ntk_output(q, k, v, scale * ps[0], scale * ps[1].abs())

    elif method == "prefix_tuned":
        params = [
            summary.tail_keys.float().clone().requires_grad_(),
            summary.tail_values.float().clone().requires_grad_(),
        ]

        def forward(q, k, v, ps):
            return prefix_output(q, k, v, ps[0], ps[1])

    else:
        raise ValueError(f"{method!r} is not a trained method; trained methods: {TRAINED_METHODS}")
    return params, forward


def train_method(
    method: str,
    summary: PrefixSummary,
    m: int,
    train: Split,
    val: Split,
    test: Split,
    lr: float,
    s: Settings,
    seed: int,
) -> dict[str, float]:
    params, forward = make_trainable(method, summary, m)
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(s.steps):
        index = torch.randint(0, train.q.shape[0], (s.batch_size,), generator=gen).to(train.q.device)
        q, k, v, target = train.take(index)
        loss = torch.mean((forward(q, k, v, params) - target) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {
            "val": relative_error(forward(val.q, val.k, val.v, params), val.target),
            "test": relative_error(forward(test.q, test.k, test.v, params), test.target),
            "train": relative_error(forward(train.q, train.k, train.v, params), train.target),
        }


def run_one(s: Settings, seed: int, m: int, head: Head, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """All methods at one prefix length ``m`` for one seed."""
    started = time.perf_counter()
    projected = {name: head.project(x) for name, x in inputs.items()}
    queries = torch.cat([p[0].reshape(-1, s.dim) for p in projected.values()]).float()
    summary = summarise_prefix(queries, prefix_chunks(head, m, seed, s.chunk, s.device), s.truncated_tokens)
    splits: dict[str, Split] = {}
    share = {}
    offset = 0
    for name, (q, k, v) in projected.items():
        n = q.shape[0] * q.shape[1]
        pre_out = summary.out[offset : offset + n].reshape(q.shape)
        pre_lse = summary.lse[offset : offset + n].reshape(q.shape[:2])
        offset += n
        in_out, in_lse = input_attention(q, k, v)
        target, input_share = combine_with_input(in_out, in_lse, pre_out, pre_lse)
        share[name] = float(1 - input_share.mean())
        splits[name] = Split(q.float(), k.float(), v.float(), target.float())
    stream_s = time.perf_counter() - started

    result: dict[str, Any] = {"prefix_mass_share": share["test"], "stream_s": stream_s, "methods": {}}
    train, val, test = splits["train"], splits["val"], splits["test"]
    with torch.no_grad():
        fixed = {
            "no_prefix": input_attention(test.q, test.k, test.v)[0],
            "phi_closed_form": ntk_output(test.q, test.k, test.v, summary.z.float(), summary.k.float()),
            "truncated_last": prefix_output(
                test.q, test.k, test.v, summary.tail_keys.float(), summary.tail_values.float()
            ),
        }
    for method, pred in fixed.items():
        result["methods"][method] = {"test": relative_error(pred, test.target)}
    for method in TRAINED_METHODS:
        per_lr = {}
        for lr in s.lrs:
            per_lr[str(lr)] = train_method(method, summary, m, train, val, test, lr, s, seed)
        best = min(per_lr, key=lambda lr: per_lr[lr]["val"])
        result["methods"][method] = {"test": per_lr[best]["test"], "best_lr": float(best), "per_lr": per_lr}
    result["seconds"] = time.perf_counter() - started
    return result


def run(s: Settings, progress: bool = True) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {str(m): {} for m in s.prefix_lengths}
    for seed in s.seeds:
        head = Head.random(s.dim, seed, s.device)
        gen = torch.Generator().manual_seed(10_000 + seed)
        inputs = {
            name: torch.randn(n, s.length, s.dim, generator=gen, dtype=torch.float64).to(s.device)
            for name, n in (("train", s.train_inputs), ("val", s.val_inputs), ("test", s.test_inputs))
        }
        for m in s.prefix_lengths:
            res = run_one(s, seed, m, head, inputs)
            results[str(m)][str(seed)] = res
            if progress:
                errs = "  ".join(f"{k}={v['test']:.3f}" for k, v in res["methods"].items())
                print(f"seed {seed} m={m:>7} ({res['seconds']:.0f}s)  {errs}", flush=True)
    summary = {}
    for m, per_seed in results.items():
        summary[m] = {}
        for method in METHODS:
            errs = [per_seed[seed]["methods"][method]["test"] for seed in per_seed]
            mean = sum(errs) / len(errs)
            std = (sum((e - mean) ** 2 for e in errs) / (len(errs) - 1)) ** 0.5 if len(errs) > 1 else 0.0
            summary[m][method] = {"mean": mean, "std": std}
        summary[m]["prefix_mass_share"] = sum(r["prefix_mass_share"] for r in per_seed.values()) / len(per_seed)
    return {"per_seed": results, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Plain answers to the paper's claim (trained NTK error falls as m grows) and to the comparisons."""
    ms = sorted(summary, key=int)
    ntk = [summary[m]["ntk_trained"]["mean"] for m in ms]
    closed = [summary[m]["phi_closed_form"]["mean"] for m in ms]
    falls = ntk[-1] < ntk[0]
    monotone_steps = sum(b <= a * 1.02 for a, b in zip(ntk, ntk[1:]))
    beats_truncation = [
        m
        for m in ms
        if summary[m]["ntk_trained"]["mean"]
        < min(summary[m]["truncated_last"]["mean"], summary[m]["prefix_tuned"]["mean"])
    ]
    return {
        "ntk_error_at_smallest_m": ntk[0],
        "ntk_error_at_largest_m": ntk[-1],
        "ntk_error_falls_with_m": falls,
        "ntk_nonincreasing_steps": f"{monotone_steps}/{len(ntk) - 1}",
        "trained_beats_closed_form_at_every_m": all(a < b for a, b in zip(ntk, closed)),
        "m_where_ntk_beats_both_truncated_prefixes": [int(m) for m in beats_truncation],
    }


def print_table(summary: dict[str, Any]) -> None:
    header = f"{'m':>7} {'prefix share':>12} " + " ".join(f"{m[:16]:>16}" for m in METHODS)
    print(header)
    print("-" * len(header))
    for m in sorted(summary, key=int):
        row = summary[m]
        base = row["phi_closed_form"]["mean"]
        cells = " ".join(f"{row[meth]['mean']:8.4f} ({row[meth]['mean'] / base:4.2f}x)" for meth in METHODS)
        print(f"{m:>7} {row['prefix_mass_share']:12.3f} {cells}")
    print("(relative test error; in brackets: ratio to phi_closed_form measured in the same run)")


def plot(summary: dict[str, Any], path: Path, title: str) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    ms = sorted(summary, key=int)
    x = [int(m) for m in ms]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Truncated prefixes are exact (error ~1e-7, rounding) while m <= m'; leave those points out of the log plot.
    floor = 1e-4
    for method in METHODS:
        points = [(xi, summary[m][method]["mean"], summary[m][method]["std"]) for xi, m in zip(x, ms)]
        points = [p for p in points if p[1] > floor]
        if points:
            xs, mean, std = zip(*points)
            ax.errorbar(xs, mean, yerr=std, marker="o", markersize=3, capsize=2, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.text(
        0.01,
        0.01,
        "truncated_last / prefix_tuned are exact (not drawn) while m <= m'",
        transform=ax.transAxes,
        fontsize=7,
    )
    bench.label_axes(ax, "prefix length m", "relative error on fresh inputs", title, title_size=9)
    return bench.save_figure(fig, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = bench.argument_parser(
        __doc__,
        quick="smoke-test sizes (< 3 min on one CPU thread)",
        full="the paper's sizes (m up to 2^18); meant for a GPU",
    )
    parser.add_argument("--max-log2-m", type=int, help="largest prefix length is 2^this")
    parser.add_argument("--steps", type=int, help="optimizer steps per trained method and learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-inputs", type=int)
    parser.add_argument("--val-inputs", type=int)
    parser.add_argument("--test-inputs", type=int)
    parser.add_argument("--dim", type=int, help="head width d (paper: 64)")
    parser.add_argument("--length", type=int, help="input length L (paper: 128)")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid, chosen per method on validation")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--chunk", type=int, help="prefix tokens streamed at a time")
    parser.add_argument("--device", help="cpu or cuda (default: cuda for --full when available, else cpu)")
    parser.add_argument("--out", type=Path, help="JSON path (the PNG goes next to it)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[str, Settings]:
    preset = "quick" if args.quick else "full" if args.full else "cpu"
    s = Settings(**asdict(PRESETS[preset]))
    for name in ("max_log2_m", "steps", "batch_size", "train_inputs", "val_inputs", "test_inputs", "dim", "length"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(s, name, value)
    for name in ("lrs", "seeds"):
        if getattr(args, name) is not None:
            setattr(s, name, tuple(getattr(args, name)))
    if args.chunk is not None:
        s.chunk = args.chunk
    if args.device is not None:
        s.device = args.device
    if s.device == "cuda" and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        s.device = "cpu"
    return preset, s


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset, s = settings_from_args(args)
    with quiet_run(args.threads):
        started = time.perf_counter()
        report = run(s)
        wall = time.perf_counter() - started
        env = bench.environment(s.device)
    report.update(
        {
            "preset": preset,
            "settings": asdict(s) | {"truncated_tokens": s.truncated_tokens, "ntk_params": s.dim * s.dim + s.dim},
            "verdict": verdict(report["summary"]),
            "wall_s": wall,
            "command": "python benchmarks/paper_prefix_length.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "environment": env,
        }
    )
    print_table(report["summary"])
    print(json.dumps(report["verdict"], indent=1))
    print(f"wall time {wall:.0f} s")
    suffix = "" if preset == "cpu" else f"_{preset}"
    out = args.out or RESULTS_DIR / f"paper_prefix_length{suffix}.json"
    title = f"NTK vs prefix length (d={s.dim}, L={s.length}, {len(s.seeds)} seed(s), {s.steps} steps)"
    bench.save_report(report, out, lambda png: plot(report["summary"], png, title), indent=1)
    return report


if __name__ == "__main__":
    main()
