"""Small offline stand-ins and the stock-Trainer loop that the demo and the benchmarks share.

A byte-level BPE tokenizer trained on the spot, a small Llama built from a config, a Trainer run over fixed token
blocks, and perplexity on held-out blocks: what a benchmark needs when no pretrained model may be downloaded.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

EOS = "<|endoftext|>"


@contextlib.contextmanager
def quiet_run(threads: Optional[int] = None) -> Iterator[None]:
    """For a script's main: torch threads set (default: every core, at most 4) and transformers' logs at errors only
    (the script prints its own table and progress bars); both put back afterwards, so tests can call main()."""
    import os

    from transformers.utils import logging as hf_logging

    previous_threads, previous_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(previous_verbosity)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, EOS doubling as BOS and padding) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def small_llama(
    tokenizer: Any,
    *,
    hidden_size: int,
    num_hidden_layers: int,
    max_position_embeddings: int,
    intermediate_size: Optional[int] = None,
    num_attention_heads: int = 4,
    num_key_value_heads: Optional[int] = None,
    **config: Any,
) -> torch.nn.Module:
    """A randomly initialised Llama for ``tokenizer`` (its vocabulary and special tokens), from a ``LlamaConfig``.

    The MLP is twice as wide as the model and there are half as many key/value heads as query heads unless said
    otherwise; ``config`` goes to ``LlamaConfig`` too (e.g. ``tie_word_embeddings``, ``initializer_range``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads or max(num_attention_heads // 2, 1),
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


class BlockDataset(torch.utils.data.Dataset):
    """(N, L) token blocks as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def train_on_blocks(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    run_dir: Union[str, Path],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    logging_steps: Optional[int] = None,
    use_cpu: Optional[bool] = None,
    show_progress: bool = False,
    run_name: Optional[str] = None,
    callbacks: Optional[list[Any]] = None,
) -> tuple[Any, float]:
    """The stock ``Trainer`` on ``blocks``: AdamW, cosine decay, 10 % warm-up, no weight decay, no checkpoints.

    Returns ``(trainer, seconds)``; ``run_dir`` is removed again when the run left nothing in it.
    """
    from transformers import Trainer, TrainingArguments

    run_dir = Path(run_dir)
    args = TrainingArguments(
        output_dir=str(run_dir),
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
        report_to=[],
        seed=seed,
        data_seed=seed,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=logging_steps or max(1, steps // 8),
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
        run_name=run_name,
    )
    started = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks), callbacks=callbacks)
    trainer.train()
    seconds = time.perf_counter() - started
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return trainer, seconds


def logged_losses(trainer: Any) -> list[float]:
    """The training losses a Trainer logged, in order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32, desc: Optional[str] = None) -> float:
    """Token-level perplexity of a causal LM on (N, L) blocks: every next-token prediction counts once."""
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(
            f"perplexity needs (N, L) token blocks with N >= 1 and L >= 2, got shape {tuple(blocks.shape)}"
        )
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=f"perplexity: {desc}", leave=False) if desc else starts:
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)
