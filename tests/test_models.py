"""NTK-Attention on real (tiny) transformers models: routing, padding, caching, dtypes, PEFT features, errors.

Every model is built from a config (no downloads) with 2 layers, 4 heads of size 8, so one adapted layer holds
4 × (8² + 8) = 288 parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYERS,
    NUM_LABELS,
    VOCAB,
    ntk_config,
    save_llama_adapter,
    tiny_model,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_ntk
import peft_ntk.ops.dispatch
from peft_ntk import NTKAttentionConfig, NTKAttentionLayer

PARAMS_PER_LAYER = HEADS * (HEAD_DIM**2 + HEAD_DIM)  # Z (H×d×d) + k (H×d)
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert", "vit", "t5")
CAUSAL_LMS = ("llama", "gpt2")

pytestmark = pytest.mark.usefixtures("one_thread")

# Names (relative to the base model) of the modules the default config must wrap.
_SELF_ATTN = {
    "llama": "model.layers.{}.self_attn",
    "mistral": "model.layers.{}.self_attn",
    "qwen2": "model.layers.{}.self_attn",
    "gpt2": "transformer.h.{}.attn",
    "bert": "bert.encoder.layer.{}.attention.self",
    "vit": "vit.layers.{}.attention",
}
EXPECTED_WRAPPED = {family: [pattern.format(i) for i in range(LAYERS)] for family, pattern in _SELF_ATTN.items()}
EXPECTED_WRAPPED["t5"] = [
    f"{stack}.block.{i}.layer.0.SelfAttention" for stack in ("encoder", "decoder") for i in range(2)
]


# ---------------------------------------------------------------------------------------------------------- helpers


def tiny_inputs(family: str, batch: int = 2, length: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    inputs = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}
    if family in ("bert", "t5") and batch > 1:  # encoders get a right-padded last row
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][-1, length // 2 :] = 0
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return inputs


def adapt(family: str, seed: int = 0, model_overrides: dict | None = None, **config_kwargs):
    """(base outputs computed before wrapping, peft model, inputs) for a random, visible adapter by default."""
    base = tiny_model(family, seed=seed, **(model_overrides or {}))
    inputs = tiny_inputs(family)
    reference = logits(base, inputs)
    config_kwargs.setdefault("init_weights", False)
    return reference, get_peft_model(base, ntk_config(family, **config_kwargs)).eval(), inputs


@torch.no_grad()
def logits(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    return model(**inputs, **kwargs).logits


def ntk_layers(model: nn.Module) -> dict[str, NTKAttentionLayer]:
    """NTK layers by name relative to the base model (``base_model.model.`` stripped)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, NTKAttentionLayer)
    }


