"""Prefix tuning -> NTK-Attention conversion (peft_ntk.convert_prefix_tuning)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ntk_config, sdpa_llama
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import peft_ntk
from peft_ntk.ops.feature_maps import PositiveRandomFeatures
from peft_ntk.tools.convert import prefix_keys_values

PREFIX_LEN = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def prefix_model():
    model = get_peft_model(
        sdpa_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN)
    ).eval()
    with torch.no_grad():  # a prefix with visible, but not extreme, effect
        model.prompt_encoder["default"].embedding.weight.mul_(0.7)
    return model


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

# ---------------------------------------------------------------------------------------------------------------------
# an independent reference: explicit prefix attention with a chosen prefix kernel, written out in float64

_PREFIX: dict = {}


def explicit_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the real keys (causal, exp kernel) plus the explicit prefix rows of this layer, whose weights are
    phi(q)ᵀphi(k_p) (or exp(scaling·q·k_p) for kernel "exp"). Returns (B, L, H, d) like transformers' functions."""
    kernel, prefix = _PREFIX["kernel"], _PREFIX["layers"][module.layer_idx]
    pk, pv = (t.double() for t in prefix)
    q, k, v = query.double(), key.double(), value.double()
    heads = q.shape[1]
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    pk, pv = pk.repeat_interleave(heads // pk.shape[0], 0), pv.repeat_interleave(heads // pv.shape[0], 0)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    lq, lk = scores.shape[-2:]
    causal = torch.arange(lq)[:, None] + (lk - lq) >= torch.arange(lk)[None, :]
    scores = scores.masked_fill(~causal, float("-inf"))
    if kernel == "exp":
        prefix_scores = torch.einsum("bhld,hmd->bhlm", q, pk) * scale
        m = torch.maximum(scores.amax(-1, keepdim=True), prefix_scores.amax(-1, keepdim=True))
        w, pw = torch.exp(scores - m), torch.exp(prefix_scores - m)
    else:
        phi = kernel
        if isinstance(phi, PositiveRandomFeatures):
            phi = PositiveRandomFeatures(phi.projection.double())
        w = torch.exp(scores)
        pw = torch.einsum("bhlr,hmr->bhlm", phi(q), phi(pk))
    out = (w @ v + pw @ pv) / (w.sum(-1, keepdim=True) + pw.sum(-1, keepdim=True))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_explicit_prefix", explicit_prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_explicit_prefix", sdpa_mask)


def explicit_prefix_logits(prefix_model, kernel) -> torch.Tensor:
    """Logits of the base model whose every layer attends to the prefix model's prefix rows through ``kernel``, with
    the real tokens at positions 0..L-1 (as in the converted model)."""
    base = copy.deepcopy(prefix_model.get_base_model())
    base.config._attn_implementation_internal = "test_explicit_prefix"
    _PREFIX.update(kernel=kernel, layers=prefix_keys_values(prefix_model))
    with torch.no_grad():
        return base(input_ids=IDS, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_conversion_is_exact_for_the_phi_kernel_prefix(prefix_model, feature_map):
    config = ntk_config(feature_map="favor", feature_dim=40) if feature_map == "favor" else ntk_config()
    converted = peft_ntk.convert_prefix_tuning(prefix_model, config).eval()
    layer = converted.base_model.model.model.layers[0].self_attn
    kernel = layer.adapter_feature_map("default")
    kernel = peft_ntk.elu_feature_map if kernel == "elu" else kernel
    with torch.no_grad():
        got = converted(input_ids=IDS).logits
        with converted.disable_adapter():
            base = converted(input_ids=IDS).logits
    expected = explicit_prefix_logits(prefix_model, kernel)
    assert (got - expected).abs().max() < 1e-4
    assert (base - expected).abs().max() > 1e-2  # the prefix matters, so the comparison means something


def test_favor_conversion_approaches_the_softmax_prefix_as_r_grows(prefix_model):
    softmax_prefix = explicit_prefix_logits(prefix_model, "exp")
    errors = {}
    for r in (16, 256, 4096):
        errs = []
        for seed in range(3):
            config = ntk_config(feature_map="favor", feature_dim=r, feature_seed=seed)
            with torch.no_grad():
                logits = peft_ntk.convert_prefix_tuning(prefix_model, config).eval()(input_ids=IDS).logits
            errs.append((logits - softmax_prefix).abs().mean().item())
        errors[r] = sum(errs) / len(errs)
    assert errors[16] > errors[256] > errors[4096], errors
    assert errors[4096] < errors[16] / 3, errors  # Monte Carlo with heavy tails: slower than 1/sqrt(r) here


def test_prefix_model_keeps_working_and_is_compared_honestly(prefix_model):
    with torch.no_grad():
        before = prefix_model(input_ids=IDS).logits
    converted = peft_ntk.convert_prefix_tuning(prefix_model).eval()
    with torch.no_grad():
        assert torch.equal(prefix_model(input_ids=IDS).logits, before)  # copy_base=True left it alone
        ntk = converted(input_ids=IDS).logits
    # The real prefix-tuned model differs: softmax kernel instead of phi, and real tokens at positions m.. instead of 0..
    assert (ntk - before).abs().max() > 1e-3
    softmax_prefix_same_positions = explicit_prefix_logits(prefix_model, "exp")
    assert (softmax_prefix_same_positions - before).abs().max() > 1e-4  # the position offset alone changes logits
    assert math.isfinite(ntk.abs().max().item())


def test_converted_adapter_is_a_normal_ntk_adapter(prefix_model, tmp_path):
    from peft import PeftModel

    converted = peft_ntk.convert_prefix_tuning(prefix_model, ntk_config(feature_map="favor", feature_dim=16)).eval()
    converted.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(sdpa_llama()), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, converted(input_ids=IDS).logits)


def test_non_prefix_models_are_refused():
    lora = get_peft_model(sdpa_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="active adapter is prefix tuning"):
        peft_ntk.convert_prefix_tuning(lora)


def test_partial_targets_are_refused(prefix_model):
    with pytest.raises(ValueError, match="adapt every self-attention layer"):
        peft_ntk.convert_prefix_tuning(prefix_model, ntk_config(layers_to_transform=[0]))
