"""``prefix_mass="relative"``: the prefix's mass counted against the real keys' as 1 instead of their Σ e^s.

Every path is checked against the formula written out in float64 (forward and gradients; padding and causal masks,
grouped-query heads, a KV cache), and the model-level behaviour: identity at the zeros init, cached decoding, saving
and loading, and adapters saved before the option existed still loading with the paper's mass.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CASES, F64, case_inputs, make_inputs, ntk_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

import peft_ntk
from peft_ntk.ops import ntk_attention, ntk_attention_reference, plan_ntk_attention
from peft_ntk.ops.common import repeat_kv_heads
from peft_ntk.ops.feature_maps import PositiveRandomFeatures, draw_random_projection, get_feature_map
from peft_ntk.ops.reference import masked_scores


def written_out(q, k, v, z, kvec, *, attention_mask=None, is_causal=False, feature_map="elu"):
    """``(O + φ̂ᵀZ) / (1 + φ̂ᵀk)`` with ``φ̂ = phi / Σ phi``, from the materialised softmax, in one expression."""
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    scores = masked_scores(q, k, attention_mask=attention_mask, is_causal=is_causal, scaling=q.shape[-1] ** -0.5)
    attn_out = torch.softmax(scores, dim=-1) @ v
    phi = get_feature_map(feature_map)(q)
    phi = phi / phi.sum(-1, keepdim=True)
    prefix_value = torch.einsum("bhlr,hrd->bhld", phi, z)
    prefix_mass = torch.einsum("bhlr,hr->bhl", phi, kvec)[..., None]
    return (attn_out + prefix_value) / (1 + prefix_mass)


def _grads(op, inputs, options, grad_out):
    out = op(*inputs, **options)
    return out, torch.autograd.grad((out * grad_out).sum(), inputs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_computes_the_written_out_formula_forward_and_gradients(case, backend):
    inputs, options = case_inputs(case, requires_grad=True)
    plan = plan_ntk_attention(*inputs, **options, backend=backend, prefix_mass="relative")
    assert plan.path == ("fused+relative-combine" if backend == "auto" else "reference")
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    out, grads = _grads(ntk_attention, inputs, dict(options, backend=backend, prefix_mass="relative"), grad_out)
    expected, expected_grads = _grads(written_out, inputs, options, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(("q", "k", "v", "z", "k_vec"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


def test_the_paper_mass_is_unchanged_and_differs_from_the_relative_one():
    inputs, options = case_inputs("padding+causal")
    paper = ntk_attention(*inputs, **options)
    torch.testing.assert_close(ntk_attention(*inputs, **options, prefix_mass="paper"), paper, rtol=0, atol=0)
    torch.testing.assert_close(ntk_attention_reference(*inputs, **options), paper, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ntk_attention(*inputs, **options, prefix_mass="relative"), paper)


def test_the_share_does_not_depend_on_the_keys_mass_and_the_map_scale_cancels():
    q, k, v, z, kvec = make_inputs(lq=4, lk=4)
    # Scaling every score up multiplies e^LSE: the paper's prefix share shrinks, the relative one stays.
    loud = k * 4
    paper_quiet, paper_loud = (ntk_attention(q, kk, v, z, kvec) for kk in (k, loud))
    assert not torch.allclose(paper_quiet, paper_loud, atol=1e-3)
    attn_loud = ntk_attention(q, loud, v, None, None)
    attn_quiet = ntk_attention(q, k, v, None, None)
    rel_quiet, rel_loud = (ntk_attention(q, kk, v, z, kvec, prefix_mass="relative") for kk in (k, loud))
    # out = (O + u) / (1 + a) with u and a functions of q alone: only O changes with the keys.
    torch.testing.assert_close(rel_quiet - rel_loud, (attn_quiet - attn_loud) / (1 + written_mass(q, kvec)))
    # A stabilised map (FAVOR+, phi = e^c · phi_tilde) gives the same result as its plain form.
    projection = draw_random_projection(16, q.shape[-1], seed=0, dtype=F64)
    favor = PositiveRandomFeatures(projection)
    fz, fk = torch.randn(q.shape[1], 16, v.shape[-1], dtype=F64), torch.rand(q.shape[1], 16, dtype=F64)
    got = ntk_attention(q * 3, k, v, fz, fk, feature_map=favor, prefix_mass="relative")
    torch.testing.assert_close(got, written_out(q * 3, k, v, fz, fk, feature_map=favor), rtol=1e-10, atol=1e-12)


def written_mass(q, kvec):
    phi = get_feature_map("elu")(q)
    return torch.einsum("bhlr,hr->bhl", phi / phi.sum(-1, keepdim=True), kvec)[..., None]


def test_rows_without_keys_attend_to_the_prefix_alone_and_zero_features_get_no_prefix():
    q, k, v, z, kvec = make_inputs(b=1, lq=3, lk=4)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 1, :] = False  # row 1 sees no key
    out = ntk_attention(q, k, v, z, kvec, attention_mask=mask, prefix_mass="relative", backend="reference")
    phi = get_feature_map("elu")(q)
    phi = phi / phi.sum(-1, keepdim=True)
    alone = torch.einsum("bhlr,hrd->bhld", phi, z) / torch.einsum("bhlr,hr->bhl", phi, kvec)[..., None]
    torch.testing.assert_close(out[:, :, 1], alone[:, :, 1], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out).all()
    # relu features of an all-negative query are all zero: that row is plain attention, not NaN.
    negative = -q.abs() - 0.1
    out = ntk_attention(negative, k, v, z, kvec, feature_map="relu", prefix_mass="relative")
    torch.testing.assert_close(out, ntk_attention(negative, k, v, None, None), rtol=1e-10, atol=1e-12)


def test_an_unknown_prefix_mass_is_a_clear_error():
    inputs, _ = case_inputs("no-mask")
    with pytest.raises(
        ValueError, match=r"prefix_mass='absolute' is not supported; use one of \('paper', 'relative'\)"
    ):
        ntk_attention(*inputs, prefix_mass="absolute")
    with pytest.raises(ValueError, match="prefix_mass='nope' is not supported"):
        peft_ntk.NTKAttentionConfig(prefix_mass="nope")


def test_relative_adapter_starts_as_the_base_model_and_decodes_with_a_cache_as_without():
    base = tiny_model("llama").eval()
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, ntk_config(prefix_mass="relative")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)
        for layer in peft_ntk.tools.diagnostics.ntk_layers(model):
            layer[1].ntk_z["default"].normal_(0, 0.3)
            layer[1].ntk_k["default"].uniform_(0, 2)
        full = model(ids).logits
        assert not torch.allclose(full, expected, atol=1e-3)
        prefill = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], cache=prefill.past_key_values)
    torch.testing.assert_close(torch.cat([prefill.logits, step.logits], 1), full, rtol=1e-4, atol=1e-5)


def test_relative_adapters_save_and_load_and_old_adapters_load_with_the_paper_mass(tmp_path):
    ids = torch.randint(3, 60, (1, 7), generator=torch.Generator().manual_seed(0))
    for mass in ("paper", "relative"):
        model = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False, prefix_mass=mass)).eval()
        with torch.no_grad():
            expected = model(ids).logits
        model.save_pretrained(tmp_path / mass)
        saved = json.loads((tmp_path / mass / "adapter_config.json").read_text())
        assert saved["prefix_mass"] == mass
        assert f"prefix mass `{mass}`" in (tmp_path / mass / "README.md").read_text()  # the model card says which
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / mass).eval()
        assert loaded.peft_config["default"].prefix_mass == mass
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    # An adapter written before prefix_mass existed: its config has no such key, and it was trained with the paper's.
    old = tmp_path / "paper"
    config = json.loads((old / "adapter_config.json").read_text())
    del config["prefix_mass"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    assert peft_ntk.NTKAttentionConfig.from_pretrained(str(old)).prefix_mass == "paper"
    loaded = PeftModel.from_pretrained(tiny_model("llama"), old).eval()
    assert loaded.peft_config["default"].prefix_mass == "paper"


def test_adapters_with_different_prefix_masses_are_not_combined():
    model = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False))
    model.add_adapter("relative", ntk_config(init_weights=False, prefix_mass="relative"))
    model.base_model.set_adapter(["default", "relative"])
    with pytest.raises(ValueError, match="different prefix_mass settings"):
        model(torch.tensor([[3, 4, 5]]))


def test_diagnostics_report_the_relative_share():
    model = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False, prefix_mass="relative")).eval()
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    captured = []
    with peft_ntk.tools.diagnostics.capture_attention_inputs(lambda m, q, k, v, s: captured.append(q.detach())):
        with torch.no_grad():
            model(ids)
    shares = peft_ntk.tools.diagnostics.prefix_attention_share(model, input_ids=ids)
    for (_, layer), query, share in zip(peft_ntk.tools.diagnostics.ntk_layers(model), captured, shares):
        _, kvec = layer.effective_prefix("default")
        mass = written_mass(query.double(), kvec.double())
        expected = (mass / (1 + mass)).flatten()
        assert share["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
        assert share["max"] == pytest.approx(expected.max().item(), rel=1e-5)


def test_init_from_text_refuses_a_relative_adapter(tok):
    model = get_peft_model(tiny_model("llama"), ntk_config(prefix_mass="relative"))
    with pytest.raises(ValueError, match="prefix_mass='paper'"):
        peft_ntk.init_from_text(model, tok, "some text to read", progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_float64_result_to_their_precision(dtype):
    inputs, options = case_inputs("padding+causal")
    expected = written_out(*inputs, **options)
    low = [t.to(dtype) for t in inputs]
    out = ntk_attention(*low, **options, prefix_mass="relative")
    assert out.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    # Against the same inputs rounded to the low precision, computed in float64: only the output rounding remains.
    rounded = written_out(*[t.double() for t in low], **options)
    torch.testing.assert_close(out.double(), rounded, rtol=tolerance / 2, atol=tolerance / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal-square", "causal-cache", "padding", "mqa"])
def test_cuda_path_computes_the_written_out_formula(case, dtype):
    inputs, options = case_inputs(case, requires_grad=True)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected, expected_grads = _grads(written_out, inputs, options, grad_out)
    cuda = [t.detach().to("cuda", dtype).requires_grad_(True) for t in inputs]
    cuda_options = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    assert plan_ntk_attention(*cuda, **cuda_options, prefix_mass="relative").path == "fused+relative-combine"
    out, grads = _grads(ntk_attention, cuda, dict(cuda_options, prefix_mass="relative"), grad_out.to("cuda", dtype))
    tolerance = 3e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tolerance * 3, atol=tolerance * 3)


def test_every_prefix_mass_has_a_recommended_learning_rate():
    from peft_ntk.ops.reference import PREFIX_MASSES

    assert set(peft_ntk.RECOMMENDED_LEARNING_RATES) == set(PREFIX_MASSES)
    default_mass = peft_ntk.NTKAttentionConfig().prefix_mass
    assert peft_ntk.RECOMMENDED_LEARNING_RATE == peft_ntk.RECOMMENDED_LEARNING_RATES[default_mass]


def test_the_recommended_rate_follows_the_prefix_mass_and_the_feature_map():
    rate = peft_ntk.recommended_learning_rate
    assert rate(peft_ntk.NTKAttentionConfig()) == peft_ntk.RECOMMENDED_LEARNING_RATE == 1e-3
    assert rate(peft_ntk.NTKAttentionConfig(prefix_mass="relative")) == peft_ntk.RECOMMENDED_LEARNING_RATES["relative"]
    # FAVOR+ features took a higher rate than elu's with either mass
    assert rate(peft_ntk.NTKAttentionConfig(prefix_mass="relative", feature_map="favor")) == 1e-2
    assert rate(peft_ntk.NTKAttentionConfig(feature_map="favor")) == 1e-2
    # a map measured with neither mass falls back to its mass's elu rate
    assert rate(peft_ntk.NTKAttentionConfig(prefix_mass="relative", feature_map="relu")) == 3e-3
    with pytest.raises(TypeError, match="takes an NTKAttentionConfig, got LoraConfig"):
        rate(LoraConfig(r=8))


def test_the_model_card_gives_each_adapters_rate_with_its_feature_map():
    from peft_ntk.hub.model_card import ntk_model_card_section

    config = ntk_config(init_weights="zeros", prefix_mass="relative", feature_map="favor")
    section = ntk_model_card_section(get_peft_model(tiny_model("llama"), config))
    notes = section[section.index("### Training notes") :]
    assert "0.01 for prefix mass `relative` with the `favor` feature map" in notes
    assert "`elu` feature map" not in notes


@pytest.mark.parametrize("mass", ["paper", "relative"])
def test_the_model_card_gives_the_recommended_rate_for_the_adapters_prefix_mass(mass):
    from peft_ntk.hub.model_card import ntk_model_card_section

    other = {"paper": "relative", "relative": "paper"}[mass]
    zeros = get_peft_model(tiny_model("llama"), ntk_config(init_weights="zeros", prefix_mass=mass))
    section = ntk_model_card_section(zeros)
    notes = section[section.index("### Training notes") :]
    assert f"{peft_ntk.RECOMMENDED_LEARNING_RATES[mass]:g} for prefix mass `{mass}`" in notes
    assert f"prefix mass `{other}`" not in notes  # only the masses this model's adapters use
    assert "exactly the base model's" in notes
    assert '`feature_map="favor"` scored' in notes  # the elu map's card points to the better classification map
    randomised = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False, prefix_mass=mass))
    assert "exactly the base model's" not in ntk_model_card_section(randomised)  # a random init changes the outputs
    favor = get_peft_model(tiny_model("llama"), ntk_config(feature_map="favor", prefix_mass=mass))
    assert '`feature_map="favor"` scored' not in ntk_model_card_section(favor)
