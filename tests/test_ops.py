"""The NTK-Attention op against independent float64 references: forward, gradients and numerical edge cases."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import CASES, F64, case_inputs, make_inputs, padding_mask

import peft_ntk
from peft_ntk.ops import (
    causal_mask,
    elu_feature_map,
    naive_ntk_attention,
    ntk_attention_reference,
    prefix_state_from_keys_values,
)


def logspace_reference(q, k, v, z, kvec, mask=None, is_causal=False, scaling=None):
    """Independent float64 reference in the paper's sigmoid form: w = sigmoid(LSE - log a), out = w O + (1 - w) u / a."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    s = q @ k.transpose(-1, -2) * scaling
    allowed = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if is_causal:
        allowed = allowed & causal_mask(q.shape[2], k.shape[2], q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    phi = elu_feature_map(q)
    a = torch.einsum("bhld,hd->bhl", phi, kvec)
    u = torch.einsum("bhld,hde->bhle", phi, z)
    w = torch.sigmoid(lse - torch.log(a))
    return w[..., None] * o + (1 - w)[..., None] * u / a[..., None]


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_references(case):
    (q, k, v, z, kvec), kw = case_inputs(case)
    out = ntk_attention_reference(q, k, v, z, kvec, **kw)
    ref = logspace_reference(q, k, v, z, kvec, mask=kw["attention_mask"], is_causal=kw["is_causal"])
    naive = naive_ntk_attention(q, k, v, z, kvec, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_naive_formula(case):
    inputs, kw = case_inputs(case, requires_grad=True)
    grad_out = torch.randn(inputs[0].shape[:3] + (inputs[2].shape[-1],), dtype=F64)
    ours = torch.autograd.grad((ntk_attention_reference(*inputs, **kw) * grad_out).sum(), inputs)
    theirs = torch.autograd.grad((naive_ntk_attention(*inputs, **kw) * grad_out).sum(), inputs)
    for name, a, b in zip("q k v z kvec".split(), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("case", ["causal-cache", "padding+causal", "mqa"])
def test_gradcheck(case):
    opts = dict(CASES[case])
    opts.update(b=1, lq=min(opts.get("lq", 3), 3), lk=min(opts.get("lk", 4), 4), d=4, h=2)
    opts["hkv"] = min(opts.get("hkv", 1), 2)
    is_causal = opts.pop("is_causal", False)
    mask_kind = opts.pop("mask", None)
    inputs = make_inputs(requires_grad=True, **opts)
    mask = padding_mask(1, inputs[0].shape[2], inputs[1].shape[2], [3]) if mask_kind else None

    def fn(*args):
        return ntk_attention_reference(*args, attention_mask=mask, is_causal=is_causal)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_zero_prefix_is_plain_attention():
    q, k, v, _, _ = make_inputs(lq=6, lk=6)
    z, kvec = torch.zeros(4, 8, 8, dtype=F64), torch.zeros(4, 8, dtype=F64)
    mask = padding_mask(2, 6, 6, [6, 4]) & causal_mask(6, 6, q.device)
    out = ntk_attention_reference(q, k, v, z, kvec, attention_mask=mask)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    plain = ntk_attention_reference(q, k, v, None, None, attention_mask=mask)
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-13)


def test_equivalence_with_explicit_phi_kernel_prefix():
    """Z = Σ phi(k_p) v_pᵀ, k = Σ phi(k_p) is attention over an explicit prefix scored with the phi-kernel."""
    b, h, n, d, m = 2, 4, 6, 8, 11
    q, k, v, _, _ = make_inputs(b=b, h=h, hkv=h, lq=n, lk=n, d=d)
    g = torch.Generator().manual_seed(1)
    pk, pv = torch.randn(h, m, d, generator=g, dtype=F64), torch.randn(h, m, d, generator=g, dtype=F64)
    z, kvec = prefix_state_from_keys_values(pk, pv)
    out = ntk_attention_reference(q, k, v, z, kvec, is_causal=True)

    # explicit prefix: unnormalised weights e^{s_ij} on real keys, phi(q_i)·phi(k_p) on prefix keys
    s = (q @ k.transpose(-1, -2)) * d**-0.5
    s = s.masked_fill(~causal_mask(n, n, q.device), float("-inf"))
    real_w = torch.exp(s)
    prefix_w = torch.einsum("bhld,hmd->bhlm", elu_feature_map(q), elu_feature_map(pk))
    weights = torch.cat([prefix_w, real_w], dim=-1)
    values = torch.cat([pv.expand(b, h, m, d), v], dim=2)
    explicit = (weights @ values) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out, explicit, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_stay_finite_and_match(scale, dtype):
    """Logits of ±1e4 overflow or underflow the official formula (e^M); the stable form stays exact."""
    q, k, v, z, kvec = make_inputs(seed=3, dtype=dtype)
    if scale < 0:  # q >= 0 and k <= 0: every logit is about -1e4, so the prefix takes nearly all the mass
        q, k = q.abs(), -k.abs()
    q, k, v, z, kvec = (t.clone().requires_grad_(True) for t in (q, k, v, z, kvec))
    scaling = abs(scale) * q.shape[-1] ** -0.5
    mask = padding_mask(2, 5, 7, [7, 2])
    out = ntk_attention_reference(q, k, v, z, kvec, attention_mask=mask, scaling=scaling)
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, z, kvec))
    assert all(torch.isfinite(g_).all() for g_ in grads)
    ref = logspace_reference(*(t.detach().double() for t in (q, k, v, z, kvec)), mask=mask, scaling=scaling)
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    if scale < 0:  # the official formula divides e^-M = e^{+1e4} by itself: NaN, where the stable form is exact
        assert torch.isnan(naive_ntk_attention(q, k, v, z, kvec, attention_mask=mask, scaling=scaling)).any()


