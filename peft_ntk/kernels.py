"""Fused attention paths for NTK-Attention: (O, LSE) from a fused kernel, exact gradients, no (Lq × Lk) tensor.

NTK-Attention needs the ordinary attention output ``O`` and the log-sum-exp ``LSE`` of every row (see
:func:`peft_ntk.ops.ntk_prefix_combine`). Fused kernels return both, but their ``LSE`` is not differentiable, and the
prefix term's gradient flows through it into every earlier layer. :class:`_FusedAttentionWithLSE` restores that
gradient. In a flash-style backward ``out`` only enters through ``D_i = Σ_d dO_id · O_id``, and a gradient ``g_i`` on
``LSE_i`` enters the score gradient exactly as ``D_i − g_i``. Two ways hand the kernel's own backward that shift:

* ``"out"``: give the backward ``out'_i = O_i − (g_i / |dO_i|²) · dO_i`` instead of ``O_i``; then
  ``<dO_i, out'_i> = D_i − g_i``. No extra work inside the kernel. Its rounding error, ``≲ ε·(Σ_d |dO_id O_id| + |g_i|)``
  in the kernel's dtype, is the same as the kernel's own rounding of ``D_i`` and of ``g_i``. It cannot serve a row with
  ``dO_i = 0`` but ``g_i ≠ 0`` (or where ``out'`` leaves the dtype's range); then the whole call uses
* ``"channel"``: append a zero channel to v (and to q, k where the kernel wants equal head sizes; zero channels change
  no score and no output) and give the backward ``dO = 1`` and ``out = −g`` on it, which shifts ``D_i`` by ``−g_i``.
  Exact for every row, but the kernel runs with a larger head dimension.

The kernel calls themselves are injected (:class:`FusedKernel`): the generic logic (head-dim padding, the LSE gradient,
GQA expansion, causal alignment with a cache, rows without keys) is shared by every kernel and is tested on CPU with
torch's fused CPU flash kernel; only the thin CUDA adapters (:data:`CUDA_FLASH`, :data:`CUDA_EFFICIENT`) need a GPU.
Every path is tested against :func:`peft_ntk.ops.ntk_attention`, the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .fused_combine import feature_map_has_trainable_state, fused_prefix_combine
from .ops import FeatureMap, _check_feature_query, _check_inputs, causal_mask, ntk_prefix_combine, repeat_kv_heads
from .triton_combine import triton_combine_unavailable_reason, triton_ntk_attention, triton_prefix_combine

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

#: Whether ``attention_backend="auto"`` uses the fused CUDA path. Set once ``benchmarks/run_gpu.sh tests`` passed on a
#: GPU (an H200, torch 2.11 / CUDA 13.0); a fork that changes the CUDA adapters can set it back to False, so that
#: "auto" keeps the reference on CUDA until its own GPU run, while ``attention_backend="fused"`` still opts in.
CUDA_FUSED_PATH_VALIDATED = True

#: ``"unchecked_out"`` is the ``"out"`` form without its host-side check (no device sync per backward), for callers
#: that guarantee every row with an LSE gradient also has a non-zero output gradient (see fused_ntk_attention).
LSE_GRADIENT_MODES = ("auto", "out", "channel", "unchecked_out")
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


def _broadcast_bias(bias: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
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


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _cuda_kernel_for(
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
        query.device, query.dtype, _round_up(head_dim, 8), has_bias, decode, room_for_channel, grouped, flags
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
        wider = probe(_round_up(width + 1, 8))
        if kernel is CUDA_FLASH:
            fits = _round_up(width + 1, 8) <= _FLASH_MAX_HEAD_DIM
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


# ------------------------------------------------------------------------------------------- the autograd Function


def _save_state(ctx, state: tuple[Any, ...]) -> list[torch.Tensor]:
    """Split a kernel's state into tensors (for save_for_backward) and the rest (kept on ctx)."""
    ctx.state_layout = [None if isinstance(x, torch.Tensor) else ("value", x) for x in state]
    return [x for x in state if isinstance(x, torch.Tensor)]


