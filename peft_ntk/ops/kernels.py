"""Fused attention kernels that return the log-sum-exp, behind one small interface (:class:`FusedKernel`).

Each adapter wraps one of torch's fused attention ops with its backward: the CPU flash kernel (:data:`CPU_FLASH`) and,
on CUDA, the flash, memory-efficient and cuDNN kernels. :func:`select_kernel` picks the one torch's own SDPA would pick
for the inputs, so NTK layers run the same attention kernel as the frozen base model. The generic logic around them
(LSE gradients, padding, masks) lives in :mod:`peft_ntk.ops.fused_attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EFFICIENT_BIAS_ALIGNMENT = 16  # elements; torch's own SDPA pads the mask's last dim the same way

# ----------------------------------------------------------------------------------------------------- kernel adapters


@dataclass(frozen=True)
class FusedKernel:
    """A fused attention kernel that returns the log-sum-exp, with the backward op that takes it.

    ``forward(q, k, v, bias, is_causal, scale) -> (out, lse, state)``: ``q, k, v`` (B, H, L, P) with equal head counts
    (unless ``native_gqa``) and one head size ``P`` (a multiple of ``head_dim_multiple``), ``bias`` an additive mask
    from ``prepare_bias`` or None; ``out`` (B, H, Lq, P), ``lse`` (B, H, Lq) in natural log, ``state`` what the
    backward needs (tensors or plain values).
    ``backward(grad_out, q, k, v, bias, out, state, is_causal, scale) -> (dq, dk, dv)``, where ``out`` enters only
    through ``D_i = <dO_i, out_i>``. ``is_causal`` is only passed with ``Lq == Lk`` (top-left and bottom-right causal
    masks agree there).
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    head_dim_multiple: int = 1
    supports_bias: bool = True
    prepare_bias: Optional[Callable[[torch.Tensor, tuple[int, int, int, int]], torch.Tensor]] = None
    #: Takes k, v with fewer heads than q (grouped-query attention) and returns dk, dv per key/value head.
    native_gqa: bool = False


def _cpu_forward(query, key, value, bias, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=bias, scale=scale
    )
    return out, lse, (lse,)


def _cpu_backward(grad_out, query, key, value, bias, out, state, is_causal, scale):
    (lse,) = state
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale
    )


