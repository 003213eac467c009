"""Does compressing a long document into an NTK adapter help a language model on the document's continuation?

What it does
------------
1. Pretrains a small Llama (byte-level BPE tokenizer and model trained here, offline, with the helpers of
   ``ntk_rankgen_assets.training``) on the Python reference documentation (``pydoc_data.topics``); its context window is
   ``--block-size`` tokens. ``--base-dir`` reuses a model saved by an earlier run.
2. Takes a long held-out document, the docstrings of one standard-library module (``--module``, default ``typing``;
   never seen in pretraining), tokenises it, and splits it into a *memory* part (the first ``--memory-tokens``
   tokens, many times the context window) and a *continuation* (the next ``--eval-tokens`` tokens).
3. Scores the continuation in blocks of ``block_size − K`` tokens, each block on its own (perplexity over the same
   targets for every variant), with these memories of the memory part:

   * ``none``: nothing (the plain base model);
   * ``last_k``: the last ``K`` tokens of the memory part as ordinary context before each block, where ``K`` is chosen
     so that their KV cache (``2·K·kv_heads·d`` numbers per layer) is as large as an NTK adapter
     (``heads·(r·d + r)`` per layer): *equal memory*;
   * ``exact_prefix``: not a compression but the thing NTK approximates: every block also attends, with softmax, to
     the keys and values of *all* memory tokens (read chunk by chunk exactly as ``init_from_text`` reads them);
     memory O(n). If this does not help, no kernel approximation of it can;
   * ``ntk_elu`` / ``ntk_elu_calibrated``: ``peft_ntk.init_from_text`` over the whole memory part with the paper's
     elu map (r = d), without / with scale calibration;
   * ``ntk_favor`` / ``ntk_favor_calibrated``: the same with FAVOR+ random features at the same r (same memory);
   * ``ntk_elu_scaled``: elu, init from all but the last ``--val-tokens`` of the memory part with
     ``calibrate="perplexity"`` on those held-back tokens: ``Z, k`` scaled by the factor (10^-8 … 10, half decades)
     with the lowest perplexity there;
   * ``finetuned_from_text`` / ``finetuned_from_scaled`` / ``finetuned_from_random`` / ``finetuned_prefix``: the
     calibrated and the scaled elu adapters, a default (small random) NTK adapter, and a prefix-tuning adapter with
     ``K`` virtual tokens (equal memory again), each trained for ``--finetune-steps`` steps on the memory part (next-token loss on random blocks; test-time
     training on the document), same optimiser and learning rate for the NTK variants;
   * ``prefix_converted_elu`` / ``prefix_converted_favor``: the trained prefix converted into NTK adapters with
     ``peft_ntk.convert_prefix_tuning`` (elu; FAVOR+ with ``--convert-r`` features), and how far their logits are
     from the prefix-tuned model's.

How to run
----------
    python benchmarks/ntk_long_context.py --quick      # < 3 min on one CPU thread (used by the tests)
    python benchmarks/ntk_long_context.py              # ~20 min on one CPU thread

It prints a table (perplexity and its ratio to ``none``) and writes ``ntk_long_context[_quick].json`` and a PNG bar
chart to ``--output-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import peft_ntk
from ntk_rankgen_assets import bench
from ntk_rankgen_assets.texts import python_reference_docs, split_documents, stdlib_docstrings, token_blocks
from ntk_rankgen_assets.training import quiet_run, small_llama, train_bpe_tokenizer, train_on_blocks
from peft_ntk.ops import softmax_attention_with_lse
from peft_ntk.tuner import capture_attention_inputs

RESULTS = Path(__file__).resolve().parent / "results"
# option: (quick, full)
DEFAULTS = {
    "module": ("logging", "typing"),
    "memory_tokens": (1024, 6144),
    "eval_tokens": (384, 2048),
    "block_size": (64, 128),
    "layers": (2, 4),
    "vocab_size": (512, 768),
    "pretrain_steps": (300, 800),
    "finetune_steps": (30, 150),
    "convert_r": (256, 1024),
    "val_tokens": (128, 512),
}

# ---------------------------------------------------------------------------------------------------------------------
# model and data


def pretrained_base(args, tokenizer_texts: list[str], train_texts: list[str]):
    """(model, tokenizer): loaded from ``--base-dir`` when it holds a model, else trained here (and saved there)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    base_dir = Path(args.base_dir) if args.base_dir else None
    if base_dir is not None and (base_dir / "config.json").is_file():
        print(f"loading the pretrained base from {base_dir}")
        return LlamaForCausalLM.from_pretrained(base_dir).eval(), PreTrainedTokenizerFast.from_pretrained(base_dir)
    tokenizer = train_bpe_tokenizer(tokenizer_texts, args.vocab_size)
    blocks = token_blocks(tokenizer, train_texts, args.block_size)
    torch.manual_seed(args.seed)
    model = small_llama(
        tokenizer,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    run_dir = Path(args.output_dir) / "pretrain_runs"
    _, seconds = train_on_blocks(
        model, blocks, run_dir, steps=args.pretrain_steps, lr=3e-3, batch_size=16, seed=args.seed, use_cpu=True
    )
    print(
        f"pretrained {args.layers} layers x hidden {args.hidden_size} for {args.pretrain_steps} steps in {seconds:.0f} s"
    )
    model.eval()
    if base_dir is not None:
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    return model, tokenizer


def document_ids(tokenizer, module: str) -> list[int]:
    docs = stdlib_docstrings([module])
    return tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]


