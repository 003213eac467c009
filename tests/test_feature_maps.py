"""Feature maps: FAVOR+ positive random features, the feature dimension r, stabilised evaluation, saving the projection."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from helpers import run_benchmark, sdpa_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_ntk
from peft_ntk import ops
from peft_ntk.ops import (
    PrefixStateAccumulator,
    fused_ntk_attention,
    naive_ntk_attention,
    ntk_attention_reference,
    prefix_state_from_keys_values,
)
from peft_ntk.ops.feature_maps import (
    PositiveRandomFeatures,
    draw_random_projection,
    elu_feature_map,
    feature_map_and_log_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def kernel_relative_error(r: int, seed: int, orthogonal: bool, d: int = 16, n: int = 64) -> float:
    """Mean |phi(q)ᵀphi(k) / exp(q·k/√d) − 1| over n×n pairs of moderate-norm vectors."""
    gen = torch.Generator().manual_seed(100)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6
    k = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6
    phi = PositiveRandomFeatures(draw_random_projection(r, d, orthogonal=orthogonal, seed=seed, dtype=torch.float64))
    estimate = phi(q) @ phi(k).T
    exact = torch.exp(q @ k.T / math.sqrt(d))
    return (estimate / exact - 1).abs().mean().item()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_favor_error_falls_as_r_grows(orthogonal):
    errors = {r: sum(kernel_relative_error(r, s, orthogonal) for s in range(3)) / 3 for r in (8, 64, 512, 4096)}
    rs = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(rs, rs[1:])), errors
    # Monte Carlo: error ~ 1/sqrt(r); 512x more features -> about 22x smaller error; ask for 8x.
    assert errors[4096] < errors[8] / 8, errors
    assert errors[4096] < 0.1, errors


def test_favor_is_unbiased_and_elu_is_not():
    """Averaged over many independent projections the FAVOR+ estimate converges to exp(q·k/√d); elu+1 does not."""
    d = 8
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, d, generator=gen, dtype=torch.float64) * 0.5
    exact = torch.exp(q @ k / math.sqrt(d)).item()
    estimates = []
    for seed in range(500):  # relative std of the mean ≈ 0.02 here
        phi = PositiveRandomFeatures(draw_random_projection(16, d, orthogonal=False, seed=seed, dtype=torch.float64))
        estimates.append((phi(q) @ phi(k)).item())
    mean = sum(estimates) / len(estimates)
    assert abs(mean / exact - 1) < 0.06
    elu = (elu_feature_map(q) @ elu_feature_map(k)).item()
    assert abs(elu / exact - 1) > 1.0  # ≈ d: elu+1 is not an estimate of exp at all


def test_orthogonal_projection_rows_are_orthogonal_within_blocks_and_deterministic():
    w = draw_random_projection(20, 8, seed=5, dtype=torch.float64)
    assert w.shape == (20, 8)
    block = w[:8] / w[:8].norm(dim=-1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.equal(w, draw_random_projection(20, 8, seed=5, dtype=torch.float64))
    assert not torch.equal(w, draw_random_projection(20, 8, seed=6, dtype=torch.float64))


def random_inputs(dtype=torch.float64, scale=1.0, seed=0, heads=4, kv_heads=2, lq=5, lk=5, d=8, r=12):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, d, generator=gen, dtype=dtype) * scale
    k = torch.randn(2, kv_heads, lk, d, generator=gen, dtype=dtype) * scale
    v = torch.randn(2, kv_heads, lk, d, generator=gen, dtype=dtype)
    z = torch.randn(heads, r, d, generator=gen, dtype=dtype)
    kvec = torch.rand(heads, r, generator=gen, dtype=dtype)
    return q, k, v, z, kvec


def log_domain_reference(q, k, v, z, kvec, phi):
    """Causal NTK attention in float64 with every exponential taken relative to one per-row maximum M over both the
    scores and the log-features: (Σ e^(s−M) v + e^(logφ−M)·Z) / (Σ e^(s−M) + e^(logφ−M)·k). Independent of ops."""
    q, k, v, z, kvec = (t.double() for t in (q, k, v, z, kvec))
    heads = q.shape[1]
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    lq, lk = scores.shape[-2:]
    allowed = torch.arange(lq)[:, None] + (lk - lq) >= torch.arange(lk)[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    log_phi = PositiveRandomFeatures(phi.projection.double()).log_features(q)
    m = torch.maximum(scores.amax(-1), log_phi.amax(-1))[..., None]
    e, f = torch.exp(scores - m), torch.exp(log_phi - m)
    numerator = e @ v + torch.einsum("bhlr,hrd->bhld", f, z)
    denominator = e.sum(-1) + torch.einsum("bhlr,hr->bhl", f, kvec)
    return numerator / denominator[..., None]


def test_favor_attention_matches_float64_reference_even_for_large_queries():
    """The stabilised combine (phi_tilde with LSE − c) equals the formula with true-scale features."""
    phi = PositiveRandomFeatures(draw_random_projection(12, 8, seed=0, dtype=torch.float64))
    q, k, v, z, kvec = random_inputs(scale=0.5)
    expected = naive_ntk_attention(q, k, v, z, kvec, is_causal=True, feature_map=phi)  # the paper's formula
    assert torch.allclose(log_domain_reference(q, k, v, z, kvec, phi), expected, rtol=1e-10)
    for scale in (0.5, 3.0, 12.0, 40.0):
        q, k, v, z, kvec = random_inputs(scale=scale)
        expected = log_domain_reference(q, k, v, z, kvec, phi)
        assert torch.allclose(
            ntk_attention_reference(q, k, v, z, kvec, is_causal=True, feature_map=phi), expected, rtol=1e-9
        )
        # float32, where for scale >= 12 the plain exponential features underflow or overflow on their own
        phi32 = PositiveRandomFeatures(phi.projection.float())
        got = ntk_attention_reference(*(t.float() for t in (q, k, v, z, kvec)), is_causal=True, feature_map=phi32)
        assert torch.isfinite(got).all(), scale
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4), scale
        if scale >= 12:
            plain = phi32(q.float())
            assert (plain == 0).any() or not torch.isfinite(plain).all()


def test_favor_attention_gradients_match_finite_differences():
    phi = PositiveRandomFeatures(draw_random_projection(6, 4, seed=0, dtype=torch.float64))
    inputs = [t.requires_grad_() for t in random_inputs(lq=3, lk=3, d=4, r=6, heads=2, kv_heads=1)]
    assert torch.autograd.gradcheck(lambda *a: ntk_attention_reference(*a, is_causal=True, feature_map=phi), inputs)


def test_fused_path_matches_reference_for_favor():
    phi = PositiveRandomFeatures(draw_random_projection(12, 8, seed=0))
    q, k, v, z, kvec = random_inputs(dtype=torch.float32, scale=1.5)
    expected = ntk_attention_reference(q, k, v, z, kvec, is_causal=True, feature_map=phi)
    got = fused_ntk_attention(q, k, v, z, kvec, is_causal=True, feature_map=phi)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("favor", [False, True])
def test_streaming_prefix_state_equals_one_pass(favor):
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64) * 2
    keys[:, 30:] *= 4  # later chunks raise the running scale: the earlier sums must be rescaled
    values = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64)
    fm = PositiveRandomFeatures(draw_random_projection(16, 8, seed=0, dtype=torch.float64)) if favor else "elu"
    acc = PrefixStateAccumulator(fm)
    for start in range(0, 50, 7):
        acc.add(keys[:, start : start + 7], values[:, start : start + 7])
    z, k = acc.state()
    phi = fm(keys) if favor else elu_feature_map(keys)  # the true-scale features, no stabiliser at all
    assert torch.allclose(z, torch.einsum("hmr,hmd->hrd", phi, values), rtol=1e-12)
    assert torch.allclose(k, phi.sum(1), rtol=1e-12)
    z1, k1 = prefix_state_from_keys_values(keys, values, fm)
    assert torch.allclose(z, z1, rtol=1e-12) and torch.allclose(k, k1, rtol=1e-12)


def test_stabilized_features_are_bounded_and_exact():
    phi = PositiveRandomFeatures(draw_random_projection(32, 8, seed=0, dtype=torch.float64))
    x = torch.randn(10, 8, dtype=torch.float64) * 5
    tilde, log_scale = feature_map_and_log_scale(phi, x)
    assert tilde.amax(-1).allclose(torch.ones(10, dtype=torch.float64))
    assert torch.allclose(tilde * torch.exp(log_scale)[:, None], phi(x), rtol=1e-12)
    plain, none = feature_map_and_log_scale("elu", x)
    assert none is None and torch.equal(plain, elu_feature_map(x))


# ---------------------------------------------------------------------------------------------------------------------
# the adapter


def favor_config(**kw):
    kw.setdefault("feature_dim", 24)
    return peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", feature_map="favor", init_weights=False, **kw)


def test_favor_adapter_shapes_buffer_and_parameter_count():
    model = get_peft_model(sdpa_llama(), favor_config(feature_dim=40))
    layer = model.base_model.model.model.layers[0].self_attn
    assert layer.ntk_z["default"].shape == (4, 40, 8) and layer.ntk_k["default"].shape == (4, 40)
    assert layer.ntk_projection["default"].shape == (40, 8)
    assert not layer.ntk_projection["default"].requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 4 * (40 * 8 + 40)
    assert all("ntk_projection" not in name for name, _ in model.named_parameters())


def test_default_config_is_unchanged_elu_with_r_equal_head_dim():
    model = get_peft_model(sdpa_llama(), peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[0].self_attn
    assert layer.ntk_z["default"].shape == (4, 8, 8) and layer.ntk_k["default"].shape == (4, 8)
    assert len(layer.ntk_projection) == 0
    assert all("ntk_projection" not in key for key in model.state_dict())
    # the names other helpers import from peft_ntk.ops still exist
    for name in ("elu_feature_map", "relu_feature_map", "FEATURE_MAPS", "register_feature_map", "get_feature_map"):
        assert hasattr(ops, name)


def test_favor_adapter_saves_loads_and_gives_identical_outputs(tmp_path):
    base_state = {k: v.clone() for k, v in sdpa_llama().state_dict().items()}
    model = get_peft_model(sdpa_llama(), favor_config(feature_seed=3)).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    with model.disable_adapter():
        assert not torch.allclose(model(input_ids=ids).logits, expected)  # the adapter has a visible effect
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    layer = model.base_model.model.model.layers[0].self_attn
    assert torch.equal(
        saved["base_model.model.model.layers.0.self_attn.ntk_projection"], layer.ntk_projection["default"]
    )
    # A different seed in the config must not matter: the saved projection is the source of truth.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["feature_seed"] = 12345
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = sdpa_llama(seed=7)
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
    reloaded_layer = reloaded.base_model.model.model.layers[0].self_attn
    assert torch.equal(reloaded_layer.ntk_projection["default"], layer.ntk_projection["default"])


def test_favor_adapter_fused_and_reference_backends_agree():
    fused = get_peft_model(sdpa_llama(), favor_config(attention_backend="fused")).eval()
    reference = get_peft_model(sdpa_llama(), favor_config(attention_backend="reference")).eval()
    reference.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fused(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_favor_adapter_with_other_feature_dim_does_not_fit(tmp_path):
    get_peft_model(sdpa_llama(), favor_config(feature_dim=24)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["feature_dim"] = 32
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit this model"):
        PeftModel.from_pretrained(sdpa_llama(), tmp_path)


def test_two_favor_adapters_with_different_projections_cannot_be_combined():
    model = get_peft_model(sdpa_llama(), favor_config(feature_seed=1))
    model.add_adapter("other", favor_config(feature_seed=2))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="different random projections"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature_map="elu", feature_dim=16), "needs a map with a free feature dimension"),
        (dict(feature_map="favor", feature_dim=0), "feature_dim must be a positive integer"),
        (dict(feature_map="favor", feature_seed="x"), "feature_seed must be an integer"),
        (dict(feature_map="favour"), "is not registered"),
    ],
)
def test_bad_feature_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_ntk.NTKAttentionConfig(**kwargs)


def test_favor_name_without_projection_says_what_to_do():
    q, k, v, z, kvec = random_inputs()
    with pytest.raises(ValueError, match="needs its random projection"):
        ntk_attention_reference(q, k, v, z, kvec, feature_map="favor")


def test_bench_feature_maps_quick(tmp_path):
    out = tmp_path / "fm"
    result = run_benchmark("bench_feature_maps", "--quick", "--output-dir", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "feature_maps_quick.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the bench extra)
        assert (out / "feature_maps_quick.png").is_file()
    favor = [row for row in data["rows"] if row["map"] == "favor" and row["data"] == "synthetic"]
    assert favor and all(math.isfinite(row["relative_error"]) for row in data["rows"])
    errors = [row["relative_error"] for row in sorted(favor, key=lambda row: row["r"])]
    assert errors[-1] < errors[0]
