"""RankGen decoding speed: our single decoding loop against plain sampling and an official-style loop.

What it measures
----------------
For each batch size (``--batch-sizes``, default 1 and 8 prompts), each peer generates ``--new-tokens`` tokens (60)
with top-p 0.9 on a small Llama built from a config (nothing is downloaded) with a byte-level BPE tokenizer trained
here on Python's ``pydoc_data.topics`` (and, for vocabularies above 8,192, the standard library's source). The
JSON also records how many tokens top-p keeps at the end of each prompt: a randomly initialised model is flatter
than a trained one when it is small, which makes sampling dearer for every peer. RankGen uses the paper's B=2 beams, N=10 samples, a scoring round every L=20
tokens; the scorer is a cheap fake (how often the letter "e" appears), so the numbers are the cost of the *decoding
loop*, not of a scorer.

* ``forward-only``: not a decoder, only the model forwards RankGen's B·N rows need, with a cache copied per row as
  ``generate`` keeps it (each prompt prefilled once, then one forward per token for B·N rows per prompt, fed greedy
  tokens; no sampling, scoring or reordering). The official-style loop's time over it bounds what any loop that keeps
  such a cache can gain over that loop (beam's shared-prompt attention goes past it with long prompts);
* ``nucleus``: ``model.generate(do_sample=True, top_p=0.9)``, one sample per prompt (the baseline RankGen replaces);
* ``sampling-BxN``: ONE ``generate`` call drawing B·N = 20 samples per prompt (``num_return_sequences=20``): the
  floor for any method that looks at B·N candidates per prompt;
* ``rerank``: ``rankgen_logits`` rerank mode with B·N = 20 samples, scored once;
* ``beam``: ``rankgen_logits`` beam mode (B=2, N=10, L=20): all prompts × beams × samples in one batch, one forward
  per new token, the prompt prefilled once and the KV cache rows of the survivors reordered after each round;
* ``official-style``: the loop of the paper's released code (``RankGenGenerator.beam_search``), step for step: one
  prompt at a time; per round, for each beam, ``tokenizer(prompt + beam_text)`` →
  ``model.generate(max_new_tokens=L, num_return_sequences=N, output_scores=True, return_dict_in_generate=True)`` (a
  fresh prefill of the whole text every round) → ``batch_decode`` → score → ``torch.topk`` keeps the best B.

EOS, padding and unknown tokens are suppressed so every run writes the full length. Forward calls are counted with a
forward pre-hook on the model; time is the median of ``--repeats`` runs after one warm-up run. On CPU it is the
process's CPU time (``time.process_time``, one torch thread, ``--threads``): on a shared machine wall time measures
the neighbours, while single-threaded CPU time is what the run costs (wall times are kept in the JSON too). On GPU it
is wall time with ``torch.cuda.synchronize()`` around each run. The table gives seconds per call and per
prompt, forward calls, rows per forward, and the ratios the issue asks for: beam against one batched B·N sampling
call (target ≤ 1.3×) and the official-style loop against beam (target ≥ 10×).

How to run
----------
    python benchmarks/bench_rankgen_loop.py                      # CPU, ~2 min on 2 cores
    python benchmarks/bench_rankgen_loop.py --quick              # ~30 s (what the tests run)
    python benchmarks/bench_rankgen_loop.py --prompt-words 160 --out benchmarks/results/rankgen_loop_cpu_long.json
    python benchmarks/bench_rankgen_loop.py --vocab-size 32000 --hidden 256 --layers 4 --repeats 1
    python benchmarks/bench_rankgen_loop.py --preset paper       # GPT-2-small-sized, 256-token prompts, 115 tokens
    python benchmarks/bench_rankgen_loop.py --preset paper --prompt-tokens 512
    python benchmarks/bench_rankgen_loop.py --device cuda --preset paper --batch-sizes 1 8 --repeats 3

Writes ``benchmarks/results/rankgen_loop_{device}.json`` and ``.png``.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedTokenizerFast

from ntk_rankgen_assets import bench
from ntk_rankgen_assets.texts import python_reference_docs
from ntk_rankgen_assets.training import small_llama
from rankgen_logits import RankGenSettings, rankgen_generate

ROOT = Path(__file__).resolve().parent
BEAMS, SAMPLES, EVERY = 2, 10, 20
PEERS = ("forward-only", "nucleus", "sampling-BxN", "rerank", "beam", "official-style")
PRESETS = {
    "paper": {
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "intermediate": 2048,  # Llama's 3 MLP matrices of 768 x 2048 ~ GPT-2's 2 of 768 x 3072
        "vocab_size": 50257,
        "prompt_tokens": 256,
        "new_tokens": 115,
        "batch_sizes": [1],
        "repeats": 1,
    }
}
# (topic index, words) of the prompts: different lengths, so left padding is exercised
PROMPT_SPECS = ((3, 24), (20, 12), (40, 30), (60, 6), (7, 40), (33, 18), (51, 9), (70, 27))


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
    return python_reference_docs()


def stdlib_sources() -> list[str]:
    """The standard library's own source, tests excluded (~12 MB): with the reference docs, enough text for a real
    50k BPE vocabulary (the docs alone stop at ~9k tokens)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages"}
    paths = [path for path in sorted(root.rglob("*.py")) if not skip & set(path.relative_to(root).parts)]
    return [path.read_text(encoding="utf-8", errors="ignore") for path in paths]


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
    raw.train_from_iterator(texts + (stdlib_sources() if vocab_size > 8192 else []), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )


