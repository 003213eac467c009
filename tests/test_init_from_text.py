"""init_from_text: compressing a text of any length into an NTK adapter (Z = Σ phi(k_p) v_pᵀ, k = Σ phi(k_p))."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from helpers import ntk_config, run_benchmark, tiny_llama
from peft import get_peft_model
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import peft_ntk
from ntk_rankgen_assets.texts import python_reference_docs
from ntk_rankgen_assets.training import train_bpe_tokenizer
from peft_ntk import init_from_text
from peft_ntk.ops import prefix_state_from_keys_values
from peft_ntk.ops.feature_maps import PositiveRandomFeatures

CONTEXT = 32  # the tiny model's context window; the texts below are several times longer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return python_reference_docs()


@pytest.fixture(scope="module")
def tok(docs):
    return train_bpe_tokenizer(docs[:40], 300)


@pytest.fixture(scope="module")
def long_text(docs, tok) -> str:
    text = "\n".join(docs[40:44])
    ids = tok(text, add_special_tokens=False)["input_ids"][: 7 * CONTEXT + 5]  # 8 chunks, the last one short
    return tok.decode(ids)


def ntk_model(tok, **config):
    config.setdefault("init_weights", False)  # a non-zero adapter: reading must not depend on it
    # grouped-query heads: Z, k are per query head, keys per KV head
    base = tiny_llama(
        vocab_size=len(tok), max_position_embeddings=CONTEXT, pad_token_id=None, attn_implementation="sdpa"
    )
    return get_peft_model(base, ntk_config(**config)).eval()


@torch.no_grad()
def reference_keys_values(model: LlamaForCausalLM, ids: list[int], chunk: int):
    """Post-RoPE keys/values per layer, computed by hand from the base model's weights, chunk by chunk (positions
    restart at 0 in every chunk), repeated to the query heads: (H, n, d) each. Independent of the attention hook."""
    inner = model.model
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // heads
    keys = [[] for _ in inner.layers]
    values = [[] for _ in inner.layers]
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start : start + chunk]])
        hidden = model(input_ids=piece, output_hidden_states=True, use_cache=False).hidden_states
        positions = torch.arange(piece.shape[1])[None]
        cos, sin = inner.rotary_emb(hidden[0], positions)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            attn = getattr(attn, "base_layer", attn)
            x = layer.input_layernorm(hidden[i])
            k = attn.k_proj(x).view(1, -1, kv_heads, d).transpose(1, 2)
            v = attn.v_proj(x).view(1, -1, kv_heads, d).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            keys[i].append(k[0].repeat_interleave(heads // kv_heads, 0))
            values[i].append(v[0].repeat_interleave(heads // kv_heads, 0))
    return [(torch.cat(k, 1), torch.cat(v, 1)) for k, v in zip(keys, values)]


def layer_states(model, adapter="default"):
    layers = model.base_model.model.model.layers
    return [
        (layer.self_attn.ntk_z[adapter].detach().clone(), layer.self_attn.ntk_k[adapter].detach().clone())
        for layer in layers
    ]


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_text_longer_than_the_context_gives_the_hand_computed_prefix_state(tok, long_text, feature_map):
    kw = dict(feature_map="favor", feature_dim=48) if feature_map == "favor" else {}
    model = ntk_model(tok, **kw)
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4 * CONTEXT
    report = init_from_text(model, tok, long_text, batch_size=3, progress=False)
    assert report.tokens == len(ids) and report.chunks == math.ceil(len(ids) / CONTEXT)
    assert report.chunk_size == CONTEXT and report.layers == 2
    with model.disable_adapter():
        reference = reference_keys_values(model.base_model.model, ids, CONTEXT)
    for i, ((z, k), (keys, values)) in enumerate(zip(layer_states(model), reference)):
        layer = model.base_model.model.model.layers[i].self_attn
        fm = layer.adapter_feature_map("default")
        if isinstance(fm, PositiveRandomFeatures):
            fm = PositiveRandomFeatures(fm.projection.double())
        z_ref, k_ref = prefix_state_from_keys_values(keys.double(), values.double(), fm)
        assert torch.allclose(z.double(), z_ref, rtol=1e-4, atol=1e-4 * z_ref.abs().max().item()), i
        assert torch.allclose(k.double(), k_ref, rtol=1e-4), i
        assert torch.equal(z[0], z[1]) and torch.equal(z[2], z[3])  # query heads sharing a KV head


def test_streaming_gives_the_same_state_as_one_pass(tok, long_text):
    """Batch sizes, chunk sizes that divide the text differently, and a list of pieces all agree with one pass."""
    model = ntk_model(tok)
    init_from_text(model, tok, long_text, batch_size=64, progress=False)  # all full chunks in one forward
    one_pass = layer_states(model)
    init_from_text(model, tok, long_text, batch_size=1, progress=False)  # chunk by chunk
    for (z1, k1), (z2, k2) in zip(one_pass, layer_states(model)):
        assert torch.allclose(z1, z2, rtol=1e-5, atol=1e-5) and torch.allclose(k1, k2, rtol=1e-5)
    # An iterable of texts: each text is chunked on its own, so the state is the sum of the texts' states.
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    first, second = tok.decode(ids[: 3 * CONTEXT]), tok.decode(ids[3 * CONTEXT :])
    assert tok(first, add_special_tokens=False)["input_ids"] + tok(second, add_special_tokens=False)["input_ids"] == ids
    report = init_from_text(model, tok, iter([first, second]), progress=False)
    assert report.tokens == len(ids)
    for (z1, k1), (z2, k2) in zip(one_pass, layer_states(model)):
        assert torch.allclose(z1, z2, rtol=1e-5, atol=1e-5) and torch.allclose(k1, k2, rtol=1e-5)


def test_reading_does_not_depend_on_the_adapter_and_overwrites_it(tok, long_text):
    model = ntk_model(tok)
    init_from_text(model, tok, long_text, progress=False)
    first = layer_states(model)
    init_from_text(model, tok, long_text, progress=False)  # now the adapter holds the text itself: still ignored
    for (z1, k1), (z2, k2) in zip(first, layer_states(model)):
        assert torch.equal(z1, z2) and torch.equal(k1, k2)
    assert model.base_model.model.model.layers[0].self_attn.disable_adapters is False  # switched back on


def test_the_filled_adapter_equals_explicit_phi_kernel_prefix_attention(tok, long_text, docs):
    """Using the adapter = attending to every token of the text as a prefix with the phi kernel (the NTK identity)."""
    from peft_ntk.ops import naive_ntk_attention

    model = ntk_model(tok)
    init_from_text(model, tok, long_text, progress=False)
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    with model.disable_adapter():
        prefix = reference_keys_values(model.base_model.model, ids, CONTEXT)
    layer = model.base_model.model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k_real, v_real = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pk, pv = prefix[0]
    # explicit: the real keys plus every prefix row, prefix rows weighted by phi(q)ᵀphi(k_p) instead of exp(q·k_p)
    phi = peft_ntk.elu_feature_map
    scores = torch.exp(q @ k_real.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)).tril()
    prefix_w = torch.einsum("bhld,hmd->bhlm", phi(q), phi(pk.double()))
    numerator = scores @ v_real.repeat_interleave(2, 1) + prefix_w @ pv.double()
    explicit = numerator / (scores.sum(-1, keepdim=True) + prefix_w.sum(-1, keepdim=True))
    z, k = layer.ntk_z["default"].double(), layer.ntk_k["default"].double()
    ntk = naive_ntk_attention(q, k_real, v_real, z, k, is_causal=True)
    assert torch.allclose(ntk, explicit, rtol=1e-5, atol=1e-6)


def test_calibration_rescales_each_head_and_closes_the_mass_gap(tok, long_text, docs):
    model = ntk_model(tok)
    init_from_text(model, tok, long_text, progress=False)
    raw = layer_states(model)
    report = init_from_text(model, tok, long_text, calibrate=True, calibration_text=docs[50], progress=False)
    for (z_raw, k_raw), (z_cal, k_cal), scales, (before, after) in zip(
        raw, layer_states(model), report.calibration_scales, report.calibration_log_mass_error
    ):
        alpha = torch.tensor(scales)
        assert torch.allclose(z_cal, z_raw * alpha[:, None, None], rtol=1e-4, atol=1e-6)
        assert torch.allclose(k_cal, k_raw * alpha[:, None], rtol=1e-4)
        assert not torch.allclose(alpha, torch.ones_like(alpha), rtol=0.05)  # elu's mass is far from exp's
        assert after < before
    assert all(
        s == 1.0 for layer in init_from_text(model, tok, long_text, progress=False).calibration_scales for s in layer
    )


def test_perplexity_calibration_picks_the_best_global_scale(tok, long_text, docs):
    model = ntk_model(tok)
    init_from_text(model, tok, long_text, progress=False)
    raw = layer_states(model)
    held_out = docs[60]
    report = init_from_text(model, tok, long_text, calibrate="perplexity", calibration_text=held_out, progress=False)
    scales = [scale for scale, _ in report.calibration_curve]
    assert len(scales) == 19 and scales[0] == pytest.approx(1e-8) and scales[-1] == pytest.approx(10.0)
    best, best_ppl = min(report.calibration_curve, key=lambda point: point[1])
    assert all(layer == [best] * 4 for layer in report.calibration_scales)
    for (z_raw, k_raw), (z, k) in zip(raw, layer_states(model)):
        assert torch.allclose(z, z_raw * best, rtol=1e-6, atol=1e-12) and torch.allclose(k, k_raw * best, rtol=1e-6)
    # the curve is real: the scale changes the perplexity, and a tiny scale is the base model
    ids = tok(held_out, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        nll = count = 0
        for i in range(0, len(ids), CONTEXT):
            chunk = torch.tensor([ids[i : i + CONTEXT]])
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    assert report.calibration_curve[0][1] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert best_ppl <= report.calibration_curve[0][1]
    assert max(p for _, p in report.calibration_curve) > 1.01 * best_ppl
    with pytest.raises(ValueError, match="pass calibration_text"):
        init_from_text(model, tok, long_text, calibrate="perplexity", progress=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(chunk_size=CONTEXT + 1), ValueError, "exceeds the model's context window"),
        (dict(adapter_name="nope"), ValueError, "no NTK-Attention layers with an adapter named 'nope'"),
        (dict(calibrate="yes"), ValueError, "calibrate='yes' is not supported"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused(tok, long_text, kwargs, error, message):
    with pytest.raises(error, match=message):
        init_from_text(ntk_model(tok), tok, long_text, progress=False, **kwargs)


def test_empty_text_and_iterables_without_calibration_text_are_refused(tok):
    model = ntk_model(tok)
    with pytest.raises(ValueError, match="empty"):
        init_from_text(model, tok, "", progress=False)
    with pytest.raises(ValueError, match="calibration_text"):
        init_from_text(model, tok, iter(["some text"]), calibrate=True, progress=False)


def test_long_context_experiment_quick(tmp_path):
    out = tmp_path / "lc"
    result = run_benchmark(
        "ntk_long_context", "--quick", "--output-dir", str(out), timeout=600, TOKENIZERS_PARALLELISM="false"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads((out / "ntk_long_context_quick.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the bench extra)
        assert (out / "ntk_long_context_quick.png").is_file()
    ppl = data["perplexity"]
    assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    expected = {"none", "last_k", "exact_prefix", "ntk_elu", "ntk_elu_calibrated", "ntk_elu_scaled", "ntk_favor"}
    assert expected | {
        "finetuned_from_text",
        "finetuned_from_scaled",
        "finetuned_from_random",
        "finetuned_prefix",
    } <= set(ppl)
    assert data["init_from_text"]["ntk_elu_scaled"]["scale_curve"]
