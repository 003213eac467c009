"""Bad inputs give clear, user-facing errors: each case names the problem AND the fix, raises before anything is
half-done, and never surfaces as a NaN or a deep torch stack trace.

``test_clear_error`` runs the table ``CASES`` (one parametrised case per bad input, for ``peft_ntk``, ``rankgen_logits``
and the ``ntk_attention`` op); the tests after it cover inputs that must work (a scorer with another vocabulary than
the generator, text with U+FFFD), warnings, the memory prediction, and that refused calls leave the model untouched.
Everything is tiny, offline and on CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import WordCount, generator_tokenizer, ntk_config, rankgen, save_llama_adapter, tiny_llama_for, tiny_model
from helpers import train_word_tokenizer as _train_tokenizer
from helpers import write_official_rankgen_checkpoint as _write_official_checkpoint
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.testing_utils import CaptureLogger

import rankgen_logits.generation as generation
from peft_ntk import NTKAttentionConfig, NTKAttentionLayer, ntk_attention
from rankgen_logits import RankGenScorer

WORDS = "the cat sat on a mat dog ran in park with ball bird sang song tree red blue green house road sun".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style): decoding a split multi-byte character gives U+FFFD."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<eos>"]
    )
    raw.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", padding_side="left")


class Env:
    """What the cases need, built on first use and shared by the module."""

    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def tok(self) -> PreTrainedTokenizerFast:
        return generator_tokenizer(WORDS)

    @cached_property
    def model(self) -> LlamaForCausalLM:
        return tiny_llama_for(self.tok)

    @cached_property
    def official(self) -> str:
        directory = self.root / "rankgen-official"
        _write_official_checkpoint(directory)
        return str(directory)

    @cached_property
    def scorer_tokenizer(self) -> PreTrainedTokenizerFast:
        return _train_tokenizer()

    @cached_property
    def scorer(self) -> RankGenScorer:
        return RankGenScorer.from_pretrained(self.official, tokenizer=self.scorer_tokenizer)

    @cached_property
    def adapter(self) -> Path:
        """A saved Llama NTK adapter (adapter_config.json + adapter_model.safetensors); copy it before breaking it."""
        directory = self.root / "adapter"
        save_llama_adapter(directory)
        return directory

    def broken_adapter(self, name: str, remove: str | None = None, truncate: str | None = None) -> Path:
        directory = self.root / name
        if not directory.exists():
            shutil.copytree(self.adapter, directory)
            if remove:
                (directory / remove).unlink()
            if truncate:
                data = (directory / truncate).read_bytes()
                (directory / truncate).write_bytes(data[: len(data) // 2])
        return directory

    def two_adapter_model(self) -> PeftModel:
        """'default' (elu) and 'relu' adapters on one Llama; 'default' active."""
        model = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False)).eval()
        model.add_adapter("relu", ntk_config(feature_map="relu", init_weights=False))
        return model

    def generate(self, inputs: dict, scorer=None, tok=None, model=None, **kwargs):
        kwargs = {"num_samples": 2, "max_new_tokens": 4, **kwargs}
        return rankgen(model or self.model, tok or self.tok, scorer or WordCount(), inputs, **kwargs)

    def batch(self, prompts: list[str]) -> dict:
        return self.tok(prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("bad_inputs"))


# ------------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    run: Callable[[Env, pytest.MonkeyPatch], Any]
    error: type[BaseException]
    problem: str  # regex the message must contain: what is wrong
    fix: str  # regex the message must contain: what to do


def _all_padding_row(env: Env, monkeypatch) -> Any:
    inputs = env.batch(["the dog ran", "sun", "a bird sang"])
    inputs["attention_mask"][1] = 0
    return env.generate(inputs)


def _too_big_for_memory(env: Env, monkeypatch) -> Any:
    monkeypatch.setattr(generation, "available_memory_bytes", lambda device: 10_000)
    return env.generate(env.batch(["the dog ran"]), num_beams=2, num_samples=10, max_new_tokens=4)


def _mixed_feature_maps_in_forward(env: Env, monkeypatch) -> Any:
    model = env.two_adapter_model()
    for module in model.modules():  # bypassing the tuner's set_adapter, which refuses this combination earlier
        if isinstance(module, NTKAttentionLayer):
            module.set_adapter(["default", "relu"])
    return model(input_ids=torch.tensor([[5, 6, 7]]))


def _ntk_op(**bad) -> Callable[[Env, pytest.MonkeyPatch], Any]:
    def run(env: Env, monkeypatch) -> Any:
        args = dict(q=torch.randn(1, 4, 3, 8), kv=torch.randn(1, 2, 5, 8), z=torch.zeros(4, 8, 8), k=torch.zeros(4, 8))
        args.update(bad)
        return ntk_attention(args["q"], args["kv"], args["kv"], args["z"], args["k"])

    return run


def _load_broken_adapter(name: str, **breakage) -> Callable[[Env, pytest.MonkeyPatch], Any]:
    return lambda env, mp: PeftModel.from_pretrained(tiny_model("llama"), env.broken_adapter(name, **breakage))


_TARGETS_FIX = r"self_attn.*leave\s+target_modules unset"

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------------------------------- NTK: what to adapt
    "ntk-unknown-target-name": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config(target_modules=["attention_typo"])),
        ValueError,
        r"target_modules=\['attention_typo'\] matches no module of LlamaForCausalLM",
        _TARGETS_FIX,
    ),
    "ntk-unknown-target-regex": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config(target_modules=r".*\.attn")),
        ValueError,
        r"matches no module",
        r"has 2 attention modules \(e\.g\. 'model\.layers\.0\.self_attn'\).*leave\s+target_modules unset",
    ),
    "ntk-layers-to-transform-out-of-range": Case(
        lambda env, mp: get_peft_model(
            tiny_model("llama"), ntk_config(target_modules=["self_attn"], layers_to_transform=[7])
        ),
        ValueError,
        r"matches no module of LlamaForCausalLM within layers_to_transform=\[7\]",
        _TARGETS_FIX,
    ),
    "ntk-non-attention-target": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config(target_modules=["q_proj"])),
        ValueError,
        r"'model\.layers\.0\.self_attn\.q_proj' \(Linear\) is not an attention module",
        _TARGETS_FIX,
    ),
    "ntk-unsupported-architecture-bloom": Case(
        lambda env, mp: get_peft_model(tiny_model("bloom"), NTKAttentionConfig()),
        ValueError,
        r"cannot adapt BloomForCausalLM: none of its modules routes attention through",
        r"Tested architectures: Llama",
    ),
    "ntk-unsupported-architecture-bloom-named-target": Case(
        lambda env, mp: get_peft_model(
            tiny_model("bloom"),
            NTKAttentionConfig(target_modules=["self_attention"]),
        ),
        ValueError,
        r"cannot adapt BloomForCausalLM",
        r"Tested architectures",
    ),
    # ------------------------------------------------------------------------------------- NTK: loading adapters
    "ntk-adapter-for-other-head-shape": Case(
        lambda env, mp: PeftModel.from_pretrained(
            tiny_model("llama", num_attention_heads=2, num_key_value_heads=2), env.adapter
        ),
        ValueError,
        r"does not fit this model: .*self_attn\.ntk_[kz]\.default has shape \(4, 8(, 8)?\) in the adapter but "
        r"\(2, 16(, 16)?\) here",
        r"load it on that model",
    ),
    "ntk-adapter-dir-without-weights": Case(
        _load_broken_adapter("no_weights", remove="adapter_model.safetensors"),
        FileNotFoundError,
        r"no_weights has an adapter_config\.json but no adapter weights \(adapter_model\.safetensors",
        r"Copy the whole folder that save_pretrained wrote",
    ),
    "ntk-load-adapter-dir-without-weights": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config()).load_adapter(
            env.broken_adapter("no_weights", remove="adapter_model.safetensors"), adapter_name="second"
        ),
        FileNotFoundError,
        r"no adapter weights",
        r"Copy the whole folder",
    ),
    "ntk-adapter-dir-without-config": Case(
        # PEFT reads adapter_config.json before it knows the adapter type, so this message is PEFT's own.
        _load_broken_adapter("no_config", remove="adapter_config.json"),
        ValueError,
        r"Can't find 'adapter_config\.json'",
        r"at '.*no_config'",  # where it looked: the folder to fix
    ),
    "ntk-adapter-truncated-safetensors": Case(
        _load_broken_adapter("truncated", truncate="adapter_model.safetensors"),
        OSError,
        r"truncated[/\\]adapter_model\.safetensors is not a valid safetensors file \(.*\): it is truncated or corrupted",
        r"Save the adapter again \(model\.save_pretrained\) or copy the whole folder again",
    ),
    # ---------------------------------------------------------------------------------- NTK: config out of range
    "ntk-config-feature-dropout-1.5": Case(
        lambda env, mp: NTKAttentionConfig(feature_dropout=1.5),
        ValueError,
        r"feature_dropout is a dropout probability",
        r"must be a number in \[0, 1\), got 1\.5",
    ),
    "ntk-config-feature-dropout-string": Case(
        lambda env, mp: NTKAttentionConfig(feature_dropout="0.1"),
        ValueError,
        r"feature_dropout",
        r"must be a number in \[0, 1\), got '0\.1'",
    ),
    "ntk-config-init-scale-negative": Case(
        lambda env, mp: NTKAttentionConfig(init_scale=-1),
        ValueError,
        r"init_scale is the standard deviation",
        r"finite number >= 0 \(default 1e-4\), got -1",
    ),
    "ntk-config-init-scale-inf": Case(  # would make N(0, inf) weights: NaN outputs
        lambda env, mp: NTKAttentionConfig(init_scale=math.inf),
        ValueError,
        r"init_scale",
        r"finite number >= 0.*got inf",
    ),
    "ntk-config-init-weights-x": Case(
        lambda env, mp: NTKAttentionConfig(init_weights="x"),
        ValueError,
        r"init_weights='x' is not supported",
        r"use one of \('small_random', 'zeros', 'random'\), True \(= 'zeros'\) or False",
    ),
    "ntk-config-attention-backend-x": Case(
        lambda env, mp: NTKAttentionConfig(attention_backend="x"),
        ValueError,
        r"attention_backend='x' is not supported",
        r"use one of \('auto', 'fused', 'reference'\)",
    ),
    "ntk-config-feature-map-x": Case(
        lambda env, mp: NTKAttentionConfig(feature_map="x"),
        ValueError,
        r"feature_map='x' is not registered",
        r"choose one of \['elu', 'relu'\] or register yours first with peft_ntk\.register_feature_map",
    ),
    # -------------------------------------------------------------------------------- NTK: adapters at run time
    "ntk-set-adapter-missing": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config()).base_model.set_adapter("missing"),
        ValueError,
        r"no adapter named 'missing'; this model has \['default'\]",
        r"Load it first \(model\.load_adapter\(path, adapter_name=\.\.\.\)",
    ),
    "ntk-peft-model-set-adapter-missing": Case(
        # PeftModel.set_adapter checks the name itself, before our tuner is asked: PEFT's message.
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config()).set_adapter("missing"),
        ValueError,
        r"Adapter missing",
        r"not found",
    ),
    "ntk-two-active-adapters-different-feature-maps": Case(
        lambda env, mp: env.two_adapter_model().base_model.set_adapter(["default", "relu"]),
        ValueError,
        r"adapters \['default', 'relu'\] cannot be active together: they use different feature maps",
        r"Activate one of them, or only adapters with the same feature_map",
    ),
    "ntk-mixed-feature-maps-at-forward": Case(
        _mixed_feature_maps_in_forward,
        ValueError,
        r"active NTK adapters \['default', 'relu'\] use different feature maps",
        r"Activate one of them with set_adapter\(name\)",
    ),
    "ntk-merge": Case(
        lambda env, mp: get_peft_model(tiny_model("llama"), ntk_config()).merge_and_unload(),
        ValueError,
        r"NTK-Attention cannot be merged into the base weights",
        r"Keep the model as a PeftModel, or\s+call unload\(\)",
    ),
    # ------------------------------------------------------------------------------------- the ntk_attention op
    "op-query-not-4d": Case(
        _ntk_op(q=torch.randn(4, 3, 8)),
        ValueError,
        r"query, key and value must be 4-D",
        r"\(batch, heads, length, head_dim\)",
    ),
    "op-heads-not-multiple-of-kv-heads": Case(
        _ntk_op(q=torch.randn(1, 3, 3, 8), z=torch.zeros(3, 8, 8), k=torch.zeros(3, 8)),
        ValueError,
        r"query has 3 heads, which is not a multiple of the 2 key/value heads",
        r"num_heads % num_key_value_heads == 0",
    ),
    "op-z-wrong-shape": Case(
        _ntk_op(z=torch.zeros(4, 8, 7)),
        ValueError,
        r"z must have shape",
        r"\(num_heads=4, feature_dim, value_dim=8\); got \(4, 8, 7\)",
    ),
    # ----------------------------------------------------------------------------------------- RankGen: scorer
    "rankgen-scorer-without-tokenizer": Case(
        lambda env, mp: RankGenScorer(env.scorer.config).score(["a prefix"], ["a continuation"]),
        ValueError,
        r"RankGenScorer has no tokenizer",
        r"RankGenScorer\.from_pretrained\(path, tokenizer=|scorer\.tokenizer = AutoTokenizer",
    ),
    "rankgen-generate-with-scorer-without-tokenizer": Case(
        lambda env, mp: env.generate(env.batch(["the dog ran"]), scorer=RankGenScorer(env.scorer.config)),
        ValueError,
        r"RankGenScorer has no tokenizer",
        r"scorer\.tokenizer = AutoTokenizer",
    ),
    "rankgen-score-lone-surrogate-prefix": Case(
        lambda env, mp: env.scorer.score(["ab\udcff"], ["x"]),
        ValueError,
        r"prefixes\[0\] contains '\\udcff' at position 2: a lone surrogate, not valid Unicode",
        r"decode\s+with errors='replace' instead",
    ),
    "rankgen-encode-lone-surrogate-continuation": Case(
        lambda env, mp: env.scorer.encode_suffix(["fine", "bad \udc80 text"]),
        ValueError,
        r"texts\[1\] contains '\\udc80' at position 4",
        r"text\.encode\('utf-8', 'replace'\)",
    ),
    "rankgen-score-length-mismatch": Case(
        lambda env, mp: env.scorer.score(["a", "b"], ["c"]),
        ValueError,
        r"got 2 prefixes and 1 continuations",
        r"needs as many prefixes as continuations",
    ),
    # ------------------------------------------------------------------------------------- RankGen: generation
    "rankgen-empty-prompt": Case(
        lambda env, mp: env.generate(env.batch([""])),
        ValueError,
        r"empty prompt \(input_ids of length 0\)",
        r"at least one token, e\.g\. the tokenizer's BOS token",
    ),
    "rankgen-all-padding-row": Case(
        _all_padding_row,
        ValueError,
        r"prompt row\(s\) \[1\] of the batch are all padding \(attention_mask all zeros",
        r"Drop those rows, or give every prompt\s+at least one token",
    ),
    "rankgen-empty-string-in-padded-batch": Case(
        lambda env, mp: env.generate(env.batch(["the dog ran", "a bird", ""])),
        ValueError,
        r"row\(s\) \[2\] .*all padding.*empty prompt string",
        r"Drop those rows",
    ),
    "rankgen-max-new-tokens-0": Case(
        # Refused by transformers' generate before RankGen runs (documented in rankgen_generate's docstring).
        lambda env, mp: env.generate(env.batch(["the dog ran"]), max_new_tokens=0),
        ValueError,
        r"`max_new_tokens`",
        r"must be greater than 0, but is 0",
    ),
    "rankgen-max-new-tokens-beyond-context": Case(
        lambda env, mp: env.generate(
            env.batch(["the dog ran"]), model=tiny_llama_for(env.tok, max_positions=32), max_new_tokens=40
        ),
        ValueError,
        r"max_new_tokens=40 leaves no room for the prompt within the model's max_position_embeddings=32",
        r"lower max_new_tokens below 32",
    ),
    "rankgen-kv-cache-exceeds-memory": Case(
        _too_big_for_memory,
        ValueError,
        r"would need about 35\.0 KiB for the KV cache alone, but only 9\.8 KiB is available on cpu.*"
        r"20 rows \(1 prompts × 20 candidates, num_beams=2 × num_samples=10\) × 7 positions \(prompt 3 \+ "
        r"max_new_tokens 4\) × 2 layers × 2 \(keys, values\) × 2 key/value heads × 8 \(head size\) × 4 bytes",
        r"Lower num_samples or num_beams, pass fewer prompts per call \(split\s+the batch\), or lower max_new_tokens",
    ),
    "rankgen-do-sample-false": Case(
        lambda env, mp: env.generate(env.batch(["the dog ran"]), do_sample=False),
        ValueError,
        r"needs `do_sample=True`",
        r"Pass `do_sample=True` to `generate`",
    ),
    "rankgen-more-return-sequences-than-candidates": Case(
        lambda env, mp: env.generate(env.batch(["the dog ran"]), mode="rerank", num_return_sequences=3),
        ValueError,
        r"num_return_sequences=3 is more than the 2 candidates",
        r"raise num_samples/num_beams or lower num_return_sequences",
    ),
}


def _raised_inside_torch(info: pytest.ExceptionInfo) -> bool:
    torch_dir = str(Path(torch.__file__).parent)
    return str(info.traceback[-1].path).startswith(torch_dir)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_clear_error(case: Case, env: Env, monkeypatch):
    with pytest.raises(case.error, match=case.problem) as info:
        case.run(env, monkeypatch)
    info.match(case.fix)
    assert not _raised_inside_torch(info), "raised deep inside torch instead of by a check with a clear message"


def test_enough_cases():
    assert len(CASES) >= 25


# ---------------------------------------------------------------------------------- refused = nothing half-done


@pytest.mark.parametrize(
    "config_kwargs",
    [
        dict(target_modules=["attention_typo"]),
        dict(target_modules=["q_proj"]),
        dict(target_modules=["self_attn", "q_proj"]),
        dict(target_modules=["self_attn"], layers_to_transform=[7]),
    ],
    ids=["unknown", "non-attention", "attention-and-non-attention", "no-layer"],
)
def test_refused_targets_leave_the_model_untouched(config_kwargs):
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError):
        get_peft_model(base, ntk_config(**config_kwargs))
    assert base.config._attn_implementation == "sdpa"  # attention not rerouted through ntk_sdpa
    assert not any(isinstance(m, NTKAttentionLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    model = get_peft_model(base, ntk_config())  # and the model can still be adapted
    assert sum(isinstance(m, NTKAttentionLayer) for m in model.modules()) == 2


def test_refused_set_adapter_keeps_the_active_adapter():
    model = get_peft_model(tiny_model("llama"), ntk_config(init_weights=False)).eval()
    model.add_adapter("relu", ntk_config(feature_map="relu", init_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for names in ("missing", ["default", "relu"], ["default", "missing"]):
        with pytest.raises(ValueError):
            model.base_model.set_adapter(names)
        assert model.base_model.active_adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    model.base_model.set_adapter("relu")  # valid switches still work
    model.add_adapter("third", ntk_config())  # and so does adding after a refusal


def test_config_only_folder_still_loads(tmp_path):
    """The weights check runs only when PEFT loads an adapter: a folder with just the config reads as before."""
    NTKAttentionConfig(feature_map="relu").save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert NTKAttentionConfig.from_pretrained(str(tmp_path)).feature_map == "relu"


def test_load_without_import_names_the_fix(env):
    """In a process that never imported peft_ntk, PEFT's error names the type, and the adapter's card the fix."""
    child = textwrap.dedent(
        """
        import sys
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
        try:
            PeftModel.from_pretrained(base, sys.argv[1])
        except Exception as err:
            assert "peft_ntk" not in sys.modules
            print(type(err).__name__, err)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, str(env.adapter)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("KeyError")
    assert "NTK_ATTENTION" in proc.stdout
    assert json.loads((env.adapter / "adapter_config.json").read_text())["peft_type"] == "NTK_ATTENTION"
    card = (env.adapter / "README.md").read_text()
    assert "import peft_ntk" in card and "KeyError: 'NTK_ATTENTION'" in card


