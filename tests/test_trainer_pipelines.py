"""NTK-Attention models inside the stock transformers machinery: Trainer, checkpoints, resume, gradient
checkpointing, sequence classification and pipelines.

Everything runs on CPU with tiny randomly initialised models and locally built tokenizers; nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import warnings

import pytest
import torch
from helpers import tiny_llama, tiny_model, training_args, word_level_tokenizer
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import peft_ntk
from peft_ntk import NTKAttentionConfig, NTKAttentionLayer

VOCAB = 64
SEQ_LEN = 16
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------------
# helpers


def pipeline_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """``tiny_llama`` (its large init gives the adapter something to adapt within a few steps) with a 64-token
    context and no pad token."""
    return tiny_llama(
        seed, **({"max_position_embeddings": 64, "attention_dropout": 0.0, "pad_token_id": None} | overrides)
    )


def ntk_llama(base_seed: int = 0, adapter_seed: int = 1, **config_kwargs) -> PeftModel:
    base = pipeline_llama(base_seed)
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, NTKAttentionConfig(task_type="CAUSAL_LM", **config_kwargs))


def lm_dataset(n: int = 32, seed: int = 0) -> list[dict]:
    """Arithmetic progressions mod VOCAB: a pattern a causal LM can learn from the context."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        start, step = rng.randrange(VOCAB), rng.choice([1, 2, 3])
        ids = [(start + step * j) % VOCAB for j in range(SEQ_LEN)]
        data.append({"input_ids": ids, "attention_mask": [1] * SEQ_LEN, "labels": ids})
    return data


def ntk_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".ntk_" in n}


def base_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".ntk_" not in n}


def fixed_lm_loss(model: torch.nn.Module, data: list[dict]) -> float:
    batch = torch.tensor([row["input_ids"] for row in data])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    model.train(was_training)
    return loss


def word_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained here on a few sentences (no download)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    return word_level_tokenizer(sentences, specials, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park with the ball",
    "the bird sang a song in the tree",
    "good great nice lovely wonderful",
    "bad awful terrible horrible poor",
    "we went to the market and bought bread",
]


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


# --------------------------------------------------------------------------------------------------------------------
# 1. Trainer trains only the adapter


def test_trainer_trains_ntk_parameters_only(tmp_path):
    model = ntk_llama()
    data = lm_dataset()
    assert base_params(model), "no base parameters found"
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ntk_" not in n)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".ntk_" in n for n in trainable)  # 2 layers x (Z, k)

    before_ntk, before_base = ntk_params(model), base_params(model)
    loss_before = fixed_lm_loss(model, data[:8])

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=12, per_device_eval_batch_size=8),
        train_dataset=data,
        eval_dataset=data[:8],
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss_before, abs=1e-5)
    result = trainer.train()
    assert result.global_step == 12

    loss_after = fixed_lm_loss(model, data[:8])
    assert loss_after < loss_before - 0.02, (loss_before, loss_after)
    # Trainer.evaluate goes through the adapted model too
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss_after, abs=1e-5)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 12 and all(torch.isfinite(torch.tensor(logged)))

    after_ntk, after_base = ntk_params(model), base_params(model)
    for name in before_ntk:
        assert not torch.allclose(before_ntk[name], after_ntk[name]), f"{name} did not change"
    for name in before_base:
        assert torch.equal(before_base[name], after_base[name]), f"base weight {name} changed"


# --------------------------------------------------------------------------------------------------------------------
# 2. Checkpoints hold the adapter only


