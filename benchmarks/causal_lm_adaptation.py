"""Domain adaptation of a real pretrained causal LM: NTK-Attention variants against LoRA r=8, same Trainer and budget.

What it does
------------
For each method and seed: a fresh SmolLM2-135M-Instruct (the embedded default; ``--model`` takes any Hub id or
folder), an adapter from ``get_peft_model``, the stock ``Trainer`` (AdamW, cosine decay, 10 % warm-up) on blocks of
Python's reference documentation (``pydoc_data.topics``, every 10th topic held out), then the held-out perplexity on
128-token blocks. A validation perplexity (other held-out blocks) is measured every ``--eval-every`` steps for the
learning curves; NTK runs also log the prefix's share of attention per layer (``peft_ntk.NTKDiagnosticsCallback``).

Methods: ``ntk`` (the default config: zeros init), ``ntk-small-random`` (the paper's N(0,1)·1e-4 init),
``ntk-pre-rope`` (phi on the query before its rotary embedding), ``ntk-relative`` (``prefix_mass="relative"``: the
real keys' mass counted as 1, so no row is taken over by the prefix),
``ntk-relative-favor`` (the relative mass with FAVOR+ features: the best NTK form here, at lr 1e-2), ``lora`` (r=8,
alpha 16, q_proj and v_proj) and ``lora-qkvo`` (r=8 on all four projections: about NTK's trainable-parameter count on
SmolLM2). Only when named: ``ntk-relative-favor-32`` (the same with 32 features instead of 64: half of Z, about
LoRA q,v's parameter count) and ``lora-value`` (r=8 on v_proj alone, a control: like a prefix it keeps the base
model's queries and keys, so it cannot change how tokens attend to each other).

Output: a table (mean ± std over seeds, trainable parameters, seconds), ``causal_lm_adaptation[_quick].json`` and a
PNG with the training loss, the validation perplexity and the NTK prefix share against the step.

    python benchmarks/causal_lm_adaptation.py                 # 7 methods x 3 seeds x 60 steps, ~70 min on 2 cores
    python benchmarks/causal_lm_adaptation.py --quick         # 2 methods, 1 seed, 4 steps (what the tests run)
    python benchmarks/causal_lm_adaptation.py --methods ntk lora --lr ntk=3e-3 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed

import peft_ntk
from ntk_rankgen_assets import bench
from ntk_rankgen_assets.models import causal_lm_path
from ntk_rankgen_assets.texts import python_reference_docs, split_documents, token_blocks
from ntk_rankgen_assets.training import logged_losses, perplexity, train_on_blocks

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "ntk": dict(),
    "ntk-small-random": dict(init_weights="small_random"),
    "ntk-pre-rope": dict(query_features="pre_rope"),
    "ntk-relative": dict(prefix_mass="relative"),
    "ntk-relative-favor": dict(prefix_mass="relative", feature_map="favor"),
    "ntk-relative-favor-32": dict(prefix_mass="relative", feature_map="favor", feature_dim=32),
    "lora": ["q_proj", "v_proj"],
    "lora-value": ["v_proj"],
    "lora-qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
CONTROL_METHODS = ("ntk-relative-favor-32", "lora-value")  # run only when named
# option: (quick, full)
DEFAULTS = {
    "methods": (["ntk", "lora"], [m for m in METHODS if m not in CONTROL_METHODS]),
    "seeds": ([0], [0, 1, 2]),
    "steps": (4, 60),
    "eval_blocks": (4, None),
    "eval_every": (2, 10),
}


def method_config(method: str):
    if method.startswith("lora"):
        return LoraConfig(r=8, lora_alpha=16, target_modules=METHODS[method], task_type="CAUSAL_LM")
    return peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", **METHODS[method])


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = bench.argument_parser(
        __doc__,
        quick="2 methods, 1 seed, 4 steps (what the tests run)",
        threads=None,
        threads_help="torch threads (default: every core, at most 4)",
    )
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64, help="training block length in tokens")
    parser.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="per-method learning rate")
    parser.add_argument("--eval-blocks", type=int, default=None, help="held-out 128-token test blocks (default: all)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default 10)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.block_size < 2 or 128 % args.block_size:
        parser.error(f"--block-size must divide 128 (the validation blocks are 128 tokens), got {args.block_size}")
    bench.fill_defaults(args, DEFAULTS)
    rates = {m: 1e-3 if m.startswith("lora") else peft_ntk.recommended_learning_rate(method_config(m)) for m in METHODS}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            parser.error(f"--lr takes METHOD=LR with METHOD one of {sorted(METHODS)}, got {item!r}")
        rates[method] = float(value)
    args.rates = rates
    return args


class Curves(TrainerCallback):
    """Validation perplexity every ``every`` steps (and at step 0)."""

    def __init__(self, blocks: torch.Tensor, every: int) -> None:
        self.blocks, self.every, self.points = blocks, every, []

    def _measure(self, model, step: int) -> None:
        was_training = model.training
        self.points.append((step, perplexity(model, self.blocks, batch_size=8)))
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(model, state.global_step)


def run_one(method: str, seed: int, data: dict[str, torch.Tensor], args, path: str) -> dict[str, Any]:
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, method_config(method))
    curves = Curves(data["validation"], args.eval_every)
    callbacks: list[TrainerCallback] = [curves]
    diagnostics = None
    if method.startswith("ntk"):
        diagnostics = peft_ntk.NTKDiagnosticsCallback({"input_ids": data["validation"][:2]}, every=args.eval_every)
        callbacks.append(diagnostics)
    trainer, seconds = _train(model, data["train"], args, method, seed, callbacks)
    result = {
        "test_ppl": perplexity(model, data["test"], batch_size=8),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": seconds,
        "losses": logged_losses(trainer),
        "validation_curve": curves.points,
    }
    if diagnostics is not None:
        result["prefix_share"] = [
            {"step": h["step"], "mean": statistics.fmean(h["share_mean"]), "max": max(h["share_max"])}
            for h in diagnostics.history
        ]
        result["diagnostics"] = diagnostics.history
    return result


def _train(model, blocks, args, method, seed, callbacks):
    return train_on_blocks(
        model,
        blocks,
        args.output_dir / f"runs_{method}_{seed}",
        steps=args.steps,
        lr=args.rates[method],
        batch_size=args.batch_size,
        seed=seed,
        logging_steps=max(1, args.eval_every // 2),
        callbacks=callbacks,
    )


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for method, results in runs.items():
        ppl = [r["test_ppl"] for r in results]
        summary[method] = {
            "test_ppl_mean": statistics.fmean(ppl),
            "test_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "trainable_params": results[0]["trainable_params"],
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in results),
        }
    return summary


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, (method, results) in enumerate(report["runs"].items()):
        color = f"C{i}"
        for j, r in enumerate(results):
            label = method if j == 0 else None
            steps = [(k + 1) * max(1, report["config"]["eval_every"] // 2) for k in range(len(r["losses"]))]
            axes[0].plot(steps, r["losses"], color=color, alpha=0.7, label=label)
            axes[1].plot(*zip(*r["validation_curve"]), color=color, alpha=0.7, marker="o", ms=3, label=label)
            if "prefix_share" in r:
                share = r["prefix_share"]
                axes[2].plot([s["step"] for s in share], [s["mean"] for s in share], color=color, label=label)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="validation perplexity (step 0: the base model)", xlabel="step")
    axes[2].set(title="NTK: mean prefix share of attention", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{report['model']} on Python's reference docs ({report['config']['steps']} steps, batch "
        f"{report['config']['batch_size']}x{report['config']['block_size']})",
        fontsize=9,
    )
    return bench.save_figure(fig, path, dpi=110)


def main(argv: Optional[list[str]] = None) -> dict:
    return bench.run_script(parse_args, run, argv)


def run(args: argparse.Namespace) -> dict:
    path = causal_lm_path(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    train_docs, heldout_docs = split_documents(python_reference_docs(), heldout_every=10)
    train_count = args.steps * args.batch_size
    train_blocks = token_blocks(
        tokenizer, train_docs, args.block_size, max_blocks=train_count + 8 * 128 // args.block_size
    )
    data = {
        "train": train_blocks[:train_count],
        # unseen text of the training topics: the learning curves' validation set, apart from the test topics
        "validation": train_blocks[train_count:].reshape(-1, 128)[:8],
        "test": token_blocks(tokenizer, heldout_docs, 128, max_blocks=args.eval_blocks),
    }
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_ppl = perplexity(base, data["test"], batch_size=8)
    del base
    print(
        f"base test perplexity {base_ppl:.2f}; blocks: train {tuple(data['train'].shape)}, validation "
        f"{tuple(data['validation'].shape)}, test {tuple(data['test'].shape)}"
    )
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            result = run_one(method, seed, data, args, path)
            runs.setdefault(method, []).append(result)
            print(f"{method:<18} seed {seed}: test ppl {result['test_ppl']:.2f} ({result['train_seconds']:.0f} s)")
    summary = summarize(runs)
    report = {
        "model": "SmolLM2-135M-Instruct" if args.model is None else args.model,
        "base_test_ppl": base_ppl,
        "summary": summary,
        "runs": runs,
        "config": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "block_size": args.block_size,
            "seeds": args.seeds,
            "learning_rates": {m: args.rates[m] for m in args.methods},
            "test_blocks": data["test"].shape[0],
            "eval_every": args.eval_every,
        },
        "environment": bench.environment(),
        "seconds": time.perf_counter() - started,
    }
    print(f"\n{'method':<18}{'test ppl':>18}{'trainable':>12}{'train s':>9}   (base {base_ppl:.2f})")
    for method, s in summary.items():
        print(
            f"{method:<18}{s['test_ppl_mean']:>11.2f} ± {s['test_ppl_std']:<5.2f}{s['trainable_params']:>12,}"
            f"{s['train_seconds_mean']:>9.0f}"
        )
    stem = "causal_lm_adaptation" + ("_quick" if args.quick else "")
    bench.save_report(report, args.output_dir / f"{stem}.json", lambda png: plot(report, png), indent=1)
    return report


if __name__ == "__main__":
    main()
