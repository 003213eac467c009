"""RankGen beam search: our single decoding loop against an official-style loop around ``generate``.

What it measures
----------------
Both run RankGen beam search with the paper's defaults (B=2 beams, N=10 samples per beam, a scoring round every
L=20 tokens) for 60 new tokens on a batch of 4 prompts, on a tiny randomly initialised Llama (built from a config,
nothing is downloaded) with a byte-level BPE tokenizer trained here on Python's ``pydoc_data.topics``; the scorer is a
cheap fake (how often the letter "e" appears), so the numbers are the cost of the *decoding loop*, not of a scorer.

* ``rankgen_logits``: ``model.generate(..., custom_generate=rankgen_generate, rankgen=RankGenSettings(...))``: all
  prompts × beams × samples in one batch, one forward per new token, the prompt prefilled once and the KV cache rows
  of the survivors reordered after each round.
* ``official-style``: modelled on the loop in the paper's released code: one prompt at a time; per round, for each
  beam, ``tokenizer(prompt + beam_text)`` → ``model.generate(do_sample=True, max_new_tokens=L,
  num_return_sequences=N)`` (a fresh prefill of the whole text every round) → ``batch_decode`` → score → keep the
  best B distinct texts.

Both sample with ``top_p=0.9``; EOS, padding and unknown tokens are suppressed so that every run produces the full
60 tokens. Forward calls are counted with a forward pre-hook on the model; time is the median of ``--repeats`` runs
(``time.perf_counter``) after one warm-up run of each, with one torch thread (``--threads``).

How to run
----------
    python benchmarks/bench_rankgen_loop.py                 # ~1 min on 2 CPU cores
    python benchmarks/bench_rankgen_loop.py --repeats 1 --out /tmp/r.json

It prints a table (time, forward calls, rows per forward, scorer calls, ratios) and writes
``benchmarks/results/rankgen_loop_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankgen_logits import RankGenSettings, rankgen_generate

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "rankgen_loop_cpu.json"
BATCH, BEAMS, SAMPLES, EVERY, NEW_TOKENS = 4, 2, 10, 20, 60


class LetterE:
    """A cheap, deterministic stand-in for a RankGen scorer: prefers continuations rich in the letter "e"."""

    def __init__(self):
        self.calls = 0
        self.texts = 0

    def score(self, prefixes, continuations):
        self.calls += 1
        self.texts += len(continuations)
        return torch.tensor([c.count("e") / (len(c) + 1) for c in continuations])


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )


def build_model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def ours(model, tok, scorer, prompts, gen_kwargs) -> list[str]:
    inputs = tok(prompts, return_tensors="pt", padding=True)
    settings = RankGenSettings(scorer, tokenizer=tok, num_beams=BEAMS, num_samples=SAMPLES, rerank_every=EVERY)
    out = model.generate(
        **inputs, custom_generate=rankgen_generate, rankgen=settings, max_new_tokens=NEW_TOKENS, **gen_kwargs
    )
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def official_style(model, tok, scorer, prompts, gen_kwargs) -> list[str]:
    results = []
    for prompt in prompts:
        beams = [{"text": "", "eos": False} for _ in range(BEAMS)]
        generated = 0
        while True:
            new_tokens = min(EVERY, NEW_TOKENS - generated)
            candidates = []
            for beam in beams:
                if beam["eos"]:
                    candidates.append(beam)
                    continue
                inputs = tok(prompt + beam["text"], return_tensors="pt")  # re-tokenised, re-prefilled every round
                out = model.generate(**inputs, max_new_tokens=new_tokens, num_return_sequences=SAMPLES, **gen_kwargs)
                new = out[:, inputs["input_ids"].shape[1] :]
                texts = tok.batch_decode(new, skip_special_tokens=True)
                for text, row in zip(texts, new):
                    candidates.append({"text": beam["text"] + text, "eos": bool((row == tok.eos_token_id).any())})
            generated += new_tokens
            scores = scorer.score([prompt] * len(candidates), [c["text"] for c in candidates])
            ranked = sorted(zip(scores.tolist(), range(len(candidates))), key=lambda x: -x[0])
            beams, seen = [], set()
            for _, i in ranked:
                if candidates[i]["text"] not in seen:
                    seen.add(candidates[i]["text"])
                    beams.append(candidates[i])
                if len(beams) == BEAMS:
                    break
            if all(b["eos"] for b in beams) or generated >= NEW_TOKENS:
                break
        results.append(beams[0]["text"])
    return results


def measure(fn, model, tok, prompts, gen_kwargs, repeats: int) -> dict:
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        fn(model, tok, LetterE(), prompts, gen_kwargs)  # warm-up
        times, scorer = [], None
        for repeat in range(repeats):
            shapes.clear()
            scorer = LetterE()
            torch.manual_seed(repeat)
            start = time.perf_counter()
            texts = fn(model, tok, scorer, prompts, gen_kwargs)
            times.append(time.perf_counter() - start)
    finally:
        handle.remove()
    return {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "forward_calls": len(shapes),
        "rows_per_forward_mean": sum(r for r, _ in shapes) / len(shapes),
        "tokens_fed": sum(r * n for r, n in shapes),
        "scorer_calls": scorer.calls,
        "scored_texts": scorer.texts,
        "mean_score": float(LetterE().score(prompts, texts).mean()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args) -> dict:

    texts = corpus()
    tok = build_tokenizer(texts)
    model = build_model(tok)
    prompts = [" ".join(texts[i].split()[:n]) for i, n in ((3, 24), (20, 12), (40, 30), (60, 6))][:BATCH]
    gen_kwargs = {
        "do_sample": True,
        "top_p": 0.9,
        "top_k": 0,
        "suppress_tokens": [tok.pad_token_id, tok.unk_token_id, tok.eos_token_id],
        "pad_token_id": tok.pad_token_id,
    }
    results = {
        "rankgen_logits": measure(ours, model, tok, prompts, gen_kwargs, args.repeats),
        "official-style": measure(official_style, model, tok, prompts, gen_kwargs, args.repeats),
    }
    base = results["rankgen_logits"]
    print(f"RankGen beam search: batch {BATCH}, B={BEAMS}, N={SAMPLES}, L={EVERY}, {NEW_TOKENS} new tokens (CPU)")
    header = f"{'loop':<16}{'time s':>9}{'x ours':>8}{'forwards':>10}{'x ours':>8}{'rows/fwd':>10}{'tokens fed':>12}"
    header += f"{'scorer calls':>14}{'mean score':>12}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<16}{r['seconds']:>9.3f}{r['seconds'] / base['seconds']:>8.2f}{r['forward_calls']:>10}"
            f"{r['forward_calls'] / base['forward_calls']:>8.2f}{r['rows_per_forward_mean']:>10.1f}"
            f"{r['tokens_fed']:>12}{r['scorer_calls']:>14}{r['mean_score']:>12.4f}"
        )
    report = {
        "config": {
            "batch": BATCH,
            "num_beams": BEAMS,
            "num_samples": SAMPLES,
            "rerank_every": EVERY,
            "max_new_tokens": NEW_TOKENS,
            "model": model.config.to_diff_dict(),
            "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
            "repeats": args.repeats,
        },
        "results": results,
        "environment": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
