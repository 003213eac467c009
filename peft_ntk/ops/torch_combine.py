"""The prefix combine of the fused path as one autograd Function: few kernels, and only per-row scalars saved.

:func:`peft_ntk.ops.reference.ntk_prefix_combine` (the reference) leaves the combine to autograd, which records about forty
elementwise float32 ops per layer and keeps their (B, H, L, d) intermediates for the backward. On a GPU that cost as
much time as the attention kernel at short lengths and half again the base model's activation memory. Written out,
with ``S = e^LSE``, ``a = φ(q)ᵀk``, ``u = φ(q)ᵀZ``::

    out = α·O + β·u,   α = S / (S + a),   β = 1 / (S + a)     (formed as t/den and q/den, as in ntk_combine)

and, for an output gradient ``G`` with ``dα = <G, O>`` and ``dβ = <G, u>``::

    dO = α·G,   du = β·G,   dLSE = α·((1 − α)·dα − β·dβ),   da = −β·(α·dα + β·dβ)
    dZ = Σ_rows φ duᵀ,   dk = Σ_rows φ·da,   dφ = du Zᵀ + da·k

The backward recomputes ``φ(q)`` and ``u`` instead of keeping them: the queries and the attention output are already
kept by the attention kernel, so the combine adds only α, β and one flag per row. ``dq`` comes from the feature map's
own autograd on the recomputed ``φ``, so every registered map works unchanged. Tested against the reference in
float64 (forward and every gradient) in ``tests/test_fused_combine.py``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .feature_maps import FeatureMap, feature_map_and_log_scale


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _PrefixCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, lse, query, z, k, feature_map, out_dtype: torch.dtype):
        work = _work_dtype(attn_out.dtype)
        phi, log_scale = feature_map_and_log_scale(feature_map, query.to(work))
        lse = lse.to(work)
        if log_scale is not None:
            lse = lse - log_scale.to(work)
        value_dim = z.shape[-1]
        # [Z | k] in one product: u and a from a single pass over phi
        uk = torch.matmul(phi, torch.cat([z.to(work), k.to(work).unsqueeze(-1)], dim=-1))
        u, a = uk[..., :value_dim], uk[..., value_dim]
        t = torch.exp(lse.clamp(max=0.0))
        q = torch.exp(-lse.clamp(min=0.0))
        denominator = t + q * a
        # A row with no keys and no prefix mass: ntk_combine divides by 1 there and returns u (= 0), with no gradient
        # through the denominator.
        has_mass = denominator > 0
        denominator = torch.where(has_mass, denominator, torch.ones_like(denominator))
        alpha, beta = t / denominator, q / denominator
        out = torch.addcmul(beta.unsqueeze(-1) * u, alpha.unsqueeze(-1), attn_out.to(work))
        ctx.save_for_backward(attn_out, query, z, k, alpha, beta, has_mass)
        ctx.feature_map = feature_map
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        attn_out, query, z, k, alpha, beta, has_mass = ctx.saved_tensors
        need_o, need_lse, need_q, need_z, need_k = ctx.needs_input_grad[:5]
        work = alpha.dtype
        grad = grad.to(work)
        value_dim = z.shape[-1]
        zk = torch.cat([z.to(work), k.to(work).unsqueeze(-1)], dim=-1)
        with torch.enable_grad():
            q_work = query.detach().to(work).requires_grad_(need_q)
            phi, log_scale = feature_map_and_log_scale(ctx.feature_map, q_work)
        u = torch.matmul(phi.detach(), zk[..., :value_dim])
        d_alpha = (grad * attn_out.to(work)).sum(-1)
        d_beta = (grad * u).sum(-1)
        d_lse = alpha * ((1 - alpha) * d_alpha - beta * d_beta)
        d_a = torch.where(has_mass, -beta * (alpha * d_alpha + beta * d_beta), torch.zeros_like(d_beta))
        du_da = torch.cat([beta.unsqueeze(-1) * grad, d_a.unsqueeze(-1)], dim=-1)  # (B, H, L, dv + 1)
        grad_o = grad_lse = grad_q = grad_z = grad_k = None
        if need_o:
            grad_o = (alpha.unsqueeze(-1) * grad).to(attn_out.dtype)
        if need_lse:
            grad_lse = d_lse
        if need_z or need_k:
            d_zk = torch.matmul(phi.detach().transpose(-1, -2), du_da).sum(0)  # (H, r, dv + 1)
            grad_z = d_zk[..., :value_dim].to(z.dtype) if need_z else None
            grad_k = d_zk[..., value_dim].to(k.dtype) if need_k else None
        if need_q:
            d_phi = torch.matmul(du_da, zk.transpose(-1, -2))
            outputs, grads = [phi], [d_phi]
            if log_scale is not None and log_scale.requires_grad:  # lse - log_scale(q)
                outputs.append(log_scale)
                grads.append(-d_lse.reshape(log_scale.shape))
            (grad_q,) = torch.autograd.grad(outputs, q_work, grads)
            grad_q = grad_q.to(query.dtype)
        return grad_o, grad_lse, grad_q, grad_z, grad_k, None, None


def fused_prefix_combine(
    attn_out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``ntk_prefix_combine(...)[0]`` (without feature dropout) as one autograd Function; see the module docstring.

    Computed in float32 (float64 for float64 inputs) and returned in ``out_dtype`` (default: ``attn_out``'s). The
    backward recomputes ``phi`` and differentiates it with respect to the query, so ``feature_map`` must not hold
    trainable tensors (:func:`peft_ntk.ops.feature_maps.feature_map_has_trainable_state`; registered maps and random features do not).
    """
    return _PrefixCombine.apply(attn_out, lse, query, z, k, feature_map, out_dtype or attn_out.dtype)
