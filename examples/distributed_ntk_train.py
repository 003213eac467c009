"""Data-parallel NTK-Attention training with the stock ``transformers.Trainer``: one script, three launchers.

The same file runs unchanged as

    python examples/distributed_ntk_train.py --output-dir /tmp/ntk_ddp/single
    torchrun --nproc_per_node=2 examples/distributed_ntk_train.py --output-dir /tmp/ntk_ddp/torchrun
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_ntk_train.py --output-dir /tmp/ntk_ddp/accel

The Trainer runs with ``use_cpu=True`` (pass ``--gpu`` to let it use the GPUs instead), so the two multi-process
launches are DDP over gloo on CPU. Note that ``accelerate launch --cpu --num_processes 2`` is *not* a two-process
launch: with ``--cpu`` accelerate's simple launcher starts one process unless an MPI hostfile is given
(``--mpirun_hostfile``). ``--multi_gpu`` makes accelerate start torch's elastic launcher, and the Trainer's
``use_cpu=True`` then puts accelerate in its MULTI_CPU (gloo) mode.

What it does: builds a tiny Llama from a config (same seed on every rank, so every rank starts from the same weights;
DDP also broadcasts rank 0's parameters when it wraps the model), adds an NTK adapter, and trains it for a few steps
on a deterministic toy dataset of token ids. The global batch is fixed (``--global-batch``, default 8) and each
process gets ``global_batch / world_size`` examples per step.

Why the runs are comparable: the sampler is sequential (``train_sampling_strategy="sequential"``). Accelerate shards
the per-device batches round-robin (batch ``i`` goes to rank ``i % world_size``), so at step ``s`` the union of the
ranks' batches is examples ``[s·G, (s+1)·G)``, exactly the single process's batch. Every sequence has the same length
and no padding, so the mean loss over a global batch equals the mean of the per-rank means, and DDP's gradient
average is the single-process gradient up to float rounding. (With the default random sampler the permutation comes
from the same seed whatever the world size today, but that is a detail of accelerate's sampler handling; the
sequential sampler makes the equality independent of it.)

``--fsdp 1`` / ``--fsdp 2`` (under torchrun, on CPU) train the same model with PyTorch FSDP instead: FSDP1
(``FullyShardedDataParallel`` with PEFT's ``fsdp_auto_wrap_policy`` and ``use_orig_params=True``) or FSDP2
(``fully_shard`` on every decoder layer, then the root). Accelerate enables FSDP only for GPU-like devices (its
MULTI_CPU mode never becomes FSDP), so on CPU the Trainer cannot do this; this mode shards by hand and runs the
Trainer's optimizer (AdamW, constant learning rate, no weight decay, no clipping) in a plain loop over the same
global batches. On GPUs use the Trainer with an accelerate FSDP config instead (see docs/distributed.md).

Outputs (``--output-dir``):

- ``adapter/``: the trained adapter (``Trainer.save_model`` -> ``PeftModel.save_pretrained``, main process only;
  with FSDP the full state dict is gathered first);
- ``rank{RANK}.json``: per rank, every adapter tensor as saved (``get_peft_model_state_dict``): shape, sha256 of the
  float32 bytes, sum and the values, plus the training losses and the launch set-up (with FSDP also the shape of
  each rank's local shard).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from peft import get_peft_model, get_peft_model_state_dict
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import peft_ntk  # registers the NTK_ATTENTION adapter type

VOCAB = 64


class ToyTokens(Dataset):
    """Deterministic sequences of token ids: arithmetic progressions mod VOCAB (learnable, no tokenizer needed).

    All sequences have the same length and no padding, so every example carries the same number of loss tokens.
    """

    def __init__(self, num_examples: int, seq_len: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (num_examples, 1), generator=g)
        step = torch.randint(1, 6, (num_examples, 1), generator=g)
        self.ids = (start + step * torch.arange(seq_len)) % VOCAB

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_base(seed: int) -> LlamaForCausalLM:
    """A tiny Llama built from a config with a fixed seed, so that every rank builds identical weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def build_model(seed: int) -> torch.nn.Module:
    """The tiny Llama with an NTK adapter (``ntk_z`` (4, 8, 8) and ``ntk_k`` (4, 8) per layer), same on every rank."""
    base = build_base(seed)
    # "random" init (N(0, 1/d)) gives the adapter a visible effect from step 0, so its gradients are not tiny.
    ntk_config = peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", init_weights="random")
    return get_peft_model(base, ntk_config)


def tensor_record(t: torch.Tensor) -> dict:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return {
        "shape": list(t.shape),
        "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
        "sum": float(t.sum()),
        "values": t.flatten().tolist(),  # float32 -> Python float is exact
    }


def launcher_name() -> str:
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_USE_CPU" in os.environ:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step, over all ranks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="let the Trainer use GPUs (default: use_cpu=True)")
    parser.add_argument(
        "--deepspeed", help="a DeepSpeed config file for the Trainer (GPUs; see docs/distributed.md; untested on CPU)"
    )
    parser.add_argument(
        "--fsdp",
        choices=("none", "1", "2"),
        default="none",
        help="shard with PyTorch FSDP1/FSDP2 by hand (CPU, gloo; launch with torchrun) instead of the Trainer",
    )
    return parser.parse_args(argv)