def test_fully_masked_rows_attend_to_the_prefix_only():
    q, k, v, z, kvec = make_inputs(requires_grad=True)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # one query row sees no key at all
    out = ntk_attention_reference(q, k, v, z, kvec, attention_mask=mask)
    phi = elu_feature_map(q[0, :, 2])
    expected = torch.einsum("hd,hde->he", phi, z) / torch.einsum("hd,hd->h", phi, kvec)[:, None]
    torch.testing.assert_close(out[0, :, 2], expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v, z, kvec))
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_fully_masked_row_without_prefix_mass_is_zero_not_nan():
    q, k, v, _, _ = make_inputs(requires_grad=True)
    z = torch.zeros(4, 8, 8, dtype=F64, requires_grad=True)
    kvec = torch.zeros(4, 8, dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.bool)
    out = ntk_attention_reference(q, k, v, z, kvec, attention_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v, z, kvec))
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_relu_feature_map_with_zero_features_gives_plain_attention():
    q, k, v, z, kvec = make_inputs()
    q = -q.abs()  # relu(q) = 0 everywhere: no prefix mass for any query
    out = ntk_attention_reference(q, k, v, z, kvec, feature_map="relu")
    plain = ntk_attention_reference(q, k, v, None, None)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-14)


def test_additive_and_boolean_masks_agree():
    q, k, v, z, kvec = make_inputs()
    mask = padding_mask(2, 5, 7, [7, 4])
    additive = torch.zeros(mask.shape, dtype=F64).masked_fill(~mask, torch.finfo(F64).min)
    torch.testing.assert_close(
        ntk_attention_reference(q, k, v, z, kvec, attention_mask=mask),
        ntk_attention_reference(q, k, v, z, kvec, attention_mask=additive),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    q, k, v, z, kvec = make_inputs(dtype=torch.float32, scale=10.0)
    out = ntk_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), z, kvec, is_causal=True)
    assert out.dtype == dtype
    ref = ntk_attention_reference(
        q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), z, kvec, is_causal=True
    )
    # Only the final cast rounds: the error is one ulp of the output dtype, not an accumulation.
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_weights_sum_to_the_mass_on_real_keys():
    q, k, v, z, kvec = make_inputs()
    out, weights = ntk_attention_reference(q, k, v, z, kvec, is_causal=True, return_weights=True)
    rows = weights.sum(-1)
    assert (rows < 1).all() and (rows > 0).all()
    _, plain_weights = ntk_attention_reference(q, k, v, None, None, is_causal=True, return_weights=True)
    torch.testing.assert_close(plain_weights.sum(-1), torch.ones_like(rows))
    assert (weights.triu(diagonal=k.shape[2] - q.shape[2] + 1) == 0).all()


