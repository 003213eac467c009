"""Where the NTK-Attention training step spends its GPU time, against the frozen base model (issue 5's profile).

Two parts, in one run:

1. **The attention op alone** at Llama-1B shapes (32 query / 8 key-value heads of 64, bf16, causal): forward+backward
   time of torch's SDPA (what the base model runs), of ``fused_attention_with_lse`` (the same kernels plus the LSE and
   its gradient) and of ``fused_ntk_attention`` (plus the prefix combine), and of ``ntk_prefix_combine`` alone.
2. **The model step** (``benchmarks/bench_ntk_speed.py``'s GPU model, fewer layers by default) under
   ``torch.profiler``: the CUDA kernels that take the most time in each variant, so the difference can be read off.

    python benchmarks/profile_ntk_gpu.py                       # L = 4096, 4 layers
    python benchmarks/profile_ntk_gpu.py --lengths 4096 32768 --layers 2

Needs a CUDA GPU. Prints tables and writes JSON (``--out``, default benchmarks/results/ntk_profile_gpu.json).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from ntk_rankgen_assets import bench

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cuda_time_ms(fn: Callable[[], Any], warmup: int = 3, steps: int = 10) -> float:
    """Median time of ``fn`` between CUDA events (ms)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_op_table(length: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 64) -> dict[str, float]:
    import torch.nn.functional as F

    from peft_ntk.ops import fused_attention_with_lse, fused_ntk_attention, ntk_prefix_combine
    from peft_ntk.ops.triton_combine import triton_prefix_combine

    g = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16

    def leaf(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g).requires_grad_(True)

    # transformers hands attention functions (B, H, L, d) views of (B, L, H, d) projections
    q = leaf(1, length, heads, head_dim).transpose(1, 2)
    k = leaf(1, length, kv_heads, head_dim).transpose(1, 2)
    v = leaf(1, length, kv_heads, head_dim).transpose(1, 2)
    z = (torch.randn(heads, head_dim, head_dim, device="cuda", generator=g) * 1e-2).requires_grad_(True)
    kvec = (torch.rand(heads, head_dim, device="cuda", generator=g) * 1e-2).requires_grad_(True)
    grad = torch.randn(1, heads, length, head_dim, device="cuda", dtype=dtype, generator=g)
    attn_out = torch.randn(1, heads, length, head_dim, device="cuda", generator=g).requires_grad_(True)
    lse = torch.randn(1, heads, length, device="cuda", generator=g).requires_grad_(True)
    attn_bf16 = attn_out.detach().to(dtype).requires_grad_(True)

    def sdpa_fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def fused_fwd():
        return fused_attention_with_lse(q, k, v, is_causal=True)

    def ntk_fwd():
        return fused_ntk_attention(q, k, v, z, kvec, is_causal=True)

    def combine_fwd():
        return ntk_prefix_combine(attn_out, lse, q, z, kvec)[0]

    def triton_combine_fwd():
        return triton_prefix_combine(attn_bf16, lse, q, z, kvec)

    rows: dict[str, float] = {}
    with torch.no_grad():
        rows["sdpa fwd"] = cuda_time_ms(sdpa_fwd)
        rows["fused O+LSE fwd"] = cuda_time_ms(fused_fwd)
        rows["fused ntk fwd"] = cuda_time_ms(ntk_fwd)
        rows["combine fwd (autograd, fp32)"] = cuda_time_ms(combine_fwd)
        rows["combine fwd (triton)"] = cuda_time_ms(triton_combine_fwd)
    rows["sdpa fwd+bwd"] = cuda_time_ms(lambda: sdpa_fwd().backward(grad))
    rows["fused O fwd+bwd"] = cuda_time_ms(lambda: fused_fwd()[0].backward(grad))
    rows["fused O+LSE fwd+bwd"] = cuda_time_ms(
        lambda: torch.autograd.backward(fused_fwd(), (grad, torch.ones(1, heads, length, device="cuda")))
    )
    rows["fused ntk fwd+bwd"] = cuda_time_ms(lambda: ntk_fwd().backward(grad))
    rows["combine fwd+bwd (autograd)"] = cuda_time_ms(lambda: combine_fwd().backward(grad.float()))
    rows["combine fwd+bwd (triton)"] = cuda_time_ms(lambda: triton_combine_fwd().backward(grad))
    return rows


def profile_model_step(length: int, layers: int, variant: str, top: int) -> dict[str, Any]:
    import bench_ntk_speed as speed
    from torch.profiler import ProfilerActivity, profile

    task = {
        "variant": variant,
        "device": "cuda",
        "dtype": "bfloat16",
        "model": {**speed.PRESETS["gpu"]["model"], "num_hidden_layers": layers, "max_position_embeddings": length},
    }
    model, patches = speed._build_model(task)
    ids = torch.randint(0, task["model"]["vocab_size"], (1, length), device="cuda")

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    with patches:
        step_ms = cuda_time_ms(step, warmup=2, steps=5)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            kernels[event.key] = {"ms": device_us / 1e3, "calls": event.count}
    total = sum(k["ms"] for k in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:top]
    model = patches = None
    torch.cuda.empty_cache()
    return {"step_ms": step_ms, "kernel_ms_total": total, "top": ranked}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["base", "ntk-fused", "lora-r8"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ntk_profile_gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    env = bench.environment("cuda")
    report: dict[str, Any] = {"gpu": env["gpu"], "torch": env["torch"], "environment": env, "lengths": {}}
    for length in args.lengths:
        ops = attention_op_table(length)
        print(f"\nattention op alone, L = {length} (ms, CUDA events, median of 10)")
        for name, ms in ops.items():
            print(f"  {name:<30} {ms:9.3f}")
        steps = {}
        for variant in args.variants:
            steps[variant] = profile_model_step(length, args.layers, variant, args.top)
            r = steps[variant]
            print(
                f"\n{variant}: step {r['step_ms']:.1f} ms, kernels {r['kernel_ms_total']:.1f} ms ({args.layers} layers)"
            )
            for name, k in r["top"]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {name[:110]}")
        report["lengths"][str(length)] = {"attention_op_ms": ops, "model_step": steps}
    print()
    bench.save_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