def train_with_trainer(args: argparse.Namespace, per_device: int) -> tuple[dict, dict]:
    model = build_model(args.seed)
    dataset = ToyTokens(args.global_batch * args.steps, args.seq_len, seed=args.seed + 1)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        use_cpu=not args.gpu,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, so the update is a plain function of the averaged gradient
        train_sampling_strategy="sequential",  # same global batches for any world size (see the module docstring)
        ddp_find_unused_parameters=False,  # every trainable parameter (ntk_z, ntk_k) is used in every step
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        deepspeed=args.deepspeed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    # The stock save path: gathers FSDP / ZeRO-3 shards when those are on, writes on the main process only.
    trainer.save_model(str(args.output_dir / "adapter"))

    accelerator = trainer.accelerator
    peft_model = accelerator.unwrap_model(trainer.model)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        # Collective: the full state dict is assembled on the main process; other ranks get what accelerate gives.
        full = accelerator.get_state_dict(trainer.model_wrapped)
        state = get_peft_model_state_dict(peft_model, state_dict=full) if full else {}
    else:
        state = get_peft_model_state_dict(peft_model)  # replicated (DDP) or single process: full tensors everywhere
    info = {
        "mode": "trainer",
        "distributed_type": accelerator.distributed_type.name,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    # Free the DDP-wrapped model (the Trainer and accelerate hold it) while every rank is still in the process group.
    # Left to the end of this function, its teardown ran after the group was destroyed and, now and then, blocked
    # forever in gloo once the other rank had exited.
    del trainer, peft_model
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group cleanly under torchrun / accelerate launch
    return state, info


def train_with_fsdp(args: argparse.Namespace, version: int, per_device: int, rank: int) -> tuple[dict, dict]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = build_model(args.seed)
    decoder_layer_classes = tuple(
        type(m) for m in model.modules() if type(m).__name__ in set(model.base_model.model._no_split_modules)
    )
    if version == 1:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # PEFT's policy: every decoder layer (the model's _no_split_modules) is one FSDP unit. The NTK layer has no
        # `.weight`, so its ntk_z / ntk_k are flattened into the decoder layer's unit together with the frozen base
        # weights; mixing trainable and frozen parameters in one unit needs use_orig_params=True.
        wrapped = FullyShardedDataParallel(
            model,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    else:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, decoder_layer_classes):
                fully_shard(module)
        wrapped = fully_shard(model)
    local_shapes = {
        name: list(p.to_local().shape if hasattr(p, "to_local") else p.shape)
        for name, p in wrapped.named_parameters()
        if "ntk_" in name
    }
    optimizer = torch.optim.AdamW(
        [p for p in wrapped.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    dataset = ToyTokens(args.global_batch * args.steps, args.seq_len, seed=args.seed + 1)
    wrapped.train()
    losses = []
    for step in range(args.steps):
        # The Trainer's sharding: rank r takes the r-th per-device slice of global batch `step`.
        start = step * args.global_batch + rank * per_device
        ids = dataset.ids[start : start + per_device]
        loss = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()  # FSDP reduce-scatters the gradients, averaged over ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / dist.get_world_size())

    # Gather the shards into full tensors on every rank (collective), keep the adapter's entries, save from rank 0.
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    to_save = model
    if version == 1:
        # FSDP1's auto-wrap renames modules in place (`layers.0._fsdp_wrapped_module.self_attn`). PEFT 0.21 picks the
        # adapter's entries of a state dict by module name and strips only a *leading* `_fsdp_wrapped_module.`
        # (peft/tuners/tuners_utils.py, _get_tuner_state_dict_key_prefixes), so with nested wrappers it selects
        # nothing and save_pretrained writes an empty adapter (LoRA too). Save from an unwrapped copy instead.
        to_save = build_model(args.seed)
        to_save.load_state_dict(full)
    state = get_peft_model_state_dict(to_save, state_dict=full)
    to_save.save_pretrained(str(args.output_dir / "adapter"), state_dict=full, is_main_process=rank == 0)
    info = {"mode": f"fsdp{version}", "distributed_type": f"FSDP{version}", "losses": losses}
    info["local_shapes"] = local_shapes
    # As in train_with_trainer: the sharded model and its optimizer go before the process group does (destroyed
    # after it, at interpreter exit, a rank could abort with "terminate called without an active exception").
    del wrapped, model, to_save, optimizer, full
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return state, info


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch % world_size:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world_size}")
    per_device = args.global_batch // world_size
    if rank != 0:
        hf_logging.set_verbosity_error()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.fsdp == "none":
        state, info = train_with_trainer(args, per_device)
    else:
        if world_size < 2 or "TORCHELASTIC_RUN_ID" not in os.environ and "MASTER_ADDR" not in os.environ:
            raise SystemExit("--fsdp needs a multi-process launch: torchrun --nproc_per_node=2 ...")
        state, info = train_with_fsdp(args, int(args.fsdp), per_device, rank)

    record = {
        "rank": rank,
        "world_size": world_size,
        "launcher": launcher_name(),
        "global_batch": args.global_batch,
        "per_device_batch": per_device,
        "steps": args.steps,
        **info,
        "seconds": round(time.perf_counter() - started, 2),
        "tensors": {key: tensor_record(value) for key, value in sorted(state.items())},
    }
    (args.output_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    if rank == 0:
        print(
            f"[{record['launcher']}/{record['mode']}] world_size={world_size} per_device_batch={per_device} "
            f"losses={[round(x, 4) for x in record['losses']]} adapter -> {args.output_dir / 'adapter'}"
        )
    return record


if __name__ == "__main__":
    main()
