"""Fused attention paths for NTK-Attention: (O, LSE) from a fused kernel, exact gradients, no (Lq × Lk) tensor.

NTK-Attention needs the ordinary attention output ``O`` and the log-sum-exp ``LSE`` of every row (see
:func:`peft_ntk.ops.ntk_combine`). Fused kernels return both, but their ``LSE`` is not differentiable, and the prefix
term's gradient flows through it into every earlier layer. :class:`_FusedAttentionWithLSE` restores that gradient:
in a flash-style backward, ``out`` only enters through ``D_i = Σ_d dO_id · O_id``, and a gradient ``g_i`` on ``LSE_i``
enters the score gradient exactly as ``D_i − g_i``. The backward appends one zero channel to q, k and v (no score or
output changes) and hands the kernel ``dO = 1`` and ``out = −g`` on it, which shifts ``D_i`` by ``−g_i`` exactly and
reuses the fused backward unchanged.

Every path here is tested against :func:`peft_ntk.ops.ntk_attention`, the reference.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .ops import FeatureMap, _check_inputs, causal_mask, get_feature_map, ntk_combine, repeat_kv_heads


def _cpu_flash_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


class _FusedAttentionWithLSE(torch.autograd.Function):
    """(O, LSE) from torch's fused CPU flash-attention kernel, differentiable in both outputs."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal: bool, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
        ctx.save_for_backward(query, key, value, out, lse, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.mark_non_differentiable()
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is not None:
            # Append a zero channel to q, k and v (scores and outputs unchanged) and give the backward dO = 1 and
            # out = -g on it: D_i = <dO_i, O_i> - g_i exactly, whatever dO_i is, in any dtype.
            query, key, value = (F.pad(t, (0, 1)) for t in (query, key, value))
            grad_out = torch.cat([grad_out, torch.ones_like(grad_out[..., :1])], dim=-1)
            out = torch.cat([out, -grad_lse.unsqueeze(-1).to(out.dtype)], dim=-1)
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), query, key, value, out, lse, 0.0, ctx.is_causal, attn_mask=attn_mask, scale=ctx.scale
        )
        if grad_lse is not None:
            grad_q, grad_k, grad_v = grad_q[..., :-1], grad_k[..., :-1], grad_v[..., :-1]
        return grad_q, grad_k, grad_v, None, None, None


def fused_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(out (B,H,Lq,dv), lse (B,H,Lq))`` from a fused kernel; ``lse = -inf`` for rows without keys.

    Same semantics as :func:`peft_ntk.ops.softmax_attention_with_lse` (causal masks aligned to the end), without the
    probabilities and without dropout.
    """
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = attention_mask
    if is_causal and q_len > 1 and q_len != k_len:
        # The kernel's causal mask is top-left aligned; with a cache the queries sit at the end of the keys.
        aligned = causal_mask(q_len, k_len, query.device)
        mask = (
            aligned
            if mask is None
            else (mask & aligned if mask.dtype == torch.bool else mask.masked_fill(~aligned, float("-inf")))
        )
        is_causal = False
    if q_len == 1:
        is_causal = False  # a single (last) query sees every key
    has_key = None
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        if is_causal:
            allowed = allowed & causal_mask(q_len, k_len, query.device)
        has_key = allowed.any(dim=-1)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
        else:
            mask = mask.to(query.dtype)
        mask = mask.expand(mask.shape[0], mask.shape[1], q_len, k_len)
    out, lse = _FusedAttentionWithLSE.apply(query, key, value, mask, is_causal, scaling)
    if has_key is not None:
        # The kernel reports LSE = 0 and O = 0 for rows without keys; the combine needs LSE = -inf there.
        lse = lse.masked_fill(~has_key.expand_as(lse), float("-inf"))
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
) -> torch.Tensor:
    """NTK-Attention on the fused path: same arguments and result as :func:`peft_ntk.ops.ntk_attention` (without
    attention dropout or weights), with memory linear in the sequence length when no mask is materialised."""
    _check_inputs(query, key, value, z, k, attention_mask)
    out_dtype = query.dtype
    attn_out, lse = fused_attention_with_lse(
        query, key, value, attention_mask=attention_mask, is_causal=is_causal, scaling=scaling
    )
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    phi = get_feature_map(feature_map)(query.to(dtype))
    if feature_dropout > 0.0:
        phi = F.dropout(phi, p=feature_dropout)
    out, _ = ntk_combine(attn_out.to(dtype), lse.to(dtype), phi, z.to(dtype), k.to(dtype))
    return out.to(out_dtype)


def fused_path_unavailable_reason(query: torch.Tensor, dropout: float, return_weights: bool) -> Optional[str]:
    """Why the fused path cannot serve this call (None when it can)."""
    if query.device.type != "cpu":
        return f"no fused kernel with exact LSE gradients is wired up for {query.device.type} yet"
    if not _cpu_flash_available():
        return "this torch build lacks the fused CPU flash-attention kernel"
    if dropout > 0.0:
        return "attention dropout needs the probabilities, which the fused kernel does not expose"
    if return_weights:
        return "output_attentions needs the attention weights, which the fused kernel does not materialise"
    return None
