"""Adapter options: phi on the pre-RoPE query, the parametrizations, and the adapter dtype PEFT asks for."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from peft import PeftModel, get_peft_model

import peft_ntk
from peft_ntk import NTKAttentionConfig
from peft_ntk.tuner.attention_hook import query_before_rotary


def left_padded_batch():
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (ids != 0).long()
    mask[1] = 1
    return ids, mask


def adapted(seed: int = 1, **kwargs):
    base = tiny_llama()
    torch.manual_seed(seed)
    return get_peft_model(base, NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs))


# ------------------------------------------------------------------------------------------------- pre-RoPE queries


def attention_query(model, ids):
    """The (rotated) query the first attention layer is called with."""
    seen = []
    with torch.no_grad(), peft_ntk.tuner.capture_attention_inputs(lambda m, q, k, v, s: seen.append(q)):
        model(input_ids=ids)
    return seen[0]


def test_unrotated_query_is_the_projection_before_rope():
    model = adapted(query_features="pre_rope").double()
    captured = {}
    attention = model.base_model.model.model.layers[0].self_attn
    base_attention = attention.base_layer

    def keep_projection(module, args, output):
        captured["pre"] = output.view(*output.shape[:-1], -1, 8).transpose(1, 2)

    def keep_unrotated(module, query, key, value, scaling):
        if module is base_attention and "unrotated" not in captured:
            captured["unrotated"] = query_before_rotary(module, query)

    handle = base_attention.q_proj.register_forward_hook(keep_projection)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), peft_ntk.tuner.capture_attention_inputs(keep_unrotated):
        model(input_ids=ids)
    handle.remove()
    # Llama computes cos/sin in float32, so cos² + sin² = 1 holds to ~1e-7 only: that bounds the round trip
    torch.testing.assert_close(captured["unrotated"], captured["pre"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(captured["unrotated"], attention_query(model, ids), atol=1e-3)


@pytest.mark.parametrize("query_features", ["pre_rope", "post_rope"])
def test_left_padding_without_position_ids(query_features):
    """pre_rope: the prefix term has no absolute position, so padding changes nothing even without position ids."""
    model = adapted(query_features=query_features)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[0, 3:]
        alone = model(input_ids=ids[:1, 3:]).logits[0]
    difference = (padded - alone).abs().max().item()
    if query_features == "pre_rope":
        assert difference < 1e-5
    else:
        assert difference > 1e-3  # the paper's post-RoPE features see the shifted positions


def test_pre_rope_cached_decoding_matches_a_full_forward():
    model = adapted(query_features="pre_rope")
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_pre_rope_gradients_match_the_reference_backend():
    grads = {}
    for backend in ("fused", "reference"):
        model = adapted(query_features="pre_rope", attention_backend=backend).double().train()
        ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["fused"].items():
        torch.testing.assert_close(grad, grads["reference"][name], rtol=1e-9, atol=1e-11)


def test_adapters_with_different_query_features_cannot_be_active_together():
    model = adapted(query_features="pre_rope")
    model.add_adapter("other", NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="different queries"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_bad_query_features_is_refused():
    with pytest.raises(ValueError, match="query_features"):
        NTKAttentionConfig(query_features="rotated")


# ------------------------------------------------------------------------------------------------- defaults


def test_default_adapter_is_exactly_the_base_model_and_trains():
    base = tiny_llama()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, NTKAttentionConfig(task_type="CAUSAL_LM")).train()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # zeros still get gradients (k too)


def test_adapters_saved_before_query_features_load_unchanged(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["query_features"]  # what older versions wrote
    config_file.write_text(json.dumps(saved))
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert reloaded.peft_config["default"].query_features == "post_rope"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_prefix_attention_share_and_diagnostics_callback():
    model = adapted()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    shares = peft_ntk.prefix_attention_share(model, input_ids=ids)
    assert len(shares) == 2 and all(0 < s["mean"] < 1 and s["mean"] <= s["max"] for s in shares)
    zero = get_peft_model(tiny_llama(), NTKAttentionConfig(task_type="CAUSAL_LM"))
    assert all(s["max"] == 0 for s in peft_ntk.prefix_attention_share(zero, input_ids=ids))
    with pytest.raises(ValueError, match="without padding"):
        peft_ntk.prefix_attention_share(model, input_ids=ids, attention_mask=torch.tensor([[0] + [1] * 8] * 2))
    callback = peft_ntk.NTKDiagnosticsCallback({"input_ids": ids}, every=1)
    record = callback.measure(model, step=3)
    assert record["step"] == 3 and len(record["z_abs"]) == 2 and record["k_abs"][0] > 0
    assert len(record["feature_spread"]) == 2 and all(0 < v < 1 for v in record["feature_spread"])
    with pytest.raises(ValueError, match="positive"):
        peft_ntk.NTKDiagnosticsCallback({"input_ids": ids}, every=0)


def test_feature_spread_is_the_distance_of_normalised_features_from_their_head_mean():
    from peft_ntk.tools.diagnostics import _feature_spread

    same = torch.rand(1, 3, 1, 4).expand(2, 3, 5, 4)  # every row of a head has the same features
    assert _feature_spread(same) == pytest.approx(0.0, abs=1e-6)
    scaled = same * torch.rand(2, 3, 5, 1)  # the prefix term sees phi / sum(phi): a row's scale does not count
    assert _feature_spread(scaled) == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.eye(2).repeat(1, 3).reshape(1, 1, 6, 2)  # rows alternate [1, 0], [0, 1]: mean [0.5, 0.5]
    assert _feature_spread(one_hot) == pytest.approx(0.5)
    # normalised FAVOR+ features differ between the queries of a head far more than elu's do
    elu = get_peft_model(tiny_llama(), NTKAttentionConfig(task_type="CAUSAL_LM"))
    favor = get_peft_model(tiny_llama(), NTKAttentionConfig(task_type="CAUSAL_LM", feature_map="favor"))
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    spread = {
        name: [s["feature_spread"] for s in peft_ntk.prefix_attention_share(m, input_ids=ids)]
        for name, m in (("elu", elu), ("favor", favor))
    }
    assert all(f > 2 * e for e, f in zip(spread["elu"], spread["favor"])), spread


# ------------------------------------------------------------------------------------------------- adapter dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("via", ["get_peft_model", "add_adapter"])
def test_adapter_dtype_follows_autocast_adapter_dtype(dtype, via):
    """PEFT's convention (its test_add_adapter_no_autocast_adapter_dtype): float32 adapters by default, the base
    model's dtype with autocast_adapter_dtype=False."""
    for autocast, expected in ((True, torch.float32), (False, dtype)):
        base = tiny_llama(dtype=dtype)
        config = NTKAttentionConfig(task_type="CAUSAL_LM")
        if via == "get_peft_model":
            model = get_peft_model(base, config, autocast_adapter_dtype=autocast)
            name = "default"
        else:
            model = get_peft_model(base, NTKAttentionConfig(task_type="CAUSAL_LM"))
            model.add_adapter("second", config, autocast_adapter_dtype=autocast)
            name = "second"
        adapter_params = [p for n, p in model.named_parameters() if "ntk_" in n and f".{name}" in n]
        assert adapter_params and {p.dtype for p in adapter_params} == {expected}, (autocast, via)
        model.base_model.set_adapter(name)
        out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(out).all()


def test_peft_type_is_stored_plainly_and_the_old_value_still_loads(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from peft_ntk.tuner.peft_type import LEGACY_PEFT_TYPE_VALUES

    model = adapted().eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["peft_type"] == "NTK_ATTENTION"  # like PEFT's own types ("LORA", ...)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    saved["peft_type"] = LEGACY_PEFT_TYPE_VALUES[0]  # what earlier versions stored
    config_file.write_text(json.dumps(saved))
    for reload in (
        lambda: PeftModel.from_pretrained(tiny_llama(), adapter_dir),
        lambda: AutoPeftModelForCausalLM.from_pretrained(adapter_dir),
    ):
        reloaded = reload().eval()
        assert reloaded.peft_config["default"].peft_type == peft_ntk.NTK_PEFT_TYPE
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, expected)