def build_model(tok, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: Optional[int] = None):
    torch.manual_seed(0)
    model = small_llama(
        tok,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=1024,  # room for --prompt-words 160 (up to ~480 tokens) + new tokens, untruncated
        initializer_range=0.2,
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# the peers: each returns one continuation per prompt


def _continuations(tok, out, inputs, per_prompt: int = 1) -> list[str]:
    texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts[::per_prompt]


def nucleus(model, tok, scorer, prompts, gen_kwargs, new_tokens) -> list[str]:
    inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=new_tokens, **gen_kwargs)
    return _continuations(tok, out, inputs)


def sampling_bxn(model, tok, scorer, prompts, gen_kwargs, new_tokens) -> list[str]:
    inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=new_tokens, num_return_sequences=BEAMS * SAMPLES, **gen_kwargs)
    return _continuations(tok, out, inputs, BEAMS * SAMPLES)


def _ours(mode: str):
    def run(model, tok, scorer, prompts, gen_kwargs, new_tokens) -> list[str]:
        inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        settings = RankGenSettings(
            scorer,
            tokenizer=tok,
            mode=mode,
            num_beams=BEAMS,
            num_samples=SAMPLES if mode == "beam" else BEAMS * SAMPLES,
            rerank_every=EVERY,
        )
        out = model.generate(
            **inputs, custom_generate=rankgen_generate, rankgen=settings, max_new_tokens=new_tokens, **gen_kwargs
        )
        return _continuations(tok, out, inputs)

    return run