def broadcast_bias(bias: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Keep size-1 batch/head dims (the CPU kernel broadcasts them), expand the rest."""
    return bias.expand(bias.shape[0], bias.shape[1], shape[2], shape[3])


CPU_FLASH = FusedKernel("cpu-flash", _cpu_forward, _cpu_backward, native_gqa=True)


def _cuda_flash_forward(query, key, value, bias, is_causal, scale):
    if bias is not None:
        raise ValueError("the CUDA flash kernel takes no attention mask")
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, is_causal, False, scale=scale
    )
    return out, lse[..., : query.shape[2]], (lse, cum_q, cum_k, max_q, max_k, seed, offset)


def _cuda_flash_backward(grad_out, query, key, value, bias, out, state, is_causal, scale):
    lse, cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, query, key, value, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=scale
    )


def _cuda_efficient_forward(query, key, value, bias, is_causal, scale):
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, 0.0, is_causal, scale=scale
    )
    # The LSE comes padded to a multiple of 32 queries on CUDA; the backward wants it exactly as returned.
    return out, lse[..., : query.shape[2]], (lse, seed, offset)


def _cuda_efficient_backward(grad_out, query, key, value, bias, out, state, is_causal, scale):
    lse, seed, offset = state
    grad_q, grad_k, grad_v, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out,
        query,
        key,
        value,
        bias,
        out,
        lse,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        is_causal,
        scale=scale,
    )
    return grad_q, grad_k, grad_v


def _aligned_bias(bias: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """(B, H, Lq, Lk) view of ``bias`` whose rows start on 16-element boundaries (the memory-efficient kernel's rule).

    Size-1 batch/head dims stay stride-0 views, so a (1, 1, Lq, Lk) mask is never copied per head.
    """
    k_len = shape[3]
    strides_ok = bias.stride(-1) == 1 and all(
        stride % _EFFICIENT_BIAS_ALIGNMENT == 0 for stride, size in zip(bias.stride()[:-1], bias.shape[:-1]) if size > 1
    )
    if not strides_ok or bias.storage_offset() % _EFFICIENT_BIAS_ALIGNMENT != 0:
        padded = (k_len + _EFFICIENT_BIAS_ALIGNMENT - 1) // _EFFICIENT_BIAS_ALIGNMENT * _EFFICIENT_BIAS_ALIGNMENT
        bias = F.pad(bias, (0, padded - k_len))[..., :k_len]
    return bias.expand(shape)


def _cuda_cudnn_forward(query, key, value, bias, is_causal, scale):
    if bias is not None:
        raise ValueError("the cuDNN kernel is only used without an attention mask")
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, is_causal, False, scale=scale
    )
    # cuDNN's softmax statistics come as (B, H, Lq, 1) in float32, natural log; the backward wants them as returned.
    return out, lse.reshape(lse.shape[:3]), (lse, cum_q, cum_k, max_q, max_k, seed, offset)


def _cuda_cudnn_backward(grad_out, query, key, value, bias, out, state, is_causal, scale):
    lse, cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, query, key, value, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, is_causal,
        scale=scale,
    )  # fmt: skip


CUDA_FLASH = FusedKernel(
    "cuda-flash", _cuda_flash_forward, _cuda_flash_backward, head_dim_multiple=8, supports_bias=False, native_gqa=True
)
CUDA_CUDNN = FusedKernel(
    "cuda-cudnn", _cuda_cudnn_forward, _cuda_cudnn_backward, head_dim_multiple=8, supports_bias=False, native_gqa=True
)
CUDA_EFFICIENT = FusedKernel(
    "cuda-efficient", _cuda_efficient_forward, _cuda_efficient_backward, head_dim_multiple=8, prepare_bias=_aligned_bias
)
# torch.nn.attention.SDPBackend values -> our adapters (torch's SDPA picks among the same three kernels)
_SDPA_BACKENDS = {1: CUDA_FLASH, 2: CUDA_EFFICIENT, 3: CUDA_CUDNN}


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def cuda_kernel_for(
    query: torch.Tensor, head_dim: int, has_bias: bool, *, room_for_channel: bool = True, grouped: bool = False
) -> Optional[FusedKernel]:
    """The kernel torch's own SDPA would pick for these inputs (cuDNN, flash or memory-efficient), or None.

    Following torch's choice (``torch._fused_sdp_choice``: its priority order, its per-GPU checks, and the user's
    ``torch.nn.attention.sdpa_kernel`` / ``torch.backends.cuda.enable_*_sdp`` settings) makes the NTK layers run the
    same attention kernel as the frozen base model. With ``room_for_channel`` the kernel must also take one more head
    channel (the "channel" LSE-gradient form); a kernel that cannot is replaced by the memory-efficient one, which
    takes any width. ``grouped``: fewer key/value heads than query heads (torch's choice then also says whether the
    kernel takes them as they are). Decided on a small probe of the padded width, cached per device, dtype, width,
    mask, decode, grouping and flags.
    """
    flags = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    decode = query.shape[2] == 1
    return _cuda_kernel_cached(
        query.device, query.dtype, round_up(head_dim, 8), has_bias, decode, room_for_channel, grouped, flags
    )


@functools.lru_cache(maxsize=64)
def _cuda_kernel_cached(
    device, dtype, width, has_bias, decode, room_for_channel, grouped, flags
) -> Optional[FusedKernel]:
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention

    if dtype not in _CUDA_DTYPES:
        return None

    def probe(w: int, length: int = 128, heads: int = 1) -> torch.Tensor:
        return torch.zeros((1, heads, length, w), dtype=dtype, device=device)

    q_len, q_heads = (1 if decode else 128), (2 if grouped else 1)
    mask = torch.zeros((1, 1, q_len, 128), dtype=dtype, device=device) if has_bias else None
    args = (probe(width, q_len, q_heads), probe(width), probe(width), mask)
    try:
        try:
            choice = torch._fused_sdp_choice(*args, enable_gqa=grouped)
        except TypeError:  # torch < 2.5: no grouped-query heads in SDPA; our adapters then get K/V expanded
            choice = torch._fused_sdp_choice(*args) if not grouped else 2
        kernel = _SDPA_BACKENDS.get(choice)
    except RuntimeError:  # no fused backend at all for these inputs (torch would use its math path)
        kernel = None
    if kernel is not None and kernel.supports_bias is False and has_bias:
        kernel = None
    if kernel is not None and room_for_channel and kernel is not CUDA_EFFICIENT:
        wider = probe(round_up(width + 1, 8))
        if kernel is CUDA_FLASH:
            fits = round_up(width + 1, 8) <= _FLASH_MAX_HEAD_DIM
        else:
            fits = can_use_cudnn_attention(SDPAParams(wider, wider, wider, None, 0.0, False, False))
        if not fits:
            kernel = None
    if kernel is None and can_use_efficient_attention(
        SDPAParams(probe(width, q_len), probe(width), probe(width), mask, 0.0, False, False)
    ):
        kernel = CUDA_EFFICIENT
    return kernel


_FLASH_MAX_HEAD_DIM = 256


def save_kernel_state(ctx, state: tuple[Any, ...]) -> list[torch.Tensor]:
    """Split a kernel's state into tensors (for save_for_backward) and the rest (kept on ctx)."""
    ctx.state_layout = [None if isinstance(x, torch.Tensor) else ("value", x) for x in state]
    return [x for x in state if isinstance(x, torch.Tensor)]


def load_kernel_state(ctx, tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    it = iter(tensors)
    return tuple(next(it) if slot is None else slot[1] for slot in ctx.state_layout)


def device_unavailable_reason(query: torch.Tensor) -> Optional[str]:
    device = query.device.type
    if device == "cpu":
        if not (
            hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
        ):
            return "this torch build lacks the fused CPU flash-attention kernel"
        return None
    if device == "cuda":
        if query.dtype not in _CUDA_DTYPES:
            return f"the CUDA kernels take float16, bfloat16 or float32 inputs, not {query.dtype}"
        return None
    return f"no fused kernel with exact LSE gradients is wired up for {device} yet"


def select_kernel(
    query: torch.Tensor, value: torch.Tensor, has_bias: bool, *, room_for_channel: bool = True
) -> FusedKernel:
    """The fused kernel for these inputs; ValueError naming the reason where none can serve.

    ``room_for_channel``: the backward may need the "channel" LSE-gradient form (one more head channel).
    """
    reason = device_unavailable_reason(query)
    if reason is not None:
        raise ValueError(f"no fused attention kernel for this call: {reason}")
    if query.device.type == "cpu":
        return CPU_FLASH
    grouped = value.shape[1] != query.shape[1]
    width = max(query.shape[-1], value.shape[-1])
    kernel = cuda_kernel_for(query, width, has_bias, room_for_channel=room_for_channel, grouped=grouped)
    if kernel is None:
        raise ValueError(
            f"no fused CUDA attention kernel (cuDNN, flash, memory-efficient) accepts {query.dtype} queries of head size "
            f"{query.shape[-1]} on this GPU (see torch.backends.cuda.can_use_efficient_attention(..., debug=True))"
        )
    return kernel
