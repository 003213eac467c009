"""RankGenScorer: official-layout loading without remote code, encodings against an independent T5 computation,
scoring, truncation, save/load round trip, tokenizer resolution and error paths. CPU only, offline, tiny models."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter

import pytest
import torch
from helpers import TINY_T5, pydoc_words, tiny_model, train_word_tokenizer, write_official_rankgen_checkpoint
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

import rankgen_logits
from rankgen_logits import scorer as scorer_module
from rankgen_logits.protocol import ContinuationScorer, has_vector_api
from rankgen_logits.scorer import RankGenConfig, RankGenScorer


@pytest.fixture(scope="module")
def words() -> list[str]:
    """The 150 most frequent words of the vocabulary (all known to the tokenizer)."""
    return [w for w, _ in Counter(pydoc_words()).most_common(150)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_word_tokenizer()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rankgen-official")
    state_dict = write_official_rankgen_checkpoint(directory)
    return str(directory), state_dict


@pytest.fixture(scope="module")
def scorer(official, tokenizer) -> RankGenScorer:
    return RankGenScorer.from_pretrained(official[0], tokenizer=tokenizer)


def _reference_embeddings(state_dict, tokenizer, texts, prompt, max_tokens) -> torch.Tensor:
    """Independent RankGen encoding: a plain T5EncoderModel, first-token pooling, times projection.weight.T."""
    encoder = T5EncoderModel(T5Config(**TINY_T5)).eval()
    encoder_weights = {k.removeprefix("t5_encoder."): v for k, v in state_dict.items() if k.startswith("t5_encoder.")}
    result = encoder.load_state_dict(encoder_weights, strict=False)
    assert set(result.missing_keys) <= {"encoder.embed_tokens.weight"} and not result.unexpected_keys
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight
    ids = [tokenizer(prompt + text)["input_ids"][:max_tokens] for text in texts]
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[:, 0] @ state_dict["projection.weight"].T


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- official layout


def test_official_checkpoint_loads_without_remote_code(official, scorer):
    directory, state_dict = official
    assert isinstance(scorer, RankGenScorer) and isinstance(scorer.config, RankGenConfig)
    assert not scorer.training
    assert scorer.config.model_type == "rankgen" and scorer.config.architectures == ["RankGenScorer"]
    assert scorer.config.d_model == 32 and scorer.config.projection_dim == 32 and scorer.max_suffix_tokens == 128
    assert scorer.config.max_prefix_tokens == 512
    assert (scorer.config.prefix_prompt, scorer.config.suffix_prompt) == ("pre ", "suffi ")
    loaded = scorer.state_dict()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key
    # The missing embed_tokens weight is tied to the shared embedding.
    assert scorer.t5_encoder.encoder.embed_tokens.weight is scorer.t5_encoder.shared.weight
    assert torch.equal(scorer.t5_encoder.encoder.embed_tokens.weight, state_dict["t5_encoder.shared.weight"])
    assert isinstance(scorer, ContinuationScorer) and has_vector_api(scorer)
    assert rankgen_logits.RankGenScorer is RankGenScorer and rankgen_logits.RankGenConfig is RankGenConfig


def test_encodings_match_independent_t5_computation(official, scorer, tokenizer, words):
    _, state_dict = official
    texts = [
        "the function returns a value",
        " ".join(words[:40]),
        "if",
        " ".join(words[i % len(words)] for i in range(700)),  # longer than both limits
        " ".join(reversed(words[:90])),
    ]
    prefixes = scorer.encode_prefix(texts, batch_size=2)
    suffixes = scorer.encode_suffix(texts)
    assert prefixes.shape == suffixes.shape == (len(texts), 32)
    assert prefixes.dtype == suffixes.dtype == torch.float32
    _assert_close(prefixes, _reference_embeddings(state_dict, tokenizer, texts, "pre ", 512))
    _assert_close(suffixes, _reference_embeddings(state_dict, tokenizer, texts, "suffi ", 128))
    # The prompts matter: prefix and suffix vectors of one text differ.
    assert not torch.allclose(prefixes, suffixes)
    # A string is a list of one; batch size does not change the results.
    _assert_close(scorer.encode_prefix(texts[0]), prefixes[:1])
    _assert_close(scorer.encode_suffix(texts, batch_size=1), suffixes)
    assert scorer.encode_suffix([]).shape == (0, 32)


def test_score_is_rowwise_dot_product(scorer, words):
    prefixes = ["the class of the object", "the class of the object", " ".join(words[10:60])]
    continuations = ["is a type", " ".join(words[:30]), "returns none"]
    scores = scorer.score(prefixes, continuations)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    expected = (scorer.encode_prefix(prefixes) * scorer.encode_suffix(continuations)).sum(-1)
    _assert_close(scores, expected)
    _assert_close(scorer.score(prefixes[0], continuations[0]), expected[:1])


def test_continuations_are_cut_to_max_suffix_tokens(scorer, tokenizer, words):
    long = " ".join(words[i % len(words)] for i in range(300))
    n_prompt = len(tokenizer("suffi ", add_special_tokens=False)["input_ids"])
    # Its first 128 scorer tokens: the prompt and the first 128 - n_prompt words (the short text's own "</s>" falls
    # beyond the limit, as the official code cuts the tokenised text).
    first_128 = " ".join(long.split()[: 128 - n_prompt])
    shorter = " ".join(long.split()[: 100 - n_prompt])
    prefix = "the statement"
    scores = scorer.score([prefix] * 3, [long, first_128, shorter])
    assert scores[0] == scores[1]
    assert scores[0] != scores[2]
    assert torch.equal(scorer.encode_suffix(long), scorer.encode_suffix(first_128))
    # The continuation budget that is read whole, "</s>" included: here "suffi" and "</s>" take 2 of the 128.
    assert scorer.max_continuation_tokens == 126
    whole = " ".join(long.split()[: scorer.max_continuation_tokens])
    assert len(tokenizer("suffi " + whole)["input_ids"]) == scorer.max_suffix_tokens


def test_config_overrides_and_dtype_on_load(official, tokenizer):
    loaded = RankGenScorer.from_pretrained(
        official[0], tokenizer=tokenizer, max_suffix_tokens=16, dtype=torch.bfloat16, trust_remote_code=True
    )
    assert loaded.max_suffix_tokens == 16 and loaded.config.max_suffix_tokens == 16
    assert loaded.projection.weight.dtype == torch.bfloat16
    assert loaded.encode_suffix("the value").dtype == torch.bfloat16


def test_bf16_encoding(official, tokenizer, scorer):
    texts = ["the module", "a list of items in the sequence"]
    bf16 = RankGenScorer.from_pretrained(official[0], tokenizer=tokenizer).to(torch.bfloat16)
    prefixes, suffixes = bf16.encode_prefix(texts), bf16.encode_suffix(texts)
    assert prefixes.dtype == suffixes.dtype == torch.bfloat16
    assert torch.isfinite(prefixes).all() and torch.isfinite(suffixes).all()
    scores = bf16.score(texts, texts)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    similarity = torch.nn.functional.cosine_similarity(prefixes.float(), scorer.encode_prefix(texts), dim=-1)
    assert (similarity > 0.98).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(official, tokenizer, scorer, dtype):
    texts = ["the module", "a list of items in the sequence"]
    gpu = RankGenScorer.from_pretrained(official[0], tokenizer=tokenizer, dtype=dtype).to("cuda")
    prefixes, suffixes = gpu.encode_prefix(texts), gpu.encode_suffix(texts)
    assert prefixes.device.type == suffixes.device.type == "cuda"
    assert prefixes.dtype == suffixes.dtype == dtype
    assert torch.isfinite(prefixes).all() and torch.isfinite(suffixes).all()
    scores = gpu.score(texts, texts)
    assert scores.dtype == torch.float32 and scores.device.type == "cuda" and torch.isfinite(scores).all()
    similarity = torch.nn.functional.cosine_similarity(prefixes.float().cpu(), scorer.encode_prefix(texts), dim=-1)
    assert (similarity > 0.98).all()


# ---------------------------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(scorer, tmp_path, words):
    scorer.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert "tokenizer.json" in files or "tokenizer_config.json" in files
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == "rankgen" and saved["architectures"] == ["RankGenScorer"]
    assert "auto_map" not in saved and saved["max_suffix_tokens"] == 128

    reloaded = RankGenScorer.from_pretrained(tmp_path)
    assert reloaded.tokenizer is not None
    texts = ["the method of the class", " ".join(words[:200])]
    assert [reloaded.tokenizer(t)["input_ids"] for t in texts] == [scorer.tokenizer(t)["input_ids"] for t in texts]
    original, loaded = scorer.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    # Same weights and inputs; only memory alignment of the loaded tensors may move the last bit.
    _assert_close(reloaded.encode_prefix(texts), scorer.encode_prefix(texts))
    _assert_close(reloaded.score(texts, texts[::-1]), scorer.score(texts, texts[::-1]))

    # Registered with the auto classes.
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RankGenConfig)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, RankGenScorer) and auto.tokenizer is not None


def test_saved_without_tokenizer_warns_and_encode_needs_one(official, tokenizer, tmp_path):
    bare = RankGenScorer.from_pretrained(official[0], tokenizer=tokenizer)
    bare.tokenizer = None
    bare.save_pretrained(tmp_path)
    assert not any(name.startswith("tokenizer") for name in os.listdir(tmp_path))
    reloaded = RankGenScorer.from_pretrained(tmp_path)
    assert reloaded.tokenizer is None
    with pytest.raises(ValueError, match=r"tokenizer="):
        reloaded.encode_prefix("the value")
    reloaded = RankGenScorer.from_pretrained(tmp_path, tokenizer=tokenizer)
    assert reloaded.encode_prefix("the value").shape == (1, 32)


def test_explicit_tokenizer_path_and_saved_tokenizer_in_official_dir(official, tokenizer, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    by_path = RankGenScorer.from_pretrained(official[0], tokenizer=str(tokenizer_dir))
    assert by_path.tokenizer("pre the")["input_ids"] == tokenizer("pre the")["input_ids"]

    checkpoint = tmp_path / "official-with-tokenizer"
    write_official_rankgen_checkpoint(checkpoint, with_embed_tokens=True)
    tokenizer.save_pretrained(checkpoint)
    loaded = RankGenScorer.from_pretrained(checkpoint)
    assert loaded.tokenizer is not None and loaded.encode_suffix("the").shape == (1, 32)


def test_official_layout_as_safetensors_or_shards(official, tokenizer, scorer, tmp_path):
    from safetensors.torch import save_file

    _, state_dict = official
    with open(os.path.join(official[0], "config.json")) as f:
        config_text = f.read()
    texts = ["the value of the attribute"]
    expected = scorer.encode_prefix(texts)

    single = tmp_path / "safetensors"
    single.mkdir()
    (single / "config.json").write_text(config_text)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, single / "model.safetensors")
    _assert_close(RankGenScorer.from_pretrained(single, tokenizer=tokenizer).encode_prefix(texts), expected)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config_text)
    keys = sorted(state_dict)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{n + 1}-of-00002.bin"
        torch.save({k: state_dict[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_close(RankGenScorer.from_pretrained(sharded, tokenizer=tokenizer).encode_prefix(texts), expected)


def test_hub_repo_id_goes_through_hf_hub_download(official, tokenizer, scorer, monkeypatch):
    """No network: hf_hub_download is replaced by a stand-in serving the local official checkpoint."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def fake_hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, kwargs))
        path = os.path.join(official[0], filename)
        if not os.path.isfile(path):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    loaded = RankGenScorer.from_pretrained(
        "someone/rankgen-tiny", tokenizer=tokenizer, revision="abc123", token="hf_x", cache_dir="/nonexistent-cache"
    )
    assert {filename for _, filename, _ in calls} >= {"config.json", "pytorch_model.bin"}
    assert all(repo == "someone/rankgen-tiny" for repo, _, _ in calls)
    assert all(
        kw.get("revision") == "abc123" and kw.get("token") == "hf_x" and kw.get("cache_dir") == "/nonexistent-cache"
        for _, _, kw in calls
    )
    assert loaded.config.name_or_path == "someone/rankgen-tiny"
    _assert_close(loaded.encode_suffix("the value"), scorer.encode_suffix("the value"))