def equal_memory_k(config, feature_dim: int) -> int:
    """Context tokens whose KV cache holds as many numbers as an NTK adapter with ``feature_dim`` features."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    return max(1, round(heads * (feature_dim * d + feature_dim) / (2 * kv_heads * d)))


# ---------------------------------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def block_nll(model, blocks: torch.Tensor, context: Optional[torch.Tensor] = None) -> tuple[float, int]:
    """Summed next-token NLL over ``blocks[:, 1:]`` (N, L), optionally after a shared ``context`` (K tokens)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, blocks.shape[0], 16):
        batch = blocks[start : start + 16]
        ids = batch if context is None else torch.cat([context.expand(batch.shape[0], -1), batch], dim=1)
        logits = model(input_ids=ids, use_cache=False).logits[:, -batch.shape[1] : -1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return nll, count


def perplexity(model, blocks, context=None) -> float:
    nll, count = block_nll(model, blocks, context)
    return math.exp(nll / count)


def finetune(model, memory_ids: list[int], steps: int, lr: float, block: int, seed: int, batch_size: int = 8) -> list:
    """Next-token training of the trainable parameters on random ``block``-token windows of the memory part."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    data = torch.tensor(memory_ids)
    losses = []
    model.train()
    for _ in range(steps):
        starts = [rng.randrange(0, len(memory_ids) - block) for _ in range(batch_size)]
        batch = torch.stack([data[s : s + block] for s in starts])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# the uncompressed reference: softmax attention over every memory token's key and value (memory O(n))

_EXACT_PREFIX: dict = {}


def _exact_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention over the block plus softmax attention over all recorded memory rows of this layer."""
    prefix_keys, prefix_values = _EXACT_PREFIX[module.layer_idx]
    batch = query.shape[0]
    own, own_lse, _ = softmax_attention_with_lse(
        query, key, value, attention_mask=attention_mask, is_causal=attention_mask is None, scaling=scaling
    )
    mem, mem_lse, _ = softmax_attention_with_lse(
        query,
        prefix_keys[None].expand(batch, -1, -1, -1),
        prefix_values[None].expand(batch, -1, -1, -1),
        scaling=scaling,
    )
    weight = torch.sigmoid(own_lse - mem_lse)[..., None]  # share of the block's own keys in the joint softmax
    return (weight * own + (1 - weight) * mem).transpose(1, 2).contiguous(), None


@torch.no_grad()
def exact_prefix_model(base, memory_ids: list[int], block_size: int):
    """A copy of ``base`` whose every layer also attends (softmax) to the keys/values of all memory tokens, read in
    chunks exactly as init_from_text reads them (each chunk from position 0)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    reader = ntk_model(base, init_weights=True)
    rows: dict[int, list] = {}
    with (
        reader.disable_adapter(),
        capture_attention_inputs(lambda module, q, k, v, s: rows.setdefault(module.layer_idx, []).append((k[0], v[0]))),
    ):
        for start in range(0, len(memory_ids), block_size):
            reader(input_ids=torch.tensor([memory_ids[start : start + block_size]]), use_cache=False)
    _EXACT_PREFIX.clear()
    for layer, pieces in rows.items():
        _EXACT_PREFIX[layer] = (torch.cat([k for k, _ in pieces], 1), torch.cat([v for _, v in pieces], 1))
    AttentionInterface.register("bench_exact_prefix", _exact_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("bench_exact_prefix", sdpa_mask)
    model = copy.deepcopy(base)
    model.config._attn_implementation_internal = "bench_exact_prefix"
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# the experiment


def ntk_model(base, **config):
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", **config)).eval()


def run(args: argparse.Namespace) -> dict:
    from peft import PrefixTuningConfig, get_peft_model

    t0 = time.perf_counter()
    general = python_reference_docs()
    general_train, _ = split_documents(general, heldout_every=10)
    base, tokenizer = pretrained_base(args, general_train, general_train)
    timings = {"pretrain_s": time.perf_counter() - t0}

    ids = document_ids(tokenizer, args.module)
    need = args.memory_tokens + args.eval_tokens
    if len(ids) < need:
        raise SystemExit(f"module {args.module!r} has {len(ids)} tokens of docstrings, fewer than the {need} needed")
    memory_ids, continuation = ids[: args.memory_tokens], ids[args.memory_tokens : need]
    d = base.config.hidden_size // base.config.num_attention_heads
    k_tokens = equal_memory_k(base.config, d)
    eval_block = args.block_size - k_tokens
    n_blocks = len(continuation) // eval_block
    blocks = torch.tensor(continuation[: n_blocks * eval_block]).view(n_blocks, eval_block)
    memory_text = tokenizer.decode(memory_ids)
    ntk_numbers = base.config.num_attention_heads * (d * d + d)
    kv_numbers = 2 * base.config.num_key_value_heads * d * k_tokens
    print(
        f"document: docstrings of {args.module!r}, {len(ids)} tokens; memory part {len(memory_ids)} tokens "
        f"({len(memory_ids) / args.block_size:.0f} context windows), continuation scored in {n_blocks} blocks of "
        f"{eval_block} tokens; equal memory: K = {k_tokens} tokens ({kv_numbers} numbers/layer) vs NTK r = d = {d} "
        f"({ntk_numbers} numbers/layer)"
    )

    ppl: dict[str, float] = {}
    extra: dict = {}
    ppl["none"] = perplexity(base, blocks)
    ppl["last_k"] = perplexity(base, blocks, torch.tensor(memory_ids[-k_tokens:])[None])
    ppl["exact_prefix"] = perplexity(exact_prefix_model(base, memory_ids, args.block_size), blocks)

    def from_text(name: str, calibrate: bool, **config) -> object:
        t = time.perf_counter()
        model = ntk_model(base, init_weights=True, **config)
        report = peft_ntk.init_from_text(model, tokenizer, memory_text, calibrate=calibrate, progress=False)
        ppl[name] = perplexity(model, blocks)
        extra[name] = {
            "tokens_read": report.tokens,
            "chunks": report.chunks,
            "seconds": round(time.perf_counter() - t, 1),
            "calibration_scales_mean_log10": [
                round(sum(math.log10(s) for s in layer) / len(layer), 3) for layer in report.calibration_scales
            ],
            "calibration_log_mass_error_before_after": report.calibration_log_mass_error if calibrate else None,
        }
        return model

    from_text("ntk_elu", False)
    calibrated = from_text("ntk_elu_calibrated", True)
    from_text("ntk_favor", False, feature_map="favor", feature_dim=d)
    from_text("ntk_favor_calibrated", True, feature_map="favor", feature_dim=d)

    # Validation-chosen scale: compress all but the last --val-tokens of the memory part, then pick the factor on
    # Z and k that minimises the perplexity of those held-back tokens (never the continuation).
    scaled = ntk_model(base, init_weights=True)
    head, val = memory_ids[: -args.val_tokens], memory_ids[-args.val_tokens :]
    report = peft_ntk.init_from_text(
        scaled,
        tokenizer,
        tokenizer.decode(head),
        calibrate="perplexity",
        calibration_text=tokenizer.decode(val),
        progress=False,
    )
    ppl["ntk_elu_scaled"] = perplexity(scaled, blocks)
    extra["ntk_elu_scaled"] = {
        "compressed_tokens": len(head),
        "validation_tokens": len(val),
        "chosen_scale": report.calibration_scales[0][0],
        "scale_curve": report.calibration_curve,
    }
    timings["init_and_eval_s"] = time.perf_counter() - t0 - timings["pretrain_s"]

    t = time.perf_counter()
    losses = {}
    losses["finetuned_from_text"] = finetune(
        calibrated, memory_ids, args.finetune_steps, args.finetune_lr, args.block_size, args.seed
    )
    ppl["finetuned_from_text"] = perplexity(calibrated, blocks)
    torch.manual_seed(args.seed)
    random_init = ntk_model(base)  # the default init: the paper's N(0, 1e-4)
    losses["finetuned_from_random"] = finetune(
        random_init, memory_ids, args.finetune_steps, args.finetune_lr, args.block_size, args.seed
    )
    ppl["finetuned_from_random"] = perplexity(random_init, blocks)
    losses["finetuned_from_scaled"] = finetune(
        scaled, memory_ids, args.finetune_steps, args.finetune_lr, args.block_size, args.seed
    )
    ppl["finetuned_from_scaled"] = perplexity(scaled, blocks)

    torch.manual_seed(args.seed)
    prefix = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k_tokens))
    # The prefix sits in front of the block: its positions count, so train on windows that leave room for it.
    losses["finetuned_prefix"] = finetune(
        prefix, memory_ids, args.finetune_steps, args.prefix_lr, args.block_size - k_tokens, args.seed
    )
    ppl["finetuned_prefix"] = perplexity(prefix, blocks)
    timings["finetune_s"] = time.perf_counter() - t

    conversion = {}
    with torch.no_grad():
        prefix_logits = prefix(input_ids=blocks).logits.float()
        base_logits = base(input_ids=blocks).logits.float()
    for name, config in (
        ("prefix_converted_elu", peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM")),
        (
            "prefix_converted_favor",
            peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", feature_map="favor", feature_dim=args.convert_r),
        ),
    ):
        converted = peft_ntk.convert_prefix_tuning(prefix, config).eval()
        ppl[name] = perplexity(converted, blocks)
        with torch.no_grad():
            logits = converted(input_ids=blocks).logits.float()
        conversion[name] = {
            "mean_abs_logit_diff_to_prefix_tuned": (logits - prefix_logits).abs().mean().item(),
            "mean_abs_logit_diff_base_to_prefix_tuned": (base_logits - prefix_logits).abs().mean().item(),
            "kl_prefix_tuned_to_converted": F.kl_div(
                logits.log_softmax(-1), prefix_logits.log_softmax(-1), log_target=True, reduction="batchmean"
            ).item()
            / blocks.shape[1],
            "feature_dim": config.feature_dim or d,
        }
    timings["total_s"] = time.perf_counter() - t0

    report = {
        "args": vars(args),
        "versions": bench.environment(threads=args.threads),
        "model": {
            "layers": base.config.num_hidden_layers,
            "hidden_size": base.config.hidden_size,
            "heads": base.config.num_attention_heads,
            "kv_heads": base.config.num_key_value_heads,
            "head_dim": d,
            "context_window": args.block_size,
            "parameters": sum(p.numel() for p in base.parameters()),
        },
        "document": {
            "module": args.module,
            "tokens": len(ids),
            "memory_tokens": len(memory_ids),
            "continuation_blocks": n_blocks,
            "block_tokens": eval_block,
            "scored_tokens": n_blocks * (eval_block - 1),
        },
        "equal_memory": {
            "k_tokens": k_tokens,
            "kv_numbers_per_layer": kv_numbers,
            "ntk_numbers_per_layer": ntk_numbers,
        },
        "perplexity": ppl,
        "init_from_text": extra,
        "finetune": {
            "steps": args.finetune_steps,
            "lr_ntk": args.finetune_lr,
            "lr_prefix": args.prefix_lr,
            "first_last_loss": {k: (v[0], v[-1]) for k, v in losses.items()},
        },
        "conversion": conversion,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    print_table(ppl)
    for name, numbers in conversion.items():
        print(
            f"{name}: mean |logit - prefix-tuned logit| = {numbers['mean_abs_logit_diff_to_prefix_tuned']:.3f} "
            f"(base model: {numbers['mean_abs_logit_diff_base_to_prefix_tuned']:.3f}), "
            f"KL(prefix-tuned || converted) per token = {numbers['kl_prefix_tuned_to_converted']:.4f}"
        )
    return report


LABELS = {
    "none": "no memory (base)",
    "last_k": "last K tokens as context",
    "exact_prefix": "uncompressed: all memory keys (O(n))",
    "ntk_elu": "NTK elu, init from text",
    "ntk_elu_calibrated": "NTK elu, init from text + calibration",
    "ntk_favor": "NTK favor, init from text",
    "ntk_favor_calibrated": "NTK favor, init from text + calibration",
    "finetuned_from_text": "NTK fine-tuned from text init (mass cal.)",
    "ntk_elu_scaled": "NTK elu, text init + perplexity calibration",
    "finetuned_from_random": "NTK fine-tuned from random init",
    "finetuned_from_scaled": "NTK fine-tuned from text init (ppl cal.)",
    "finetuned_prefix": "prefix tuning (K tokens) fine-tuned",
    "prefix_converted_elu": "prefix -> NTK (elu)",
    "prefix_converted_favor": "prefix -> NTK (favor)",
}


def print_table(ppl: dict) -> None:
    print(f"\n{'memory of the document':<44}{'perplexity':>12}{'vs none':>10}")
    for name, value in ppl.items():
        print(f"{LABELS.get(name, name):<44}{value:>12.2f}{value / ppl['none']:>10.3f}")


def plot(report: dict, path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    ppl = report["perplexity"]
    names = list(ppl)
    fig, ax = plt.subplots(figsize=(10, 5.2))
    colors = [
        "gray" if n == "none" else "tab:green" if n == "last_k" else "tab:purple" if n == "exact_prefix" else "tab:blue"
        for n in names
    ]
    ax.barh([LABELS.get(n, n) for n in names], [ppl[n] for n in names], color=colors)
    ax.axvline(ppl["none"], color="gray", linestyle=":")
    ax.invert_yaxis()
    ax.set_xlabel("perplexity on the continuation (lower is better)")
    doc = report["document"]
    ax.set_title(
        f"memory: {doc['memory_tokens']} tokens of {doc['module']} docstrings; K = {report['equal_memory']['k_tokens']}",
        fontsize=10,
    )
    return bench.save_figure(fig, path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = bench.argument_parser(__doc__, quick="small everything, < 3 min (used by the tests)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--base-dir", default=None, help="load the pretrained base from here, or save it here")
    parser.add_argument(
        "--module", default=None, help="the document: docstrings of this module (typing; quick logging)"
    )
    parser.add_argument("--memory-tokens", type=int, default=None, help="tokens compressed (6144; quick 1024)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="continuation tokens scored (2048; quick 384)")
    parser.add_argument("--block-size", type=int, default=None, help="context window (128; quick 64)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (4; quick 2)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (768; quick 512)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (800; quick 300)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="adapter training steps (150; quick 30)")
    parser.add_argument("--finetune-lr", type=float, default=5e-2, help="NTK learning rate (the demo's)")
    parser.add_argument("--prefix-lr", type=float, default=1e-2, help="prefix-tuning learning rate")
    parser.add_argument(
        "--convert-r", type=int, default=None, help="FAVOR+ features for the conversion (1024; quick 256)"
    )
    parser.add_argument("--val-tokens", type=int, default=None, help="held-back memory tokens (512; quick 128)")
    parser.add_argument("--seed", type=int, default=0)
    return bench.fill_defaults(parser.parse_args(argv), DEFAULTS)


def main(argv: Optional[list[str]] = None) -> dict:
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    with quiet_run(args.threads):
        hf_logging.disable_progress_bar()
        set_seed(args.seed)
        report = run(args)
    stem = "ntk_long_context_quick" if args.quick else "ntk_long_context"
    note = f"; total {report['timings_s']['total_s']} s"
    bench.save_report(report, args.output_dir / f"{stem}.json", lambda png: plot(report, png), note=note)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
