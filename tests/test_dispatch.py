"""The dispatcher (``peft_ntk.ntk_attention``): the path it picks, why it falls back, and that every path it takes
computes the reference op's result, forward and gradients, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, case_inputs

import peft_ntk
from peft_ntk.ops import ntk_attention, ntk_attention_reference, plan_ntk_attention
from peft_ntk.ops.feature_maps import PositiveRandomFeatures, draw_random_projection


def _grads(op, inputs, options, grad_out):
    out = op(*inputs, **options)
    return out, torch.autograd.grad((out * grad_out).sum(), inputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dispatcher_matches_the_reference_forward_and_gradients(case):
    inputs, options = case_inputs(case, requires_grad=True)
    assert plan_ntk_attention(*inputs, **options).path == "fused+torch-combine"  # CPU, float64, built-in map
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = _grads(ntk_attention, inputs, options, grad_out)
    ref, ref_grads = _grads(ntk_attention_reference, inputs, options, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, got, expected in zip(("q", "k", "v", "z", "k_vec"), grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "options, path, reason",
    [
        (dict(), "fused+torch-combine", None),
        (dict(dropout=0.1), "reference", "attention dropout"),
        (dict(return_weights=True), "reference", "attention weights"),
        (dict(feature_dropout=0.1), "fused+autograd-combine", None),
        (dict(backend="reference"), "reference", None),
    ],
    ids=["default", "dropout", "weights", "feature-dropout", "asked-for-reference"],
)
def test_plan_names_the_path_and_the_reason_for_a_fallback(options, path, reason):
    inputs, case_options = case_inputs("causal-cache")
    plan = plan_ntk_attention(*inputs, **case_options, **options)
    assert plan.path == path
    assert (plan.fallback_reason is None) == (reason is None)
    if reason is not None:
        assert reason in plan.fallback_reason


def test_plain_attention_and_learned_maps_take_their_own_fused_paths():
    (q, k, v, z, kvec), options = case_inputs("padding")
    assert plan_ntk_attention(q, k, v, None, None, **options).path == "fused"
    plain = ntk_attention(q, k, v, None, None, **options)
    torch.testing.assert_close(plain, ntk_attention_reference(q, k, v, None, None, **options), rtol=1e-10, atol=1e-12)
    projection = draw_random_projection(16, q.shape[-1], seed=0, dtype=torch.float64)
    learned = PositiveRandomFeatures(projection.requires_grad_(True))
    favor_z = torch.randn(q.shape[1], 16, v.shape[-1], dtype=torch.float64) / 4
    favor_k = torch.rand(q.shape[1], 16, dtype=torch.float64)
    assert plan_ntk_attention(q, k, v, favor_z, favor_k, feature_map=learned, **options).path == (
        "fused+autograd-combine"
    )
    fixed = PositiveRandomFeatures(projection.detach())
    assert plan_ntk_attention(q, k, v, favor_z, favor_k, feature_map=fixed, **options).path == "fused+torch-combine"


def test_forced_fused_backend_names_what_it_cannot_do():
    inputs, options = case_inputs("no-mask")
    with pytest.raises(ValueError, match="attention_backend='fused' cannot serve this call: attention dropout"):
        ntk_attention(*inputs, **options, dropout=0.1, backend="fused")
    with pytest.raises(ValueError, match="backend='nope'; choose one of"):
        ntk_attention(*inputs, backend="nope")


def test_public_op_is_the_dispatcher_and_the_reference_keeps_its_name():
    assert peft_ntk.ntk_attention is ntk_attention
    assert peft_ntk.ntk_attention_reference is ntk_attention_reference
    assert ntk_attention.__module__ == "peft_ntk.ops.dispatch"
    assert ntk_attention_reference.__module__ == "peft_ntk.ops.reference"


def test_old_module_paths_still_resolve_with_a_warning():
    import importlib

    with pytest.warns(FutureWarning, match=r"peft_ntk\.kernels\.CPU_FLASH moved to peft_ntk\.ops\.kernels\.CPU_FLASH"):
        old = importlib.import_module("peft_ntk.kernels").CPU_FLASH
    assert old is peft_ntk.ops.kernels.CPU_FLASH
    with pytest.warns(FutureWarning, match="peft_ntk.layer.NTKAttentionLayer moved to peft_ntk.tuner.layer"):
        assert peft_ntk.layer.NTKAttentionLayer is peft_ntk.NTKAttentionLayer
    with pytest.raises(AttributeError, match="has no 'nothing_here'"):
        _ = importlib.import_module("peft_ntk.kernels").nothing_here