def _load_state(ctx, tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    it = iter(tensors)
    return tuple(next(it) if slot is None else slot[1] for slot in ctx.state_layout)


def _out_adjusted_for_lse_gradient(
    out: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor, *, check: bool = True
) -> Optional[torch.Tensor]:
    """``out'`` with ``<dO_i, out'_i> = <dO_i, out_i> − g_i`` for every row, or None where that cannot be formed.

    The shift is along ``dO_i`` itself: ``out'_i = out_i − (g_i / |dO_i|²) dO_i``, computed in float32 (float64 for
    float64) and cast to the kernel's dtype; the kernels form ``D_i`` in float32 from the same values. ``g`` is first
    rounded to that dtype, as the "channel" form would round it.
    """
    work = torch.float64 if out.dtype == torch.float64 else torch.float32
    grad_lse = grad_lse.to(out.dtype).to(work)
    do = grad_out.to(work)
    norm2 = do.square().sum(-1)
    usable = norm2 > torch.finfo(work).tiny
    coeff = torch.where(usable, grad_lse / torch.where(usable, norm2, torch.ones_like(norm2)), torch.zeros_like(norm2))
    adjusted = torch.empty_like(out)  # keeps out's memory layout
    adjusted.copy_(out.to(work) - coeff.unsqueeze(-1) * do)
    if not check or adjusted.device.type == "meta":  # meta: shape checks only, nothing to decide
        return adjusted
    unsafe = ((grad_lse != 0) & ~usable).any() | ~torch.isfinite(adjusted).all()
    return None if bool(unsafe) else adjusted


class _FusedAttentionWithLSE(torch.autograd.Function):
    """(O, LSE) from an injected :class:`FusedKernel`, differentiable in both outputs.

    Inputs: q, k, v (B, H, L, d / dv) with equal head counts (unless the kernel has ``native_gqa``), an additive
    ``bias`` already in the kernel's layout (or None). Head sizes are zero-padded to the kernel's multiple (and to one size where the kernel needs equal sizes) here.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, is_causal: bool, scale: float, kernel: FusedKernel, lse_gradient: str):
        head_dim, value_dim = query.shape[-1], value.shape[-1]
        width = _round_up(max(head_dim, value_dim), kernel.head_dim_multiple)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] != width else t for t in (query, key, value))
        out, lse, state = kernel.forward(q, k, v, bias, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, bias, *_save_state(ctx, state))
        ctx.is_causal, ctx.scale, ctx.kernel, ctx.lse_gradient = is_causal, scale, kernel, lse_gradient
        ctx.head_dim, ctx.value_dim = head_dim, value_dim
        ctx.set_materialize_grads(False)
        # Views of what the backward reads (as torch's own SDPA returns its saved output): an in-place edit by the
        # caller makes the backward raise rather than silently use the edited values.
        return (out[..., :value_dim] if width != value_dim else out), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, bias, *state_tensors = ctx.saved_tensors
        state = _load_state(ctx, tuple(state_tensors))
        layout, width = out, out.shape[-1]
        if grad_out is None:
            grad_out = torch.zeros(out.shape[:-1] + (ctx.value_dim,), dtype=out.dtype, device=out.device)
        grad_out = grad_out.to(out.dtype)
        if width != ctx.value_dim:
            grad_out = F.pad(grad_out, (0, width - ctx.value_dim))
        if grad_lse is not None:
            adjusted = None
            if ctx.lse_gradient == "unchecked_out":
                adjusted = _out_adjusted_for_lse_gradient(out, grad_out, grad_lse, check=False)
            elif ctx.lse_gradient in ("auto", "out"):
                adjusted = _out_adjusted_for_lse_gradient(out, grad_out, grad_lse)
                if adjusted is None and ctx.lse_gradient == "out":
                    raise RuntimeError(
                        "lse_gradient='out' cannot serve this backward (a row has an LSE gradient but no output "
                        "gradient, or the shifted output leaves the dtype's range); use lse_gradient='auto'"
                    )
            if adjusted is not None:
                out = adjusted
            else:
                # One more channel: zeros in q, k, v (no score or output changes), dO = 1 and out = -g on it.
                extra = _round_up(width + 1, ctx.kernel.head_dim_multiple) - width
                q, k, v = (F.pad(t, (0, extra)) for t in (q, k, v))
                marker = torch.zeros(extra, dtype=out.dtype, device=out.device)
                marker[0] = 1
                grad_out = torch.cat([grad_out, marker.expand(grad_out.shape[:-1] + (extra,))], dim=-1)
                lse_channel = F.pad(-grad_lse.to(out.dtype).unsqueeze(-1), (0, extra - 1))
                out = torch.cat([out, lse_channel], dim=-1)
        # The kernels' backwards read out and dO in the memory layout their forward wrote out in (CUDA's
        # memory-efficient kernel derives out's strides from its shape).
        grad_q, grad_k, grad_v = ctx.kernel.backward(
            _same_layout(grad_out, layout), q, k, v, bias, _same_layout(out, layout), state, ctx.is_causal, ctx.scale
        )
        return grad_q[..., : ctx.head_dim], grad_k[..., : ctx.head_dim], grad_v[..., : ctx.value_dim], *(None,) * 5


def _same_layout(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (same rank as ``like``, last dim may differ) stored with ``like``'s order of dimensions in memory."""
    order = sorted(range(like.dim()), key=lambda i: (-like.stride(i), i))  # outermost first
    if order[-1] != like.dim() - 1:
        order = [i for i in order if i != like.dim() - 1] + [like.dim() - 1]  # kernels want the last dim innermost
    permuted = tensor.permute(order)
    if permuted.is_contiguous():
        return tensor
    inverse = [order.index(i) for i in range(like.dim())]
    return permuted.contiguous().permute(inverse)


# ------------------------------------------------------------------------------------------------------ entry points


def select_kernel(
    query: torch.Tensor, value: torch.Tensor, has_bias: bool, *, room_for_channel: bool = True
) -> FusedKernel:
    """The fused kernel for these inputs; ValueError naming the reason where none can serve.

    ``room_for_channel``: the backward may need the "channel" LSE-gradient form (one more head channel).
    """
    reason = _device_unavailable_reason(query)
    if reason is not None:
        raise ValueError(f"no fused attention kernel for this call: {reason}")
    if query.device.type == "cpu":
        return CPU_FLASH
    grouped = value.shape[1] != query.shape[1]
    width = max(query.shape[-1], value.shape[-1])
    kernel = _cuda_kernel_for(query, width, has_bias, room_for_channel=room_for_channel, grouped=grouped)
    if kernel is None:
        raise ValueError(
            f"no fused CUDA attention kernel (cuDNN, flash, memory-efficient) accepts {query.dtype} queries of head size "
            f"{query.shape[-1]} on this GPU (see torch.backends.cuda.can_use_efficient_attention(..., debug=True))"
        )
    return kernel


def fused_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
    kernel: Optional[FusedKernel] = None,
    lse_gradient: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(out (B,H,Lq,dv), lse (B,H,Lq))`` from a fused kernel; ``lse = -inf`` for rows without keys.

    Same semantics as :func:`peft_ntk.ops.softmax_attention_with_lse` (causal masks aligned to the end, grouped-query
    heads repeated), without the probabilities and without dropout. Both outputs are differentiable exactly.

    Args:
        kernel: a :class:`FusedKernel`; default: chosen for the device and dtype (:func:`select_kernel`).
        lse_gradient: how the LSE gradient reaches the kernel's backward (module docstring): ``"auto"`` (``"out"``,
            ``"channel"`` where it cannot serve), or one of them forced (tests). ``"unchecked_out"`` skips the check
            that decides between them, and with it a device sync per backward: only for callers whose rows never
            carry an LSE gradient without an output gradient.

    Example::

        >>> import torch
        >>> from peft_ntk.kernels import fused_attention_with_lse
        >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
        >>> out, lse = fused_attention_with_lse(q, kv, kv, is_causal=True)
        >>> out.shape, lse.shape
        (torch.Size([1, 4, 3, 8]), torch.Size([1, 4, 3]))
    """
    if lse_gradient not in LSE_GRADIENT_MODES:
        raise ValueError(f"lse_gradient={lse_gradient!r}; choose one of {LSE_GRADIENT_MODES}")
    if attention_mask is not None and attention_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the attention mask/bias requires grad, but the fused kernels return no gradient for it; use the "
            "reference path (attention_backend='reference') to train an attention bias"
        )
    batch, heads, q_len, k_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    key, value = key.to(query.dtype), value.to(query.dtype)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if q_len == 1:
        is_causal = False  # a single (last) query sees every key
    mask = attention_mask
    if is_causal and q_len != k_len:
        # The kernels' causal masks are top-left aligned; with a cache the queries sit at the end of the keys.
        aligned = causal_mask(q_len, k_len, query.device)
        mask = (
            aligned
            if mask is None
            else (mask & aligned if mask.dtype == torch.bool else mask.masked_fill(~aligned, float("-inf")))
        )
        is_causal = False
    has_key = bias = None
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        if is_causal:
            allowed = allowed & causal_mask(q_len, k_len, query.device)
        has_key = allowed.any(dim=-1, keepdim=True)
        # A row without keys gets a zero bias row: the kernel sees an ordinary row (no NaN, no kernel-specific LSE),
        # and its output, LSE and gradients are replaced below.
        if mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            bias = zero.expand(mask.shape).masked_fill(~(mask | ~has_key), float("-inf"))
        else:
            bias = mask.to(query.dtype).masked_fill(~has_key, 0.0)
    if kernel is None:
        kernel = select_kernel(query, value, bias is not None, room_for_channel=lse_gradient in ("auto", "channel"))
    if bias is not None:
        if not kernel.supports_bias:
            raise ValueError(f"the {kernel.name} kernel takes no attention mask")
        prepare = kernel.prepare_bias or _broadcast_bias
        bias = prepare(bias, (batch, heads, q_len, k_len))
    if not kernel.native_gqa:
        key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    out, lse = _FusedAttentionWithLSE.apply(query, key, value, bias, is_causal, scaling, kernel, lse_gradient)
    if has_key is not None:
        has_key = has_key.expand(batch, heads, q_len, 1)
        out = out.masked_fill(~has_key, 0.0)
        lse = lse.masked_fill(~has_key.squeeze(-1), float("-inf"))
    return out, lse


def fused_ntk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
    feature_map: Union[str, FeatureMap] = "elu",
    feature_dropout: float = 0.0,
    kernel: Optional[FusedKernel] = None,
    feature_query: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """NTK-Attention on the fused path: same arguments and result as :func:`peft_ntk.ops.ntk_attention` (without
    attention dropout or weights), with memory linear in the sequence length when no mask is materialised."""
    _check_inputs(query, key, value, z, k, attention_mask)
    _check_feature_query(feature_query, query)
    out_dtype = query.dtype
    q_len, head_dim = query.shape[2], query.shape[-1]
    if (
        query.is_cuda
        and attention_mask is None
        and feature_query is None  # the one-Function path applies phi to the query it attends with
        and feature_dropout == 0.0
        and (not is_causal or q_len in (1, key.shape[2]))  # else the causal mask needs aligning: a bias
        and value.shape[-1] == head_dim
        and head_dim % 8 == 0
        and triton_combine_unavailable_reason(query, head_dim, feature_map) is None
    ):
        # The common training and decoding case: the kernel and the Triton combine in one Function, whose backward
        # hands the LSE gradient to the kernel with no extra pass.
        kernel = kernel or select_kernel(query, value, False, room_for_channel=False)
        key, value = key.to(query.dtype), value.to(query.dtype)
        if not kernel.native_gqa:
            key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
        return triton_ntk_attention(
            query,
            key,
            value,
            z,
            k,
            kernel=kernel,
            is_causal=is_causal and q_len > 1,
            scale=head_dim**-0.5 if scaling is None else scaling,
            feature_map=feature_map,
        )
    # The combine's output gradient G reaches the attention output as dO = α·G and its LSE as a multiple of α·G, so a
    # row with an LSE gradient always has a non-zero dO: the "out" form always serves, and its check can go.
    attn_out, lse = fused_attention_with_lse(
        query,
        key,
        value,
        attention_mask=attention_mask,
        is_causal=is_causal,
        scaling=scaling,
        kernel=kernel,
        lse_gradient="unchecked_out",
    )
    phi_query = query if feature_query is None else feature_query
    if feature_dropout == 0.0:
        # CUDA and a built-in map: two Triton kernels. Else one torch autograd Function, unless the map is learned.
        if query.is_cuda and triton_combine_unavailable_reason(query, value.shape[-1], feature_map) is None:
            return triton_prefix_combine(attn_out, lse, phi_query, z, k, feature_map=feature_map, out_dtype=out_dtype)
        if not feature_map_has_trainable_state(feature_map, phi_query):
            return fused_prefix_combine(attn_out, lse, phi_query, z, k, feature_map=feature_map, out_dtype=out_dtype)
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    out, _ = ntk_prefix_combine(
        attn_out.to(dtype), lse.to(dtype), phi_query, z, k, feature_map=feature_map, feature_dropout=feature_dropout
    )
    return out.to(out_dtype)


# -------------------------------------------------------------------------------------------------- path selection


def _device_unavailable_reason(query: torch.Tensor) -> Optional[str]:
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


def fused_path_unavailable_reason(
    query: torch.Tensor,
    dropout: float,
    return_weights: bool,
    attention_mask: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """Why the fused path cannot serve this call (None when it can)."""
    reason = _device_unavailable_reason(query)
    if reason is not None:
        return reason
    if dropout > 0.0:
        return "attention dropout needs the probabilities, which the fused kernel does not expose"
    if return_weights:
        return "output_attentions needs the attention weights, which the fused kernel does not materialise"
    if attention_mask is not None and attention_mask.requires_grad and torch.is_grad_enabled():
        return "the attention bias requires grad, and the fused kernels return no gradient for it"
    has_mask = attention_mask is not None
    if (
        query.device.type == "cuda"
        and _cuda_kernel_for(query, query.shape[-1], has_mask, room_for_channel=False) is None
    ):
        return (
            f"no fused CUDA attention kernel (cuDNN, flash, memory-efficient) accepts {query.dtype} queries of head size "
            f"{query.shape[-1]}" + (" with a mask" if attention_mask is not None else "") + " on this GPU"
        )
    return None


def auto_uses_fused_path(query: torch.Tensor) -> bool:
    """Whether ``attention_backend="auto"`` takes the fused path on this device (given it is available).

    CPU: yes. CUDA: only once :data:`CUDA_FUSED_PATH_VALIDATED` is set (after the GPU tests pass); until then "auto"
    keeps the reference and says once that ``attention_backend="fused"`` opts in.
    """
    if query.device.type != "cuda" or CUDA_FUSED_PATH_VALIDATED:
        return True
    logger.info_once(
        "NTK-Attention: attention_backend='auto' uses the reference path on CUDA. A fused CUDA path (flash / "
        "memory-efficient kernels, exact LSE gradients, memory linear in the sequence length) is available as an "
        "opt-in, attention_backend='fused', pending validation on a GPU (benchmarks/run_gpu.sh)."
    )
    return False