# ------------------------------------------------------------------------------------------ inputs that must work


def test_scorer_with_another_vocabulary_and_replacement_characters(env):
    """Generator: byte-level BPE (its samples decode to text with U+FFFD); scorer: a word-level T5 vocabulary.

    Text is the interface, so the two vocabularies need not agree; U+FFFD is ordinary text to the scorer.
    """
    gen_tok = byte_tokenizer()
    generator = tiny_llama_for(gen_tok)
    assert len(gen_tok) != len(env.scorer_tokenizer)
    prompts = ["the cat sat on", "a bird"]
    inputs = gen_tok(prompts, return_tensors="pt", padding=True)
    out = env.generate(
        inputs,
        scorer=env.scorer,
        tok=gen_tok,
        model=generator,
        num_beams=2,
        num_samples=3,
        rerank_every=3,
        max_new_tokens=8,
        suppress_tokens=[gen_tok.pad_token_id, gen_tok.eos_token_id],
        return_dict_in_generate=True,
    )
    width = inputs["input_ids"].shape[1]
    assert out.sequences.shape == (2, width + 8)
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
    texts = gen_tok.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
    assert any("\ufffd" in text for text in texts)  # random bytes: split multi-byte characters
    assert torch.isfinite(out.sequences_scores).all()
    expected = env.scorer.score(prompts, texts)
    torch.testing.assert_close(out.sequences_scores.float(), expected.float(), rtol=1e-4, atol=1e-4)


