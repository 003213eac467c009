"""The tuner layer: k's parameterisation, initialisations, and the layer's transparency to surrounding code."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model
from peft import get_peft_model

import peft_ntk
from peft_ntk.tuner.layer import NTKAttentionLayer, nonnegative


def ntk_layers(model):
    return [m for m in model.modules() if isinstance(m, NTKAttentionLayer)]


def test_nonnegative_passes_gradient_at_zero_where_abs_does_not():
    x = torch.zeros(3, requires_grad=True)
    nonnegative(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    official = torch.zeros(3, requires_grad=True)
    official.abs().sum().backward()
    assert torch.equal(official.grad, torch.zeros(3))  # the official abs∘zeros parameterisation never trains k
    y = torch.tensor([-2.0, 3.0], requires_grad=True)
    nonnegative(y).sum().backward()
    assert torch.equal(y.grad, torch.tensor([-1.0, 1.0]))


def test_zero_init_is_the_base_model_and_still_trains():
    base = tiny_model("llama")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=True))
    model.train()
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        for layer in ntk_layers(model):
            assert layer.ntk_k["default"].grad.abs().sum() > 0
            assert layer.ntk_z["default"].grad.abs().sum() > 0
        optimizer.step()
    assert losses[-1] < losses[0]
    for layer in ntk_layers(model):
        assert layer.ntk_k["default"].abs().sum() > 0


def test_small_random_init_follows_init_scale():
    model = get_peft_model(
        tiny_model("llama"), peft_ntk.NTKAttentionConfig(init_weights="small_random", init_scale=1e-3)
    )
    z = torch.cat([layer.ntk_z["default"].flatten() for layer in ntk_layers(model)])
    assert 0.5e-3 < z.std().item() < 2e-3


def test_layer_is_transparent_to_surrounding_code():
    model = get_peft_model(tiny_model("llama"), peft_ntk.NTKAttentionConfig())
    layer = ntk_layers(model)[1]
    assert layer.layer_idx == 1 and layer.is_causal is True
    assert layer.num_heads == 4 and layer.head_dim == 8
    with pytest.raises(AttributeError):
        _ = layer.no_such_attribute


def test_deepcopy_of_an_adapted_model_keeps_the_adapter_working():
    model = get_peft_model(tiny_model("llama"), peft_ntk.NTKAttentionConfig(init_weights=False)).eval()
    ids = torch.arange(8).view(1, 8)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        for layer in ntk_layers(clone):
            layer.ntk_z["default"].zero_()
            layer.ntk_k["default"].zero_()
    with model.disable_adapter():
        base_logits = model(ids).logits
    torch.testing.assert_close(clone(ids).logits, base_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(model(ids).logits, base_logits)


def test_static_cache_generation_matches_dynamic_and_uncached():
    """A static cache's prefill passes empty future key slots with no mask; they must not be attended to."""
    model = get_peft_model(tiny_model("llama"), peft_ntk.NTKAttentionConfig(init_weights=False)).eval()
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    dynamic = model.generate(ids, max_new_tokens=8, do_sample=False)
    static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(dynamic, uncached)
    assert torch.equal(static, uncached)