def test_checkpoints_contain_only_the_adapter(tmp_path):
    model = ntk_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=lm_dataset(),
    )
    trainer.train()

    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        folder = tmp_path / name
        files = {p.name for p in folder.iterdir()}
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files, files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert len(tensors) == 4 and all("ntk_" in key for key in tensors), sorted(tensors)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == peft_ntk.NTK_PEFT_TYPE.value

    # The last checkpoint holds the trained weights, and loads back onto a fresh base to the same outputs.
    final = load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors"))
    trained = {n.replace(".default", ""): p for n, p in ntk_params(model).items()}
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in trained.items()}
    for key, value in final.items():
        assert torch.equal(value, trained[key]), key

    reloaded = PeftModel.from_pretrained(pipeline_llama(0), str(tmp_path / "checkpoint-4")).eval()
    ids = torch.tensor([lm_dataset(2, seed=5)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_load_best_model_at_end_and_save_model_use_the_adapter(tmp_path):
    model = ntk_llama(init_weights=False)
    args = training_args(
        tmp_path,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        # "best" = highest eval loss: the first checkpoint, so the final weights must be replaced by loading it
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), eval_dataset=lm_dataset(8, seed=9))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "adapter_model.safetensors"))
    current = {n.replace(".default", ""): p for n, p in ntk_params(model).items()}
    assert best.keys() == current.keys()
    assert all(torch.equal(best[k], current[k]) for k in best)
    assert not any(torch.equal(last[k], current[k]) for k in last)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".ntk_" in n)  # still trainable

    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files


