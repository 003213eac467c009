"""Numerics matrix: dtype × logit scale × mask kind × shape × path, against float64 on the same rounded inputs.

Every case checks that the output and the gradients of q, k, v, Z and the k-vector are finite, and that the output and
the gradients agree with :func:`peft_ntk.ops.ntk_attention_reference` run in float64 on float64 copies of the *rounded* inputs
(and of the rounded output gradient). Comparing with the rounded inputs matters at large logit scales: rounding q to
bf16 moves a logit of size ``s`` by about ``s · 2^-8``, which at ``s ~ 1e4`` is tens of units, i.e. a completely
different softmax; against the float64 result on the same rounded inputs only the computation's own error is left.

The logit scale multiplies ``d^-1/2`` in ``scaling`` (q itself is not scaled), so the feature map ``phi(q)`` and the
prefix term keep their usual size and only the softmax part becomes sharp.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, padding_mask

from peft_ntk.ops import fused_ntk_attention, masked_scores, ntk_attention_reference

F64 = torch.float64
D = 8

# Errors relative to the size of the float64 result (max |ref|), for the output and for each gradient.
# fp32: the whole computation runs in float32. Observed: <= 7e-6 for the output, <= 4e-4 for gradients relative to
#   their own size (see TERMS_TOL for the q/k gradients); 1e-4 is the budget for everything else.
# fp16 / bf16: logits, LSE and the combine are computed in float32, but the output and every returned gradient are
#   rounded to the dtype (eps16 = 2^-10 ≈ 1e-3, eps_bf16 = 2^-7 ≈ 8e-3), and on the fused path the kernel also
#   rounds the probabilities it multiplies with V and its backward matmul operands: a few ulps. Observed: fp16
#   <= 1e-3, bf16 <= 9e-3.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# The q and k gradients are ill-conditioned at large logit scales, so they get a second, absolute budget. The
# softmax backward is dS = P (dP - D) with D = rowsum(dO · O) and dP = dO · vᵀ, each of size |dO||v|, then
# scaled by `scaling` and multiplied by k (for dq) or q (for dk). At logit scale 1e4 the softmax is one-hot, D and
# dP cancel exactly in real arithmetic and the exact dq/dk underflow to ~1e-50, but the flash kernel forms D from
# the rounded O in a different summation order, so its result is the rounding of terms of size
#   TERMS = scaling · max|dO| · max|v| · max|k or q|   (about 8e4 at scale 1e4)
# i.e. ~eps32 · TERMS ≈ 3e-3 in absolute terms, relative error "infinity". The reference path's autograd softmax
# cancels exactly there (P is exactly one-hot), but at scale 1e2 it has the same kind of error from the float32
# logits (eps32 · |s| with |s| ~ 300). So dq and dk are held to TOL · max|ref| + TERMS_TOL · TERMS. Observed
# error / TERMS: fp32 <= 2.1e-6, fp16 <= 2.2e-4, bf16 <= 8e-4.
TERMS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
# A flash backward recomputes P = exp(s - LSE) from freshly summed float32 logits and the forward's LSE. Both carry an
# absolute error of about eps32 · max|s| (≈ 4e-3 at scale 1e4), and they no longer cancel as they do in a softmax
# computed in one go, so every P, hence dq, dk and dv, is off by that much *relatively* (fp32, fused path, scale 1e4:
# dv is off by up to 2e-3 = 0.47 · eps32 · max|s|; the stock SDPA backward shows the same at longer sequences). So
# dq, dk and dv get LOGIT_ERR_FACTOR · eps32 · max|s| on top of TOL; every other case is held to TOL alone.
LOGIT_ERR_FACTOR = 2.0

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALES = [1.0, 1e2, 1e4]
MASKS = ["none", "causal", "padding", "fully-masked-row"]
SHAPES = {"square": (7, 7), "cache": (3, 9)}  # (Lq, Lk): Lq == Lk, and Lq < Lk as with a KV cache (end-aligned)
PATHS = {"reference": ntk_attention_reference, "fused": fused_ntk_attention}
B, H, HKV = 2, 4, 2


def mask_for(kind: str, lq: int, lk: int):
    """(attention_mask, is_causal) for a mask kind."""
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "padding":
        return padding_mask(B, lq, lk, [lk, lk - 3]), False
    mask = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    mask[0, :, lq // 2] = False  # one query row of the first sequence sees no key: it attends to the prefix only
    return mask, False


def rounded_inputs(dtype, lq, lk, seed):
    """q, k, v, Z, k-vector and an output gradient, rounded to ``dtype``; plus float64 copies of the rounded values."""
    tensors = make_inputs(b=B, h=H, hkv=HKV, lq=lq, lk=lk, d=D, seed=seed)
    grad_out = torch.randn(B, H, lq, D, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    low = [t.to(dtype) for t in [*tensors, grad_out]]
    return low, [t.to(F64) for t in low]


def run(op, inputs, grad_out, **kw):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = op(*inputs, **kw)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    return out, grads


def assert_close(actual, expected, dtype, what, terms=0.0, extra_rel=0.0):
    """max |actual - expected| <= (TOL + extra_rel) · max|expected| + TERMS_TOL · terms (see above).

    Values below the dtype's smallest normal number keep no relative precision (a float64 gradient of 1e-9 is 0 in
    fp16), so max|expected| is floored at ``finfo(dtype).tiny``.
    """
    size = max(expected.abs().max().item(), torch.finfo(dtype).tiny)
    budget = (TOL[dtype] + extra_rel) * size + TERMS_TOL[dtype] * terms
    err = (actual.to(F64) - expected).abs().max().item()
    assert err <= budget, f"{what}: max error {err:.3g} (max |ref| {size:.3g}, terms {terms:.3g}), budget {budget:.3g}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_numerics_matrix(dtype_name, scale, mask_kind, shape, path):
    dtype = DTYPES[dtype_name]
    lq, lk = SHAPES[shape]
    mask, is_causal = mask_for(mask_kind, lq, lk)
    kw = dict(attention_mask=mask, is_causal=is_causal, scaling=scale * D**-0.5)
    seed = 3 + MASKS.index(mask_kind)
    (*low, grad_low), (*ref_in, grad_ref) = rounded_inputs(dtype, lq, lk, seed)

    out, grads = run(PATHS[path], low, grad_low, **kw)
    ref, ref_grads = run(ntk_attention_reference, ref_in, grad_ref, **kw)

    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output"
    for name, g in zip("q k v z kvec".split(), grads):
        assert g.dtype == dtype, f"gradient of {name} has dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"

    assert_close(out, ref, dtype, "output")
    q, k, v = ref_in[:3]
    softmax_terms = kw["scaling"] * grad_ref.abs().max() * v.abs().max()
    terms = {"q": (softmax_terms * k.abs().max()).item(), "k": (softmax_terms * q.abs().max()).item()}
    logit_err = torch.finfo(torch.float32).eps * masked_scores(q, k, scaling=kw["scaling"]).abs().max().item()
    for name, g, r in zip("q k v z kvec".split(), grads, ref_grads):
        extra = LOGIT_ERR_FACTOR * logit_err if name in ("q", "k", "v") else 0.0
        assert_close(g, r, dtype, f"gradient of {name}", terms.get(name, 0.0), extra)