def test_attention_dropout_only_touches_real_keys():
    q, k, v, z, kvec = make_inputs()
    torch.manual_seed(0)
    a = ntk_attention_reference(q, k, v, z, kvec, dropout=0.5)
    torch.manual_seed(0)
    b = ntk_attention_reference(q, k, v, z, kvec, dropout=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, ntk_attention_reference(q, k, v, z, kvec))
    # with all of V zero the dropped real-key term vanishes, so dropout cannot change anything
    zero_v = torch.zeros_like(v)
    torch.testing.assert_close(
        ntk_attention_reference(q, k, zero_v, z, kvec, dropout=0.5),
        ntk_attention_reference(q, k, zero_v, z, kvec),
        rtol=0,
        atol=1e-14,
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(q=torch.zeros(1, 3, 2, 8)), "not a multiple"),
        (dict(z=torch.zeros(4, 8, 7)), "z must have shape"),
        (dict(kvec=torch.zeros(4, 7)), "k must have shape"),
        (dict(mask=torch.ones(3, 1, 5, 7, dtype=torch.bool)), "does not broadcast"),
        (dict(q=torch.zeros(4, 8)), "must be 4-D"),
        (dict(kvec=None), "pass both z and k"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, message):
    q, k, v, z, kvec = make_inputs(b=1, dtype=torch.float32)
    args = dict(q=q, z=z, kvec=kvec, mask=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        ntk_attention_reference(args["q"], k, v, args["z"], args["kvec"], attention_mask=args["mask"])


def test_unknown_feature_map_names_the_registry():
    q, k, v, z, kvec = make_inputs(b=1)
    with pytest.raises(ValueError, match="register_feature_map"):
        ntk_attention_reference(q, k, v, z, kvec, feature_map="nope")
    with pytest.raises(ValueError, match="register_feature_map"):
        peft_ntk.NTKAttentionConfig(feature_map="nope")


def test_registered_feature_map_is_usable_and_guarded():
    def squared(x):
        return x.pow(2)

    peft_ntk.register_feature_map("test_squared", squared)
    try:
        q, k, v, z, kvec = make_inputs(b=1)
        out = ntk_attention_reference(q, k, v, z, kvec, feature_map="test_squared")
        assert torch.isfinite(out).all()
        assert peft_ntk.NTKAttentionConfig(feature_map="test_squared").feature_map == "test_squared"
        with pytest.raises(ValueError, match="already registered"):
            peft_ntk.register_feature_map("test_squared", lambda x: x)
    finally:
        peft_ntk.FEATURE_MAPS.pop("test_squared")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(feature_dropout=1.0), "feature_dropout"),
        (dict(init_scale=-1.0), "init_scale"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_ntk.NTKAttentionConfig(**kwargs)


def test_every_config_field_documents_itself():
    from dataclasses import fields

    from peft import PeftConfig

    own = {f.name for f in fields(peft_ntk.NTKAttentionConfig)} - {f.name for f in fields(PeftConfig)}
    own |= {"target_modules", "modules_to_save"}
    for f in fields(peft_ntk.NTKAttentionConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    members = list(PeftType)
    importlib.reload(importlib.import_module("peft_ntk.tuner.peft_type"))
    importlib.reload(importlib.import_module("peft_ntk.tuner.registration"))
    peft_ntk.register_with_peft()
    peft_ntk.register_attention_functions()
    assert list(PeftType) == members
    assert PeftType.NTK_ATTENTION is peft_ntk.NTK_PEFT_TYPE
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NTK_ATTENTION] is peft_ntk.NTKAttentionConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NTK_ATTENTION] is peft_ntk.NTKAttentionModel