def test_replacement_character_scores_like_other_text(env):
    scores = env.scorer.score(["the \ufffd cat", "the \ufffd cat"], ["sat \ufffd", "sat"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_long_prompt_is_truncated_from_the_left_with_a_warning(env):
    small = tiny_llama_for(env.tok, max_positions=16)
    prompt = " ".join((WORDS * 2)[:20])
    inputs = env.batch([prompt])
    with CaptureLogger(generation.logger) as captured:
        out = env.generate(inputs, model=small, max_new_tokens=4)
    assert "prompt (20 tokens) plus max_new_tokens=4 exceeds the model's max_position_embeddings=16" in captured.out
    assert "truncated from the left to 12 tokens" in captured.out
    assert out.shape == (1, 24) and torch.equal(out[0, :20], inputs["input_ids"][0])


def test_predicted_kv_cache_size_matches_the_real_cache(env):
    rows, length = 6, 7
    ids = torch.randint(3, len(env.tok), (rows, length))
    with torch.no_grad():
        cache = env.model(input_ids=ids, use_cache=True).past_key_values
    actual = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert generation.predicted_kv_cache_bytes(env.model, rows, length) == actual


def test_memory_check_passes_when_it_fits(env, monkeypatch):
    monkeypatch.setattr(generation, "available_memory_bytes", lambda device: 36_000)  # needs 35,840 bytes
    out = env.generate(env.batch(["the dog ran"]), num_beams=2, num_samples=10, max_new_tokens=4)
    assert out.shape == (1, 7)


def test_available_memory_is_read_on_cpu():
    available = generation.available_memory_bytes(torch.device("cpu"))
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo")
    assert isinstance(available, int) and available > 0


def test_available_memory_in_a_memory_limited_container(monkeypatch, tmp_path):
    """cgroup v2: the limit minus what the container uses besides page cache, if lower than psutil's available."""
    import psutil

    gib = 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 64 * gib})())
    monkeypatch.setattr(generation, "CGROUP", str(tmp_path))
    (tmp_path / "memory.max").write_text(f"{8 * gib}\n")
    (tmp_path / "memory.current").write_text(f"{7 * gib}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2 * gib}\nfile {5 * gib}\nkernel 0\n")  # file: reclaimable
    assert generation.available_memory_bytes(torch.device("cpu")) == 6 * gib
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert generation.available_memory_bytes(torch.device("cpu")) == 64 * gib
    (tmp_path / "memory.max").unlink()  # no cgroup v2 memory controller
    assert generation.available_memory_bytes(torch.device("cpu")) == 64 * gib
