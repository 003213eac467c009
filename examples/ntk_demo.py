"""NTK-Attention end to end, offline, on a laptop CPU.

What it does
------------
1. Builds two real text corpora from the Python installation itself (nothing is downloaded):
   * general domain: the Python reference documentation shipped as ``pydoc_data.topics`` (~465k characters);
   * target domain: the docstrings of a few standard-library modules (``json``, ``re``, ``itertools``, ...), split
     docstring by docstring into a training part and a held-out part.
2. Trains a small byte-level BPE tokenizer on the general text with ``tokenizers``.
3. "Pretrains" a tiny ``LlamaForCausalLM`` on the general text for about a minute, saves it and freezes it.
4. Fine-tunes it on the target domain with NTK-Attention (``get_peft_model(base, NTKAttentionConfig(...))``) and the
   stock ``transformers.Trainer``: only the per-head ``Z`` and ``k`` of every attention layer are trained.
5. Saves the adapter, loads it back with ``PeftModel.from_pretrained`` onto a freshly loaded copy of the saved base
   and checks that the logits are identical.
6. Prints held-out perplexities (base vs NTK-adapted, on target and general text) and a greedy continuation of a
   target-domain prompt from each model, and writes ``summary.json`` to the output directory.

How to run
----------
    python examples/ntk_demo.py                      # about 2-4 minutes on a 2-core CPU
    python examples/ntk_demo.py --quick              # about 30 s, smaller everything (used by the tests)
    python examples/ntk_demo.py --output-dir /tmp/ntk_demo --finetune-steps 200

The output directory (default ``outputs/ntk_demo``) receives ``base/`` (model + tokenizer), ``adapter/`` (the NTK
adapter, a few hundred KB) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

import peft_ntk  # registers the NTK_ATTENTION adapter type

EOS = "<|endoftext|>"

TARGET_MODULES = (
    "json",
    "re",
    "itertools",
    "collections",
    "functools",
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "fractions",
    "difflib",
    "shutil",
    "tempfile",
    "contextlib",
    "pprint",
    "copy",
    "fnmatch",
    "glob",
    "base64",
    "csv",
    "queue",
    "calendar",
)
QUICK_TARGET_MODULES = TARGET_MODULES[:12]


# ---------------------------------------------------------------------------------------------------------------------
# data


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}", flush=True)


def general_documents() -> list[str]:
    """The Python reference documentation that ships with CPython, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def _public_members(module) -> list[tuple[str, object]]:
    members = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if inspect.ismodule(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        members.append((name, obj))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    members.append((f"{name}.{attr}", getattr(obj, attr, None)))
    return members


def target_documents(module_names) -> list[str]:
    """Docstrings of a few standard-library modules, their functions, classes and methods (deduplicated)."""
    docs: list[str] = []
    seen: set[str] = set()
    for module_name in module_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
        candidates = [(module_name, module)] + [(f"{module_name}.{n}", o) for n, o in _public_members(module)]
        for qualname, obj in candidates:
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40 or doc in seen:
                continue
            seen.add(doc)
            docs.append(f"{qualname}\n{doc.strip()}")
    return docs


def split_documents(docs: list[str], heldout_every: int) -> tuple[list[str], list[str]]:
    """Every ``heldout_every``-th document is held out (a deterministic split by document, no shared text)."""
    train = [d for i, d in enumerate(docs) if i % heldout_every != heldout_every - 1]
    heldout = [d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1]
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def token_blocks(tokenizer, docs: list[str], block_size: int, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Concatenate the documents (EOS-separated) and cut the token stream into (N, block_size) blocks."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# ---------------------------------------------------------------------------------------------------------------------
# models


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-level perplexity of a causal LM on (N, L) blocks (every next-token prediction counts once)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,  # show the full continuation
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def training_args(output_dir: Path, args, *, steps: int, lr: float, warmup: int, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        logging_steps=max(1, steps // 8),
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--output-dir", default="outputs/ntk_demo", help="where base/, adapter/ and summary.json go")
    parser.add_argument("--quick", action="store_true", help="a ~30 s run with smaller data, model and step counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see main())")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 768, quick 512)")
    parser.add_argument(
        "--block-size", type=int, default=None, help="tokens per training block (default 128, quick 64)"
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, quick 2)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="general-domain steps (default 500, quick 400)"
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=None, help="NTK steps on the target (default 200, quick 150)"
    )
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--sample-tokens", type=int, default=None, help="greedy tokens per sample (default 60, quick 30)"
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(vocab_size=512, block_size=64, layers=2, pretrain_steps=400, finetune_steps=150, sample_tokens=30)
        if args.quick
        else dict(vocab_size=768, block_size=128, layers=4, pretrain_steps=500, finetune_steps=200, sample_tokens=60)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# the demo


def train(model, blocks, run_dir: Path, args, steps: int, lr: float) -> tuple[Trainer, float]:
    """Train ``model`` on ``blocks`` with the stock Trainer; returns the trainer and the seconds it took."""
    t0 = time.perf_counter()
    run_args = training_args(run_dir, args, steps=steps, lr=lr, warmup=max(1, steps // 10), batch_size=args.batch_size)
    trainer = Trainer(model=model, args=run_args, train_dataset=BlockDataset(blocks))
    trainer.train()
    _remove_if_empty(run_dir)
    return trainer, time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    # A model this small gains next to nothing from more threads, and with other processes busy on the same cores
    # extra intra-op threads spin-wait and slow every step down by 10-50x. One thread keeps the run time predictable.
    previous_threads, previous_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    progress_bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    # Keep the output to the demo's own prints and the training logs.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(previous_verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()


def _run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    random.seed(args.seed)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. data and tokenizer --------------------------------------------------------------------------------------------
    header("1. Data (offline): Python reference docs (general) and stdlib docstrings (target)")
    general = general_documents()
    general_train, general_heldout = split_documents(general, heldout_every=10)
    target = target_documents(QUICK_TARGET_MODULES if args.quick else TARGET_MODULES)
    target_train, target_heldout = split_documents(target, heldout_every=5)
    chars = lambda docs: sum(len(d) for d in docs)  # noqa: E731
    print(f"general: {len(general)} topics, {chars(general):,} chars ({len(general_heldout)} topics held out)")
    print(f"target : {len(target)} docstrings, {chars(target):,} chars ({len(target_heldout)} held out)")

    tokenizer = train_tokenizer(general_train, args.vocab_size)
    block = args.block_size
    general_blocks = token_blocks(tokenizer, general_train, block)
    general_eval = token_blocks(tokenizer, general_heldout, block, max_blocks=64 if args.quick else 128)
    target_blocks = token_blocks(tokenizer, target_train, block)
    target_eval = token_blocks(tokenizer, target_heldout, block, max_blocks=64 if args.quick else 128)
    print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained on the general text")
    print(
        f"blocks of {block} tokens: general train {len(general_blocks)}, general held-out {len(general_eval)}, "
        f"target train {len(target_blocks)}, target held-out {len(target_eval)}"
    )
    timings["data_s"] = time.perf_counter() - t_start

    # 2. pretrain the base on general text -----------------------------------------------------------------------------
    header("2. Pretraining a tiny Llama on the general domain")
    set_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, block),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(config)
    print(
        f"LlamaForCausalLM: {args.layers} layers, hidden 128, 4 heads (2 kv heads), head dim 32, "
        f"{sum(p.numel() for p in base.parameters()):,} parameters"
    )
    pretrainer, timings["pretrain_s"] = train(
        base, general_blocks, out_dir / "pretrain_runs", args, args.pretrain_steps, args.pretrain_lr
    )
    base.eval()
    base_dir = out_dir / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    print(f"pretrained in {timings['pretrain_s']:.0f} s; base model and tokenizer saved to {base_dir}")

    # 3. NTK-Attention fine-tuning on the target domain ----------------------------------------------------------------
    header("3. Fine-tuning with NTK-Attention on the target domain (stock transformers.Trainer)")
    set_seed(args.seed)
    ntk_config = peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM")
    model = get_peft_model(base, ntk_config)
    model.print_trainable_parameters()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    first = model.base_model.model.model.layers[0].self_attn  # an NTKAttentionLayer around LlamaAttention
    z_shape, k_shape = tuple(first.ntk_z["default"].shape), tuple(first.ntk_k["default"].shape)
    print(f"trainable tensors: {len(trainable)}; per layer Z {z_shape} and k {k_shape} (heads x head_dim [x head_dim])")
    finetuner, timings["finetune_s"] = train(
        model, target_blocks, out_dir / "finetune_runs", args, args.finetune_steps, args.finetune_lr
    )
    print(f"fine-tuned in {timings['finetune_s']:.0f} s")

    # 4. save, reload onto a fresh base, compare -----------------------------------------------------------------------
    header("4. Saving the adapter and reloading it onto a freshly loaded base")
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    adapter_files = {p.name: p.stat().st_size for p in sorted(adapter_dir.iterdir())}
    print(
        f"adapter saved to {adapter_dir}: " + ", ".join(f"{k} ({v / 1024:.0f} KiB)" for k, v in adapter_files.items())
    )
    fresh_base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    model.eval()
    with torch.no_grad():
        probe = target_eval[:4]
        logits_trained = model(input_ids=probe).logits
        logits_reloaded = reloaded(input_ids=probe).logits
        reload_identical = bool(torch.equal(logits_trained, logits_reloaded))
        reload_max_diff = (logits_trained - logits_reloaded).abs().max().item()
    print(f"logits of trained and reloaded model identical: {reload_identical} (max |diff| = {reload_max_diff:.3g})")

    # 5. the effect ----------------------------------------------------------------------------------------------------
    header("5. Held-out perplexity: frozen base vs NTK-adapted (reloaded)")
    results = {
        "base": {"target": perplexity(fresh_base, target_eval), "general": perplexity(fresh_base, general_eval)},
        "ntk": {"target": perplexity(reloaded, target_eval), "general": perplexity(reloaded, general_eval)},
    }
    with reloaded.disable_adapter():  # the same model with its adapter switched off is the base again
        results["ntk_disabled"] = {
            "target": perplexity(reloaded, target_eval),
            "general": perplexity(reloaded, general_eval),
        }
    rows = (
        ("base", "base (frozen, pretrained)"),
        ("ntk", "NTK-adapted (reloaded)"),
        ("ntk_disabled", "NTK model, adapter disabled"),
    )
    print(f"{'model':<30}{'target held-out ppl':>22}{'general held-out ppl':>23}")
    for name, label in rows:
        print(f"{label:<30}{results[name]['target']:>22.2f}{results[name]['general']:>23.2f}")
    change = 100 * (results["ntk"]["target"] / results["base"]["target"] - 1)
    print(f"target-domain perplexity change: {change:+.1f}%")

    prompt_doc = target_heldout[0]
    prompt = prompt_doc[: prompt_doc.find("\n") + 1 + 40]
    samples = {
        "base": greedy(fresh_base, tokenizer, prompt, args.sample_tokens),
        "ntk": greedy(reloaded, tokenizer, prompt, args.sample_tokens),
    }
    header("Greedy continuations of a held-out target-domain prompt")
    print(f"prompt:\n{prompt!r}\n")
    print(f"base:\n{samples['base']!r}\n")
    print(f"NTK-adapted:\n{samples['ntk']!r}")

    timings["total_s"] = time.perf_counter() - t_start
    summary = {
        "args": vars(args),
        "versions": {"torch": torch.__version__, "peft_ntk": peft_ntk.__version__},
        "data": {
            "general_documents": len(general),
            "target_documents": len(target),
            "target_modules": list(QUICK_TARGET_MODULES if args.quick else TARGET_MODULES),
            "tokens_per_block": block,
            "blocks": {
                "general_train": len(general_blocks),
                "general_heldout": len(general_eval),
                "target_train": len(target_blocks),
                "target_heldout": len(target_eval),
            },
        },
        "model": {
            "base_parameters": sum(p.numel() for p in fresh_base.parameters()),
            "ntk_trainable_parameters": sum(trainable.values()),
        },
        "loss": {
            "pretrain_final": _last_loss(pretrainer),
            "finetune_first": _first_loss(finetuner),
            "finetune_final": _last_loss(finetuner),
        },
        "perplexity": results,
        "target_ppl_change_percent": change,
        "reload_identical": reload_identical,
        "reload_max_abs_diff": reload_max_diff,
        "adapter_files": adapter_files,
        "prompt": prompt,
        "samples": samples,
        "timings_s": timings,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    header("Done")
    print(f"summary written to {out_dir / 'summary.json'}; total {timings['total_s']:.0f} s")
    return summary


def _remove_if_empty(path: Path) -> None:
    """Trainer creates its output_dir even with save_strategy="no"; drop it when nothing was written there."""
    try:
        path.rmdir()
    except OSError:
        pass


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _first_loss(trainer) -> Optional[float]:
    losses = _losses(trainer)
    return losses[0] if losses else None


def _last_loss(trainer) -> Optional[float]:
    losses = _losses(trainer)
    return losses[-1] if losses else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
