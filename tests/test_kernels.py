"""The fused path against the reference op: forward, gradients (through the LSE too), edge cases, memory, dispatch."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_ops import CASES, case_inputs, make_inputs, padding_mask
from torch.profiler import ProfilerActivity, profile

import peft_ntk
from peft_ntk.kernels import fused_attention_with_lse, fused_ntk_attention
from peft_ntk.ops import masked_scores, ntk_attention, softmax_attention_with_lse

TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_forward_and_gradients(case, dtype):
    inputs, kw = case_inputs(case)
    inputs = [t.to(dtype).requires_grad_(True) for t in inputs[:3]] + [t.requires_grad_(True) for t in inputs[3:]]
    ref = ntk_attention(*inputs, **kw)
    out = fused_ntk_attention(*inputs, **kw)
    assert out.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), inputs)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        scale = b.abs().max().double().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=tol, atol=tol, msg=name)


def test_lse_gradient_is_exact():
    """A loss on the LSE alone: the fused kernel's own LSE has no gradient; ours must equal logsumexp's."""
    q, k, v, _, _ = make_inputs(lq=6, lk=6, requires_grad=True)
    mask = padding_mask(2, 6, 6, [6, 3])
    _, lse = fused_attention_with_lse(q, k, v, attention_mask=mask, is_causal=True)
    weights = torch.randn(lse.shape, dtype=lse.dtype)
    grads = torch.autograd.grad((lse * weights).sum(), (q, k, v), allow_unused=True)
    ref_lse = torch.logsumexp(masked_scores(q, k, attention_mask=mask, is_causal=True), dim=-1)
    ref = torch.autograd.grad((ref_lse * weights).sum(), (q, k))
    torch.testing.assert_close(grads[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], ref[1], rtol=1e-12, atol=1e-12)
    assert grads[2] is None or torch.equal(grads[2], torch.zeros_like(v))


def test_gradcheck_fused():
    inputs = make_inputs(b=1, h=2, hkv=1, lq=3, lk=4, d=4, requires_grad=True)
    mask = padding_mask(1, 3, 4, [3])

    def fn(*args):
        return fused_ntk_attention(*args, attention_mask=mask, is_causal=True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_fully_masked_rows_and_additive_bias_match_reference():
    inputs = make_inputs(requires_grad=True)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64).masked_fill(~mask, float("-inf"))  # T5-style position bias
    for attention_mask in (mask, bias):
        ref = ntk_attention(*inputs, attention_mask=attention_mask)
        out = fused_ntk_attention(*inputs, attention_mask=attention_mask)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), inputs)
        ref_grads = torch.autograd.grad(ref.sum(), inputs)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_large_logits(scale):
    q, k, v, z, kvec = make_inputs(seed=3, dtype=torch.float32)
    if scale < 0:
        q, k = q.abs(), -k.abs()
    inputs = [t.requires_grad_(True) for t in (q, k, v, z, kvec)]
    scaling = abs(scale) * 8**-0.5
    out = fused_ntk_attention(*inputs, is_causal=True, scaling=scaling)
    ref = ntk_attention(*inputs, is_causal=True, scaling=scaling)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), inputs))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_fused_path_does_not_materialise_scores():
    """At L = 2048 a (B,H,L,L) float32 score tensor is 32 MiB; the fused path's largest allocation must stay far below."""
    b, h, length, d = 1, 2, 2048, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=g, requires_grad=True) for _ in range(3))
    z, kvec = torch.randn(h, d, d, requires_grad=True), torch.rand(h, d, requires_grad=True)
    scores_bytes = b * h * length * length * 4

    def step(op):
        return lambda: op(q, k, v, z, kvec, is_causal=True).sum().backward()

    fused = _largest_allocation(step(fused_ntk_attention))
    reference = _largest_allocation(step(ntk_attention))
    assert reference >= scores_bytes  # the measurement sees a materialised score tensor when there is one
    assert fused < scores_bytes / 8, f"largest allocation {fused} B on the fused path"


def tiny_llama_ntk(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_dropout=config.pop("attention_dropout", 0.0),
        )
    )
    return get_peft_model(base, peft_ntk.NTKAttentionConfig(init_weights=False, **config))


def test_backends_agree_on_a_model_with_padding():
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    outputs = {}
    for backend in ("reference", "fused"):
        model = tiny_llama_ntk(attention_backend=backend)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outputs[backend] = (out.logits.detach(), grads)
    torch.testing.assert_close(outputs["fused"][0], outputs["reference"][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs["reference"][1].items():
        torch.testing.assert_close(outputs["fused"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forced_fused_backend_refuses_what_it_cannot_do():
    model = tiny_llama_ntk(attention_backend="fused", attention_dropout=0.5).train()
    with pytest.raises(ValueError, match="attention_backend='fused' cannot serve.*dropout"):
        model(input_ids=torch.arange(6).view(1, 6))


def test_auto_backend_falls_back_for_attention_weights(monkeypatch):
    calls = []
    real = peft_ntk.attention.fused_ntk_attention
    monkeypatch.setattr(peft_ntk.attention, "fused_ntk_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_llama_ntk().eval()
    ids = torch.arange(6).view(1, 6)
    model(input_ids=ids)
    assert len(calls) == 2  # both layers on the fused path
    out = model(input_ids=ids, output_attentions=True)
    assert len(calls) == 2 and out.attentions[0] is not None  # weights requested: reference path
    softmax_rows = softmax_attention_with_lse(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert softmax_rows[0].shape == (1, 1, 1, 2)


def test_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="attention_backend"):
        peft_ntk.NTKAttentionConfig(attention_backend="triton")