# --------------------------------------------------------------------------------------------------------------------
# 3. Resuming from a checkpoint reproduces the uninterrupted run


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    data = lm_dataset(32)  # 4 batches of 8: checkpoint-2 is mid-epoch, so resuming must skip the seen batches
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=8)

    full = ntk_llama(adapter_seed=1, init_weights=False)
    Trainer(model=full, args=training_args(tmp_path / "full", **overrides), train_dataset=data).train()
    final = ntk_params(full)
    at_step_2 = load_file(str(tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors"))

    # A different adapter initialisation: only loading checkpoint-2 (weights, optimizer, scheduler, RNG and data
    # position) can bring this model to the uninterrupted run's weights.
    resumed = ntk_llama(adapter_seed=999, init_weights=False)
    assert not all(torch.allclose(final[n], p) for n, p in ntk_params(resumed).items())
    counter = CountSteps()
    trainer = Trainer(
        model=resumed, args=training_args(tmp_path / "resumed", **overrides), train_dataset=data, callbacks=[counter]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert counter.steps == 2 and trainer.state.global_step == 4

    got = ntk_params(resumed)
    assert got.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(got[name], final[name], rtol=1e-5, atol=1e-6, msg=name)
        # ... and training really continued past the checkpoint
        assert not torch.allclose(final[name], at_step_2[name.replace(".default", "")]), name


# --------------------------------------------------------------------------------------------------------------------
# 4. Gradient checkpointing


def _one_backward(model: torch.nn.Module, batch: torch.Tensor, **forward_kwargs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch, **forward_kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _count_ntk_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    for module in model.modules():
        if isinstance(module, NTKAttentionLayer):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    batch = torch.tensor([row["input_ids"] for row in lm_dataset(4, seed=3)])
    reference = _one_backward(ntk_llama(init_weights=False), batch)
    assert len(reference) == 4

    model = ntk_llama(init_weights=False)
    # transformers' gradient_checkpointing_enable calls enable_input_require_grads itself for models whose main
    # input is input_ids, which is what the reentrant variant needs with a frozen embedding.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.model.gradient_checkpointing
    calls = _count_ntk_calls(model)
    grads = _one_backward(model, batch, use_cache=False)
    assert calls[0] == 4, "each of the 2 NTK layers should run twice (forward + recomputation in backward)"
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_vit_reentrant_checkpointing_needs_enable_input_require_grads():
    """For a pixel_values model transformers (5.24) does not call enable_input_require_grads itself: with
    use_reentrant=True the frozen patch embedding cuts the graph and the NTK parameters inside checkpointed layers get
    no gradient (torch warns). After model.enable_input_require_grads() the gradients are exact."""

    def make():
        return ntk_vit(init_weights=False)

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])

    def grads(model):
        model.train()
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if ".ntk_" in n}

    reference = grads(make())
    assert all(g is not None for g in reference.values())

    plain = make()
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = grads(plain)
    if all(g is None for g in got.values()):  # the pitfall (transformers 5.24): no gradient, and torch says so
        assert any("None of the inputs have requires_grad" in str(w.message) for w in caught)
    else:  # a transformers that enables input grads itself: then the gradients must be exact, never partial
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)

    fixed = make()
    fixed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    fixed.enable_input_require_grads()
    got = grads(fixed)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "argument",
    [
        "gradient_checkpointing",
        pytest.param(
            "activation_checkpointing",
            marks=pytest.mark.skipif(
                "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrainingArguments)},
                reason="TrainingArguments.activation_checkpointing is newer than this transformers",
            ),
        ),
    ],
)
def test_trainer_with_gradient_checkpointing_matches_plain_training(tmp_path, argument):
    data = lm_dataset(16)
    runs, calls = {}, {}
    for checkpointing in (False, True):
        model = ntk_llama(init_weights=False)
        counter = _count_ntk_calls(model)
        args = training_args(tmp_path / str(checkpointing), max_steps=3, **{argument: checkpointing})
        Trainer(model=model, args=args, train_dataset=data).train()
        assert bool(model.base_model.model.model.gradient_checkpointing) is checkpointing
        runs[checkpointing], calls[checkpointing] = ntk_params(model), counter[0]
    assert calls == {False: 3 * 2, True: 3 * 2 * 2}, calls  # 3 steps x 2 layers, x 2 with recomputation
    initial = ntk_params(ntk_llama(init_weights=False))
    for name in initial:
        assert not torch.allclose(runs[True][name], initial[name]), name
        torch.testing.assert_close(runs[True][name], runs[False][name], rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# 5. Sequence classification


def tiny_bert_classifier(seed: int = 0, vocab_size: int = 32) -> BertForSequenceClassification:
    return tiny_model(
        "bert",
        seed,
        vocab_size=vocab_size,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=0,
        initializer_range=0.3,
        **NO_DROPOUT,
    )


def toy_classification(n: int, seed: int) -> list[dict]:
    """Label 0: tokens 4..17, label 1: tokens 18..31, between [CLS]=2 and [SEP]=3."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        pool = range(4, 18) if label == 0 else range(18, 32)
        ids = [2] + [rng.choice(pool) for _ in range(10)] + [3]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label})
    return rows


def accuracy(model, rows) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([r["input_ids"] for r in rows])).logits
    return (logits.argmax(-1) == torch.tensor([r["labels"] for r in rows])).float().mean().item()


def test_sequence_classification_trains_and_saves_the_classifier(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), NTKAttentionConfig(task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable), trainable
    assert any(".ntk_z" in n for n in trainable) and any(".ntk_k" in n for n in trainable)
    assert not any("bert." in n and ".ntk_" not in n for n in trainable), trainable

    train, test = toy_classification(64, seed=0), toy_classification(32, seed=1)
    acc_before = accuracy(model, test)
    args = training_args(tmp_path, max_steps=40, per_device_train_batch_size=16, save_strategy="steps", save_steps=40)
    Trainer(model=model, args=args, train_dataset=train).train()
    acc_after = accuracy(model, test)
    assert acc_after >= 0.75 and acc_after > acc_before + 0.15, (acc_before, acc_after)

    checkpoint = tmp_path / "checkpoint-40"
    keys = set(load_file(str(checkpoint / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys, sorted(keys)
    assert all("ntk_" in k or "classifier" in k for k in keys), sorted(keys)
    assert not (checkpoint / "model.safetensors").exists()

    # A base with a different (untrained) classifier gets the trained one back from the adapter.
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(seed=0), str(checkpoint))
    assert accuracy(reloaded, test) == acc_after
    with torch.no_grad():
        ids = torch.tensor([r["input_ids"] for r in test])
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# 6. Pipelines


def test_text_generation_pipeline_uses_the_adapter():
    tok = word_tokenizer(SENTENCES)
    base = pipeline_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    reference_base = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tok)

    prompts = ["the cat sat", "a dog ran in", "we went to the"]
    kwargs = dict(max_new_tokens=6, do_sample=False)
    outputs = [generator(p, return_full_text=False, **kwargs)[0]["generated_text"] for p in prompts]
    assert all(isinstance(text, str) and text.strip() for text in outputs), outputs

    def direct(m, prompt):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1] :]
        return tok.decode(new, skip_special_tokens=True)

    assert outputs == [direct(model, p) for p in prompts]
    base_outputs = [direct(reference_base, p) for p in prompts]
    assert outputs != base_outputs, "a random NTK adapter should change some greedy continuation"
    with model.disable_adapter():
        disabled = [generator(p, return_full_text=False, **kwargs)[0]["generated_text"] for p in prompts]
    assert disabled == base_outputs

    # Batched prompts of different lengths (left padding, positions from the attention mask) give the same text.
    tok.padding_side = "left"
    batched = generator(prompts, batch_size=3, return_full_text=False, **kwargs)
    assert [r[0]["generated_text"] for r in batched] == outputs


def _scores(results) -> dict[str, float]:
    return {r["label"]: r["score"] for r in results}


def test_text_classification_pipeline_uses_the_adapter():
    tok = word_tokenizer(SENTENCES)
    base = tiny_bert_classifier(0, vocab_size=len(tok))
    base.config.pad_token_id = tok.pad_token_id
    reference_base = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, NTKAttentionConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    texts = ["good great nice", "bad awful terrible", "the cat sat on the mat"]

    classifier = pipeline("text-classification", model=model, tokenizer=tok)
    adapted = [_scores(r) for r in classifier(texts, top_k=None)]
    assert all(set(s) == {"LABEL_0", "LABEL_1"} and abs(sum(s.values()) - 1) < 1e-5 for s in adapted), adapted
    base_scores = [
        _scores(r) for r in pipeline("text-classification", model=reference_base, tokenizer=tok)(texts, top_k=None)
    ]

    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    for s, p in zip(adapted, probs):
        assert s["LABEL_0"] == pytest.approx(p[0].item(), abs=1e-6)
    assert any(abs(a["LABEL_0"] - b["LABEL_0"]) > 1e-3 for a, b in zip(adapted, base_scores)), (adapted, base_scores)

    with model.disable_adapter():
        disabled = [_scores(r) for r in classifier(texts, top_k=None)]
    for d, b in zip(disabled, base_scores):
        assert d["LABEL_0"] == pytest.approx(b["LABEL_0"], abs=1e-6)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    return tiny_model("vit", seed, num_channels=3, initializer_range=0.2, **NO_DROPOUT)


def ntk_vit(seed: int = 0, **config_kwargs) -> PeftModel:
    base = tiny_vit(seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, NTKAttentionConfig(modules_to_save=["classifier"], **config_kwargs))


def test_image_classification_pipeline_uses_the_adapter():
    from PIL import Image

    model = ntk_vit(init_weights=False).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, do_resize=True)
    classifier = pipeline("image-classification", model=model, image_processor=processor)

    rng = random.Random(0)
    images = []
    for _ in range(3):
        image = Image.new("RGB", (24, 20))
        image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(24 * 20)])
        images.append(image)

    adapted = [_scores(r) for r in classifier(images, top_k=3)]
    assert all(set(s) == {"LABEL_0", "LABEL_1", "LABEL_2"} for s in adapted), adapted

    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels).logits.softmax(-1)
        base_probs = tiny_vit(0)(pixel_values=pixels).logits.softmax(-1)
    for s, p in zip(adapted, probs):
        for j in range(3):
            assert s[f"LABEL_{j}"] == pytest.approx(p[j].item(), abs=1e-6)
    assert (probs - base_probs).abs().max() > 1e-3

    with model.disable_adapter():
        disabled = [_scores(r) for r in classifier(images, top_k=3)]
    for s, p in zip(disabled, base_probs):
        for j in range(3):
            assert s[f"LABEL_{j}"] == pytest.approx(p[j].item(), abs=1e-6)