def official_style(model, tok, scorer, prompts, gen_kwargs, new_tokens) -> list[str]:
    """The released ``RankGenGenerator.beam_search`` loop, step for step, with two changes so that it does the work
    asked of it: its token count is reset for each prompt (released, it is not, so every prompt after the first asks
    for <= 0 new tokens), and a beam stops after ``new_tokens`` generated tokens rather than when its decoded text
    re-tokenises to that many (with a random model, decoded invalid UTF-8 re-tokenises longer and ends beams early).

    Kept as released: one prompt at a time; per round and beam, the prompt plus the beam's text re-tokenised
    (truncated to leave room for the chunk) and re-prefilled by one ``generate`` call with ``output_scores=True,
    return_dict_in_generate=True`` and ``num_return_sequences=N``; EOS looked for in the whole returned row (prompt
    included); the candidates decoded to text and scored; the best B by ``torch.topk`` (no de-duplication)."""
    limit = model.config.max_position_embeddings
    results = []
    for prompt in prompts:
        beams = [{"text": "", "eos": False} for _ in range(BEAMS)]
        generated = 0
        while True:
            chunk = min(EVERY, new_tokens - generated)
            candidates = []
            for beam in beams:
                if beam["eos"]:
                    candidates.append(beam)
                    continue
                inputs = tok(prompt + beam["text"], truncation=True, max_length=limit - chunk, return_tensors="pt").to(
                    model.device
                )
                out = model.generate(
                    **inputs,
                    max_new_tokens=chunk,
                    num_return_sequences=SAMPLES,
                    output_scores=True,
                    return_dict_in_generate=True,
                    **gen_kwargs,
                )
                rows = out.sequences
                texts = tok.batch_decode(rows[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for text, row in zip(texts, rows):
                    candidates.append({"text": beam["text"] + text, "eos": bool((row == tok.eos_token_id).any())})
            generated += chunk
            scores = scorer.score([prompt] * len(candidates), [c["text"] for c in candidates])
            beams = [candidates[i] for i in torch.topk(scores, k=BEAMS).indices.tolist()]
            if all(b["eos"] for b in beams) or generated >= new_tokens:
                break
        results.append(beams[0]["text"])
    return results


@torch.no_grad()
def forward_only(model, tok, scorer, prompts, gen_kwargs, new_tokens) -> list[str]:
    """Not a decoder: only the model forwards that RankGen's B·N rows need, with a per-row cache as ``generate``
    keeps it. Each prompt is prefilled once, its cache copied to B·N rows, then one forward per further token feeds
    every row its greedy token; nothing is sampled, scored or reordered. The official-style loop's time over this one
    is the most that a loop keeping such a cache could gain over it."""
    inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    rows = BEAMS * SAMPLES
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(rows)
    mask = inputs["attention_mask"].repeat_interleave(rows, 0)
    token = out.logits[:, -1].argmax(-1).repeat_interleave(rows)[:, None]
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return [""] * len(prompts)


RUNNERS = {
    "forward-only": forward_only,
    "nucleus": nucleus,
    "sampling-BxN": sampling_bxn,
    "rerank": _ours("rerank"),
    "beam": _ours("beam"),
    "official-style": official_style,
}


# ---------------------------------------------------------------------------------------------------------------------
# measuring


def measure(fn, model, tok, prompts, gen_kwargs, new_tokens: int, repeats: int) -> dict:
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    device = model.device
    try:
        torch.manual_seed(0)
        fn(model, tok, LetterE(), prompts[:1], gen_kwargs, min(new_tokens, EVERY + 2))  # warm-up: every code path
        times, wall, scorer, texts = [], [], None, []
        for repeat in range(repeats):
            shapes.clear()
            scorer = LetterE()
            torch.manual_seed(repeat)
            bench.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            texts = fn(model, tok, scorer, prompts, gen_kwargs, new_tokens)
            bench.synchronize(device)
            wall.append(time.perf_counter() - start)
            times.append(time.process_time() - start_cpu if device.type == "cpu" else wall[-1])
    finally:
        handle.remove()
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "seconds_per_prompt": seconds / len(prompts),
        "seconds_all": times,
        "wall_seconds_all": wall,
        "forward_calls": len(shapes),
        "rows_per_forward_mean": sum(r for r, _ in shapes) / len(shapes),
        "tokens_fed": sum(r * n for r, n in shapes),
        "scorer_calls": scorer.calls,
        "scored_texts": scorer.texts,
        "mean_score": float(LetterE().score(prompts, texts).mean()),
    }


@torch.no_grad()
def nucleus_sizes(model, tok, prompts, top_p: float) -> list[int]:
    """How many tokens top-p keeps at the end of each prompt: what sampling has to sort (transformers) or find."""
    inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    probs = model(**inputs).logits[:, -1].float().softmax(-1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < top_p).sum(-1).tolist()


def ratios(by_peer: dict) -> dict:
    beam, sampling, official = by_peer["beam"], by_peer["sampling-BxN"], by_peer["official-style"]
    return {
        "beam_over_sampling_BxN_time": beam["seconds"] / sampling["seconds"],
        "official_over_beam_time": official["seconds"] / beam["seconds"],
        "official_over_beam_forward_calls": official["forward_calls"] / beam["forward_calls"],
        "beam_over_nucleus_time": beam["seconds"] / by_peer["nucleus"]["seconds"],
        "rerank_over_sampling_BxN_time": by_peer["rerank"]["seconds"] / sampling["seconds"],
        # the ceiling on official_over_beam_time for a loop that keeps a per-row cache (shared-prompt attention
        # goes past it with long prompts)
        "official_over_forward_only_time": official["seconds"] / by_peer["forward-only"]["seconds"],
        "beam_over_forward_only_time": beam["seconds"] / by_peer["forward-only"]["seconds"],
    }


def parse_args(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = bench.argument_parser(
        __doc__,
        quick="40 new tokens, 1 repeat (what the tests run)",
        threads_help="CPU torch threads (tiny models gain nothing from more)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="prompts per call (at most 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 60 (quick 40)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per peer (median); default 3, quick 1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument(
        "--prompt-words", type=int, default=None, help="words per prompt (default: 6 to 40, different per prompt)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=None, help="cut every prompt to exactly this many tokens (overrides words)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="model width (default 64: a tiny model)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (key/value heads: half as many)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="BPE vocabulary trained here (above 8192 on the stdlib's source too)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="paper: a GPT-2-small-sized Llama (768 wide, 12 layers, 50,257-token vocabulary), 256-token prompts, the "
        "paper's 115 new tokens, batch 1 (~4 min on one CPU thread); options given explicitly win",
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/rankgen_loop_{device}.json")
    args = parser.parse_args(argv)
    if args.preset:
        given = {arg.split("=")[0] for arg in argv}
        explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
        for key, value in PRESETS[args.preset].items():
            if key not in explicit:
                setattr(args, key, value)
    args.new_tokens = args.new_tokens or (40 if args.quick else 60)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if max(args.batch_sizes) > len(PROMPT_SPECS) or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be between 1 and {len(PROMPT_SPECS)}")
    args.out = args.out or ROOT / "results" / f"rankgen_loop_{args.device}.json"
    return args


def main(argv=None) -> dict:
    return bench.run_script(parse_args, run, argv)


def build_prompts(tok, texts: list[str], prompt_tokens: Optional[int] = None, words: Optional[int] = None) -> list[str]:
    """One prompt per :data:`PROMPT_SPECS` entry: its topic's first words (``words`` each, else the entry's own
    number), or, with ``prompt_tokens``, exactly that many tokens."""
    if prompt_tokens:
        # a topic followed by the next ones, so that every prompt has the length asked for
        cut = [tok("\n\n".join(texts[i : i + 20]))["input_ids"][:prompt_tokens] for i, _ in PROMPT_SPECS]
        return tok.batch_decode(cut)
    return [" ".join(texts[i].split()[: words or n]) for i, n in PROMPT_SPECS]


def generation_kwargs(tok) -> dict:
    """Top-p 0.9 with nothing that could end a row early: every peer writes the full number of tokens."""
    return {
        "do_sample": True,
        "top_p": 0.9,
        "top_k": 0,
        "suppress_tokens": [tok.pad_token_id, tok.unk_token_id, tok.eos_token_id],
        "pad_token_id": tok.pad_token_id,
    }


def run(args) -> dict:
    device = torch.device(args.device)
    texts = corpus()
    tok = build_tokenizer(texts, args.vocab_size)
    model = build_model(tok, args.hidden, args.layers, args.heads, args.intermediate).to(device)
    all_prompts = build_prompts(tok, texts, args.prompt_tokens, args.prompt_words)
    gen_kwargs = generation_kwargs(tok)
    results, summary = {}, {}
    for batch in args.batch_sizes:
        prompts = all_prompts[:batch]
        results[str(batch)] = {
            peer: measure(RUNNERS[peer], model, tok, prompts, gen_kwargs, args.new_tokens, args.repeats)
            for peer in PEERS
        }
        summary[str(batch)] = ratios(results[str(batch)])
    prompt_tokens = [len(tok(p)["input_ids"]) for p in all_prompts]
    used = prompt_tokens[: max(args.batch_sizes)]
    nuclei = nucleus_sizes(model, tok, all_prompts, gen_kwargs["top_p"])
    print(
        f"\nLlama with {sum(p.numel() for p in model.parameters()):,} parameters ({args.hidden} wide, {args.layers} "
        f"layers, vocabulary {len(tok):,}); prompts of {min(used)}-{max(used)} tokens; top-p 0.9 "
        f"keeps {sorted(nuclei)} tokens at the prompts' ends"
    )
    print_table(results, summary, args, device)
    report = {
        "config": {
            "batch_sizes": args.batch_sizes,
            "num_beams": BEAMS,
            "num_samples": SAMPLES,
            "rerank_every": EVERY,
            "max_new_tokens": args.new_tokens,
            "model": model.config.to_diff_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "prompt_tokens": prompt_tokens,
            "repeats": args.repeats,
            "quick": args.quick,
            "prompt_words": args.prompt_words,
            "prompt_tokens_cut": args.prompt_tokens,
            "vocab_size": len(tok),
            "preset": args.preset,
            "nucleus_sizes_at_prompt_end": nuclei,
        },
        "results": results,
        "ratios": summary,
        "targets": {"beam_over_sampling_BxN_time": "<= 1.3", "official_over_beam_time": ">= 10"},
        "environment": bench.environment(device),
    }
    bench.save_report(report, args.out, lambda png: plot(report, png))
    return report


def print_table(results, summary, args, device) -> None:
    print(
        f"RankGen decoding speed: B={BEAMS}, N={SAMPLES}, L={EVERY}, {args.new_tokens} new tokens, {device} "
        f"({'1 thread' if device.type == 'cpu' and torch.get_num_threads() == 1 else 'threads ' + str(torch.get_num_threads())}), "
        f"median of {args.repeats}"
    )
    for batch, by_peer in results.items():
        print(f"\nbatch {batch}")
        print(
            f"{'peer':<16}{'s/call':>9}{'s/prompt':>10}{'x beam':>8}{'forwards':>10}{'x beam':>8}{'rows/fwd':>10}"
            f"{'tokens fed':>12}{'scorer calls':>14}"
        )
        beam = by_peer["beam"]
        for peer, r in by_peer.items():
            print(
                f"{peer:<16}{r['seconds']:>9.3f}{r['seconds_per_prompt']:>10.3f}{r['seconds'] / beam['seconds']:>8.2f}"
                f"{r['forward_calls']:>10}{r['forward_calls'] / beam['forward_calls']:>8.2f}"
                f"{r['rows_per_forward_mean']:>10.1f}{r['tokens_fed']:>12}{r['scorer_calls']:>14}"
            )
        s = summary[batch]
        print(
            f"beam / one batched B·N sampling call: {s['beam_over_sampling_BxN_time']:.2f}x (target <= 1.3); "
            f"official-style / beam: {s['official_over_beam_time']:.1f}x time, "
            f"{s['official_over_beam_forward_calls']:.0f}x forward calls (target >= 10x); official-style / "
            f"forward-only: {s['official_over_forward_only_time']:.1f}x (the most a loop with a per-row cache can gain)"
        )


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    batches = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(PEERS)
    for i, peer in enumerate(PEERS):
        xs = [b + (i - len(PEERS) / 2 + 0.5) * width for b in range(len(batches))]
        axes[0].bar(xs, [report["results"][b][peer]["seconds_per_prompt"] for b in batches], width, label=peer)
        axes[1].bar(xs, [report["results"][b][peer]["forward_calls"] for b in batches], width, label=peer)
    for ax, label in ((axes[0], "seconds per prompt"), (axes[1], "model forward calls per generate call")):
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(PEERS), fontsize=9)
    cfg, env = report["config"], report["environment"]
    fig.suptitle(
        f"RankGen decoding (B={cfg['num_beams']}, N={cfg['num_samples']}, L={cfg['rerank_every']}, "
        f"{cfg['max_new_tokens']} tokens, {cfg['parameters']:,}-parameter Llama) on {env.get('gpu', env['device'])}"
    )
    return bench.save_figure(fig, path, dpi=110, rect=(0, 0.06, 1, 1))


if __name__ == "__main__":
    main()