def left_padded(lengths=(6, 3), seed: int = 2):
    """(sequences, input_ids, attention_mask) of a left-padded batch (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return seqs, ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (as generate() computes them)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def changed(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """True when ``out`` differs visibly from ``reference`` (by over 1% of its scale), not by rounding."""
    return max_diff(out, reference) > 1e-2 * reference.abs().max().item()


# ------------------------------------------------------------------------------------------- 1. every model family


@pytest.mark.parametrize("family", FAMILIES)
def test_random_adapter_changes_outputs(family):
    reference, model, inputs = adapt(family)
    out = logits(model, inputs)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert changed(out, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_adapter_is_identity(family):
    reference, model, inputs = adapt(family, init_weights=True)
    # The adapter is active (it routes through NTK-Attention) but Z = 0, k = 0 adds nothing.
    assert all(torch.count_nonzero(layer.ntk_z["default"]) == 0 for layer in ntk_layers(model).values())
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_is_bitwise_base(family):
    reference, model, inputs = adapt(family)
    with model.disable_adapter():
        disabled = logits(model, inputs)
    assert torch.equal(disabled, reference)
    assert not torch.equal(logits(model, inputs), reference)  # and enabled again afterwards


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameter_count(family):
    _, model, _ = adapt(family)
    n_layers = len(EXPECTED_WRAPPED[family])
    expected = n_layers * PARAMS_PER_LAYER
    if family == "bert":  # SEQ_CLS: PEFT adds the classifier (HIDDEN -> NUM_LABELS, with bias) to modules_to_save
        expected += HIDDEN * NUM_LABELS + NUM_LABELS
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    for layer in ntk_layers(model).values():
        assert layer.ntk_z["default"].shape == (HEADS, HEAD_DIM, HEAD_DIM)
        assert layer.ntk_k["default"].shape == (HEADS, HEAD_DIM)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_modules(family):
    _, model, _ = adapt(family)
    assert sorted(ntk_layers(model)) == sorted(EXPECTED_WRAPPED[family])
    base = model.get_base_model()
    assert base.config._attn_implementation == "ntk_sdpa"
    if family == "t5":
        cross = [name for name, _ in base.named_modules() if name.endswith("EncDecAttention")]
        assert len(cross) == LAYERS
        # They are attention modules (the tuner could wrap them) but are left alone by default.
        assert set(cross) <= set(peft_ntk.find_attention_modules(base, include_cross_attention=True))
        assert not any(isinstance(base.get_submodule(name), NTKAttentionLayer) for name in cross)
        assert not any("EncDecAttention" in name for name in ntk_layers(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_adapted_layer(family):
    _, model, inputs = adapt(family)
    model(**inputs).logits.pow(2).mean().backward()
    layers = ntk_layers(model)
    assert len(layers) == len(EXPECTED_WRAPPED[family])
    for name, layer in layers.items():
        for param in (layer.ntk_z["default"], layer.ntk_k["default"]):
            assert param.grad is not None, name
            assert param.grad.abs().sum() > 0, name
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(name).grad is None for name in frozen)


def test_layers_to_transform_adapts_only_those_layers():
    reference, model, inputs = adapt("llama", layers_to_transform=[1])
    assert list(ntk_layers(model)) == ["model.layers.1.self_attn"]
    assert model.get_nb_trainable_parameters()[0] == PARAMS_PER_LAYER
    assert changed(logits(model, inputs), reference)


def test_eager_implementation_routes_through_ntk_eager():
    reference, model, inputs = adapt("llama", model_overrides={"attn_implementation": "eager"})
    assert model.get_base_model().config._attn_implementation == "ntk_eager"
    assert changed(logits(model, inputs), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), reference)
    reference, model, inputs = adapt("llama", model_overrides={"attn_implementation": "eager"}, init_weights=True)
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 2. the hook against the reference op


@pytest.mark.parametrize("backend, path", [("reference", "reference"), ("fused", "fused+torch-combine")])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
def test_hook_matches_reference_op(monkeypatch, padded, backend, path):
    _, model, _ = adapt("llama", attention_backend=backend)
    if padded:
        _, ids, mask = left_padded()
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    else:
        ids = tiny_inputs("llama", length=7)["input_ids"]
        mask = torch.ones_like(ids)
        inputs = {"input_ids": ids}

    calls = []
    real_run = peft_ntk.ops.dispatch.AttentionPlan.run

    def spy(plan):
        assert plan.path == path
        calls.append((plan.query.detach().clone(), plan.key.detach().clone(), plan.value.detach().clone()))
        return real_run(plan)

    monkeypatch.setattr(peft_ntk.ops.dispatch.AttentionPlan, "run", spy)
    layer = ntk_layers(model)["model.layers.1.self_attn"]
    captured = []
    hook = layer.base_layer.o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        logits(model, inputs)
    finally:
        hook.remove()

    assert len(calls) == LAYERS  # one NTK call per adapted layer, in layer order
    query, key, value = calls[1]
    batch, length = ids.shape
    assert query.shape == (batch, HEADS, length, HEAD_DIM)
    assert key.shape == value.shape == (batch, 2, length, HEAD_DIM)  # GQA: key/value heads are not repeated

    z = layer.ntk_z["default"].detach()
    k = layer.ntk_k["default"].detach().abs()
    allowed = torch.ones(length, length).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    expected = peft_ntk.ntk_attention_reference(query, key, value, z, k, attention_mask=allowed, scaling=HEAD_DIM**-0.5)
    literal = peft_ntk.naive_ntk_attention(query, key, value, z, k, attention_mask=allowed)
    to_o_proj = expected.transpose(1, 2).reshape(batch, length, HEADS * HEAD_DIM)
    literal = literal.transpose(1, 2).reshape(batch, length, HEADS * HEAD_DIM)
    real = mask.bool()
    torch.testing.assert_close(captured[0][real], to_o_proj[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(captured[0][real], literal[real], atol=1e-5, rtol=1e-4)
    # And the prefix really contributes: plain attention on the same tensors is different.
    plain = peft_ntk.ntk_attention_reference(query, key, value, None, None, attention_mask=allowed)
    assert changed(captured[0][real], plain.transpose(1, 2).reshape(batch, length, -1)[real])


# ---------------------------------------------------------------------------------------------------- 3. padding


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_left_padding_matches_unpadded(family):
    _, model, _ = adapt(family)
    seqs, ids, mask = left_padded()
    batched = logits(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)})
    assert torch.isfinite(batched).all()
    width = ids.shape[1]
    for row, seq in enumerate(seqs):
        alone = logits(model, {"input_ids": seq[None]})
        torch.testing.assert_close(batched[row, width - len(seq) :], alone[0], atol=1e-5, rtol=1e-4)


def test_bert_right_padding_matches_unpadded():
    _, model, _ = adapt("bert")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for row, seq in enumerate(seqs):
            alone = model(input_ids=seq[None], output_hidden_states=True)
            torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                batched.hidden_states[-1][row, : len(seq)], alone.hidden_states[-1][0], atol=1e-5, rtol=1e-4
            )


# --------------------------------------------------------------------------------------------------- 4. KV cache


def _generate(model, ids, mask=None, use_cache=True):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_generate_with_cache_equals_without(family):
    _, model, _ = adapt(family)
    ids = tiny_inputs(family, batch=1, length=5)["input_ids"]
    cached = _generate(model, ids, use_cache=True)
    assert cached.shape == (1, 5 + 8)
    assert torch.equal(cached, _generate(model, ids, use_cache=False))
    with model.disable_adapter():  # the adapter is active: the base model would continue differently
        base_logits = logits(model, {"input_ids": cached})
    assert changed(logits(model, {"input_ids": cached}), base_logits)


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_generate_left_padded_batch(family):
    _, model, _ = adapt(family)
    seqs, ids, mask = left_padded()
    cached = _generate(model, ids, mask, use_cache=True)
    assert torch.equal(cached, _generate(model, ids, mask, use_cache=False))
    # Each row continues exactly as the sequence does on its own.
    for row, seq in enumerate(seqs):
        alone = _generate(model, seq[None])
        assert torch.equal(cached[row, -8:], alone[0, -8:])


# --------------------------------------------------------------------------------------------------- 5. dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_half_precision(family, dtype):
    _, model, inputs = adapt(family)
    full = logits(model, inputs)
    model.to(dtype)
    half = logits(model, inputs)
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    assert max_diff(half, full) / full.abs().max().item() < 5e-2
    # Still the adapted model, not the base one.
    with model.disable_adapter():
        base = logits(model, inputs)
    assert changed(half, base)


# ---------------------------------------------------------------------------------------- 6. output_attentions


@pytest.mark.parametrize("init_weights", [False, True], ids=["random", "zeros"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_output_attentions(family, init_weights):
    _, model, inputs = adapt(family, init_weights=init_weights)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    batch, length = inputs["input_ids"].shape
    assert len(attentions) == LAYERS
    for weights in attentions:
        assert weights.shape == (batch, HEADS, length, length)
        assert torch.isfinite(weights).all()
        assert (weights >= 0).all()
        sums = weights.sum(-1)
        if init_weights:  # Z = 0, k = 0: all mass on the real keys
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        else:  # part of the mass is on the virtual prefix
            assert (sums <= 1 + 1e-6).all()
            assert (sums < 1 - 1e-4).all()
        if family != "bert":
            future = torch.ones(length, length, dtype=torch.bool).triu(1)
            assert (weights[..., future] == 0).all()
        else:  # BERT's last row is right-padded: no query attends to the padding
            padding = inputs["attention_mask"][-1] == 0
            assert padding.any() and (weights[-1][..., padding] == 0).all()


# ------------------------------------------------------------------------------------------------- 7. dropout


@pytest.mark.parametrize(
    ("attention_dropout", "feature_dropout", "stochastic"),
    [(0.5, 0.0, True), (0.0, 0.5, True), (0.0, 0.0, False)],
    ids=["attention_dropout", "feature_dropout", "no_dropout"],
)
def test_dropout_only_in_train_mode(attention_dropout, feature_dropout, stochastic):
    _, model, inputs = adapt(
        "llama", model_overrides={"attention_dropout": attention_dropout}, feature_dropout=feature_dropout
    )
    model.train()
    first, second = logits(model, inputs), logits(model, inputs)
    assert torch.isfinite(first).all()
    assert (not torch.equal(first, second)) == stochastic
    model.eval()
    assert torch.equal(logits(model, inputs), logits(model, inputs))


# -------------------------------------------------------------------------------------------- 8. PEFT features


def test_several_adapters():
    _, model, inputs = adapt("llama")
    first = logits(model, inputs)
    model.add_adapter("second", ntk_config(init_weights=False, target_modules=["self_attn"]))
    assert model.active_adapters == ["default"]
    assert torch.equal(logits(model, inputs), first)  # adding does not activate

    model.set_adapter("second")
    second = logits(model, inputs)
    assert changed(second, first)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * LAYERS and all(name.endswith(".second") for name in trainable)
    assert model.get_nb_trainable_parameters()[0] == LAYERS * PARAMS_PER_LAYER

    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), first)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.ntk_z) == ["default"] == list(layer.ntk_k) for layer in ntk_layers(model).values())
    assert torch.equal(logits(model, inputs), first)


def test_add_adapter_with_default_targets():
    _, model, inputs = adapt("llama")
    model.add_adapter("second", ntk_config(init_weights=False))
    assert sorted(ntk_layers(model)) == EXPECTED_WRAPPED["llama"]
    assert all("second" in layer.ntk_z for layer in ntk_layers(model).values())


def test_merge_is_refused():
    _, model, _ = adapt("llama")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


@pytest.mark.parametrize(("family", "implementation"), [("llama", "sdpa"), ("llama", "eager"), ("t5", "sdpa")])
def test_unload_restores_base(family, implementation):
    reference, model, inputs = adapt(family, model_overrides={"attn_implementation": implementation})
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    assert {config._attn_implementation for config in configs} == {f"ntk_{implementation}"}
    unloaded = model.unload()
    assert not any(isinstance(m, NTKAttentionLayer) for m in unloaded.modules())
    assert {config._attn_implementation for config in configs} == {implementation}
    assert torch.equal(logits(unloaded, inputs), reference)


_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    res = {}
    try:  # without `import peft_ntk`
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/llama_base"), f"{root}/llama_adapter")
        res["no_import_error"] = None
    except Exception as e:
        res["no_import_error"] = f"{type(e).__name__}: {e}"
    res["peft_ntk_was_imported"] = "peft_ntk" in sys.modules

    import peft_ntk
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    inputs = torch.load(f"{root}/inputs.pt")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(f"{root}/llama_base")
        model = PeftModel.from_pretrained(base, f"{root}/llama_adapter").eval()
        res["impl"] = base.config._attn_implementation
        res["n_layers"] = sum(isinstance(m, peft_ntk.NTKAttentionLayer) for m in model.modules())
        res["peft_model"] = model(input_ids=inputs["llama"]).logits
        model = AutoPeftModelForCausalLM.from_pretrained(f"{root}/llama_adapter").eval()
        res["auto_causal_lm"] = model(input_ids=inputs["llama"]).logits
        model = AutoPeftModelForSequenceClassification.from_pretrained(f"{root}/bert_adapter").eval()
        res["auto_seq_cls"] = model(input_ids=inputs["bert"]).logits
    torch.save(res, f"{root}/results.pt")
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saves a Llama and a BERT base + adapter, loads them in one fresh process; returns what both sides saw."""
    root = tmp_path_factory.mktemp("saved")
    expected, inputs = {}, {}
    for family in ("llama", "bert"):
        base = tiny_model(family)
        base.save_pretrained(root / f"{family}_base")
        model = get_peft_model(base, ntk_config(family, init_weights=False)).eval()
        if family == "bert":  # make the saved classifier differ from the base one, so it must be loaded
            with torch.no_grad():
                model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        model.peft_config["default"].base_model_name_or_path = str(root / f"{family}_base")
        model.save_pretrained(root / f"{family}_adapter")
        inputs[family] = tiny_inputs(family)["input_ids"]
        expected[family] = logits(model, {"input_ids": inputs[family]})
    torch.save(inputs, root / "inputs.pt")
    # The child imports the same peft_ntk as this process, whatever its working directory.
    package_root = str(Path(peft_ntk.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, expected, torch.load(root / "results.pt")


def test_save_writes_adapter_files(saved):
    root, _, _ = saved
    adapter = root / "llama_adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"].startswith("NTK_ATTENTION")
    assert config["base_model_name_or_path"] == str(root / "llama_base")
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * LAYERS
    assert sum(t.numel() for t in weights.values()) == LAYERS * PARAMS_PER_LAYER
    assert all(("ntk_z" in name) != ("ntk_k" in name) for name in weights)
    bert = load_file(root / "bert_adapter" / "adapter_model.safetensors")
    assert any("classifier" in name for name in bert)


def test_load_in_fresh_process_is_exact(saved):
    _, expected, results = saved
    assert results["impl"] == "ntk_sdpa"
    assert results["n_layers"] == LAYERS
    assert torch.equal(results["peft_model"], expected["llama"])
    assert torch.equal(results["auto_causal_lm"], expected["llama"])
    assert torch.equal(results["auto_seq_cls"], expected["bert"])


def test_load_without_import_names_the_type_and_the_card_the_fix(saved):
    root, _, results = saved
    assert results["peft_ntk_was_imported"] is False
    assert results["no_import_error"] == "KeyError: 'NTK_ATTENTION'"  # PEFT's own error, with the stored peft_type
    assert "import peft_ntk" in (root / "llama_adapter" / "README.md").read_text()


# --------------------------------------------------------------------------------------------------- 9. errors


class _HardCodedAttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.out(self.attn(x, x, x)[0])


@pytest.mark.parametrize(
    ("build", "architecture"),
    [
        (_HardCodedAttentionModel, "_HardCodedAttentionModel"),
        (lambda: tiny_model("bloom"), "Bloom"),
    ],
    ids=["custom", "bloom"],
)
def test_model_without_attention_interface_is_refused(build, architecture):
    with pytest.raises(ValueError, match=f"cannot adapt {architecture}.*AttentionInterface"):
        get_peft_model(build(), NTKAttentionConfig(init_weights=False))


def test_non_attention_target_is_refused():
    with pytest.raises(ValueError, match="is not an attention module") as info:
        get_peft_model(tiny_model("llama"), ntk_config(target_modules=["q_proj"]))
    assert "self_attn" in str(info.value)  # it names what would work


@pytest.mark.parametrize(
    "overrides",
    [dict(num_attention_heads=2, num_key_value_heads=2), dict(hidden_size=64)],
    ids=["fewer_heads", "bigger_heads"],
)
def test_adapter_for_other_head_shape_is_refused(tmp_path, overrides):
    save_llama_adapter(tmp_path)
    other = tiny_model("llama", **overrides)
    with pytest.raises(ValueError, match="does not fit this model.*heads"):
        PeftModel.from_pretrained(other, tmp_path)


def test_adapter_for_other_head_shape_gives_clear_error(tmp_path):
    save_llama_adapter(tmp_path)
    with pytest.raises(ValueError, match="heads"):
        PeftModel.from_pretrained(tiny_model("llama", num_attention_heads=2, num_key_value_heads=2), tmp_path)