# ---------------------------------------------------------------------------------------------- errors


def test_missing_tokenizer_raises_clear_error():
    model = RankGenScorer(RankGenConfig(**{**TINY_T5, "tie_word_embeddings": True}))
    assert model.tokenizer is None and model.max_suffix_tokens == 128
    with pytest.raises(ValueError, match=r"no tokenizer.*tokenizer="):
        model.encode_suffix(["the value"])
    with pytest.raises(ValueError, match=r"no tokenizer"):
        model.score(["a"], ["b"])


def test_offline_official_checkpoint_without_tokenizer_names_the_t5_tokenizer(official, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # An empty cache, so that a google/t5-v1_1-* tokenizer cached on this machine cannot make the load succeed.
    empty_cache = str(tmp_path / "empty-cache")
    monkeypatch.setitem(scorer_module.T5_V1_1_TOKENIZERS, TINY_T5["d_model"], "google/t5-v1_1-base")
    with pytest.raises(OSError, match=r"(?s)google/t5-v1_1-base.*HF_HUB_OFFLINE.*tokenizer='google/t5-v1_1-base'"):
        RankGenScorer.from_pretrained(official[0], cache_dir=empty_cache)


def test_official_checkpoint_of_unknown_size_without_tokenizer(official):
    with pytest.raises(ValueError, match=r"d_model \(32\).*google/t5-v1_1-base.*google/t5-v1_1-xl.*tokenizer="):
        RankGenScorer.from_pretrained(official[0])


def test_mismatched_lengths(scorer):
    with pytest.raises(ValueError, match=r"2 prefixes and 1 continuations"):
        scorer.score(["a", "b"], ["c"])


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_weights_only_guard(official, tokenizer, tmp_path):
    directory = tmp_path / "malicious"
    directory.mkdir()
    marker = tmp_path / "code-was-executed"
    with open(os.path.join(official[0], "config.json")) as f:
        (directory / "config.json").write_text(f.read())
    state_dict = {"projection.weight": torch.zeros(32, 32), "t5_encoder.shared.weight": _Payload(str(marker))}
    torch.save(state_dict, directory / "pytorch_model.bin")
    with pytest.raises((pickle.UnpicklingError, RuntimeError, ValueError)):
        RankGenScorer.from_pretrained(directory, tokenizer=tokenizer)
    assert not marker.exists()


def test_not_a_rankgen_checkpoint(tmp_path, tokenizer):
    directory = tmp_path / "plain-t5"
    T5EncoderModel(T5Config(**TINY_T5)).save_pretrained(directory)
    with pytest.raises(ValueError, match=r"not a RankGen checkpoint"):
        RankGenScorer.from_pretrained(directory, tokenizer=tokenizer)
    with pytest.raises(OSError, match=r"neither a local folder nor a Hub repository id"):
        RankGenScorer.from_pretrained(tmp_path / "does-not-exist", tokenizer=tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"Cannot find config.json"):
        RankGenScorer.from_pretrained(tmp_path / "empty", tokenizer=tokenizer)


def test_registration_is_idempotent():
    scorer_module._register()
    scorer_module._register()
    assert AutoConfig.for_model("rankgen").__class__ is RankGenConfig


def test_rankgen_scorer_ranks_generation_end_to_end(scorer, tokenizer, words):
    """The real scorer (official layout) ranks a tiny LM's samples through `generate(rankgen=...)`."""
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id
    )
    generator = tiny_model("llama", vocab_size=len(tokenizer), **ids)
    prompts = [" ".join(words[:6]), " ".join(words[10:13])]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = rankgen_logits.RankGenSettings(scorer, tokenizer=tokenizer, num_beams=2, num_samples=3, rerank_every=4)
    rankgen_logits.enable_rankgen_generate()
    try:
        torch.manual_seed(1)
        out = generator.generate(**batch, rankgen=settings, max_new_tokens=10, top_k=20, return_dict_in_generate=True)
    finally:
        rankgen_logits.disable_rankgen_generate()
    width = batch["input_ids"].shape[1]
    continuations = tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
    expected = scorer.score(prompts, continuations)
    torch.testing.assert_close(out.sequences_scores.float(), expected.float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- settings as a dict


def test_settings_round_trip_through_json_with_the_scorer_by_path(official, tokenizer, tmp_path, words):
    from rankgen_logits import RankGenSettings

    tokenizer_dir = tmp_path / "t5-tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    scorer = RankGenScorer.from_pretrained(official[0], tokenizer=str(tokenizer_dir))
    settings = RankGenSettings(scorer, mode="rerank", num_samples=6, scorer_batch_size=16)
    stored = json.loads(json.dumps(settings.to_dict()))
    assert stored == {
        "scorer": official[0],
        "scorer_tokenizer": str(tokenizer_dir),
        "mode": "rerank",
        "num_beams": 2,
        "num_samples": 6,
        "rerank_every": 20,
        "scorer_batch_size": 16,
    }
    again = RankGenSettings.from_dict(stored)
    assert again.to_dict() == stored and isinstance(again.scorer, RankGenScorer)
    prefixes, continuations = [" ".join(words[:12])] * 2, [" ".join(words[12:20]), " ".join(words[30:40])]
    torch.testing.assert_close(again.scorer.score(prefixes, continuations), scorer.score(prefixes, continuations))


def test_settings_dict_errors_name_the_fix(scorer):
    from rankgen_logits import RankGenSettings

    class InMemory:
        def score(self, prefixes, continuations):
            return torch.zeros(len(continuations))

    with pytest.raises(ValueError, match="save_pretrained"):
        RankGenSettings(InMemory()).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['num_beam'\]"):
        RankGenSettings.from_dict({"scorer": "x", "num_beam": 2})
    with pytest.raises(ValueError, match="num_samples"):
        RankGenSettings.from_dict({"num_samples": 0}, scorer=scorer)
