"""Softmax attention with a differentiable log-sum-exp from a fused kernel: exact gradients, no (Lq × Lk) tensor.

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
Every path is tested against :func:`peft_ntk.ops.ntk_attention_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import causal_mask, repeat_kv_heads
from .kernels import FusedKernel, broadcast_bias, load_kernel_state, round_up, save_kernel_state, select_kernel

#: ``"unchecked_out"`` is the ``"out"`` form without its host-side check (no device sync per backward), for callers
#: that guarantee every row with an LSE gradient also has a non-zero output gradient (see peft_ntk.ops.dispatch).
LSE_GRADIENT_MODES = ("auto", "out", "channel", "unchecked_out")


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
        width = round_up(max(head_dim, value_dim), kernel.head_dim_multiple)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] != width else t for t in (query, key, value))
        out, lse, state = kernel.forward(q, k, v, bias, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, bias, *save_kernel_state(ctx, state))
        ctx.is_causal, ctx.scale, ctx.kernel, ctx.lse_gradient = is_causal, scale, kernel, lse_gradient
        ctx.head_dim, ctx.value_dim = head_dim, value_dim
        ctx.set_materialize_grads(False)
        # Views of what the backward reads (as torch's own SDPA returns its saved output): an in-place edit by the
        # caller makes the backward raise rather than silently use the edited values.
        return (out[..., :value_dim] if width != value_dim else out), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, bias, *state_tensors = ctx.saved_tensors
        state = load_kernel_state(ctx, tuple(state_tensors))
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
                extra = round_up(width + 1, ctx.kernel.head_dim_multiple) - width
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
        >>> from peft_ntk.ops.fused_attention import fused_attention_with_lse
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
        prepare = kernel.prepare_bias or broadcast_bias
        bias = prepare(bias, (batch, heads, q_len, k_len))
    if not kernel.native_gqa:
        key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    out, lse = _FusedAttentionWithLSE.apply(query, key, value, bias, is_causal, scaling, kernel, lse_gradient)
    if has_key is not None:
        has_key = has_key.expand(batch, heads, q_len, 1)
        out = out.masked_fill(~has_key, 0.0)
        lse = lse.masked_fill(~has_key.squeeze(-1), float("-inf"))
    return out, lse
