"""Training a RankGen scorer (rankgen_logits.train / training_data): the loss against a float64 reference, the data
layout, the stock Trainer (held-out improvement, checkpoint + resume, bf16), any encoder, the CLI. CPU, offline."""

from __future__ import annotations

import json
import random
from pydoc_data.topics import topics

import datasets
import pytest
import torch
from helpers import tiny_bert_encoder, tiny_model, tiny_rankgen_scorer, training_args
from safetensors.torch import load_file
from transformers import BertModel, TrainingArguments

from rankgen_logits import RankGenScorer
from rankgen_logits.metrics import identification_accuracy
from rankgen_logits.train import (
    QUICK_T5,
    PooledEncoderScorer,
    RankGenTrainer,
    RankGenTrainingConfig,
    _quick_tokenizer,
    main,
    rankgen_contrastive_loss,
    train_rankgen,
)
from rankgen_logits.training_data import (
    PairConfig,
    RankGenCollator,
    add_generated_negatives,
    as_pairs_dataset,
    make_pairs,
)

DOCS = [topics[k] for k in sorted(topics)]
TRAIN_DOCS = [d for i, d in enumerate(DOCS) if i % 5]
HELDOUT_DOCS = [d for i, d in enumerate(DOCS) if i % 5 == 0]
PAIRS = dict(prefix_words=32, continuation_words=16, num_document_negatives=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _quick_tokenizer(TRAIN_DOCS)


def tiny_scorer(tok, seed: int = 0) -> RankGenScorer:
    return tiny_rankgen_scorer(tok, seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **QUICK_T5)


def args_for(output_dir, **overrides) -> TrainingArguments:
    """The shared deterministic CPU arguments, at a scorer's learning rate."""
    return training_args(output_dir, **{"learning_rate": 3e-4, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. the loss


def reference_loss(p: torch.Tensor, c: torch.Tensor, gold: list[int]) -> torch.Tensor:
    """InfoNCE without temperature, written out row by row in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for i, g in enumerate(gold):
        logits = torch.stack([(p[i] * c[j]).sum() for j in range(c.shape[0])])
        top = logits.max()
        total = total - logits[g] + top + torch.log(torch.exp(logits - top).sum())
    return total / len(gold)


def test_loss_and_gradients_match_float64_reference():
    torch.manual_seed(0)
    p = (torch.randn(5, 7, dtype=torch.float64) * 3).requires_grad_()
    c = (torch.randn(12, 7, dtype=torch.float64) * 3).requires_grad_()
    gold = [3, 0, 11, 4, 4]
    loss = rankgen_contrastive_loss(p, c, torch.tensor(gold))
    p2, c2 = p.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    expected = reference_loss(p2, c2, gold)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(p.grad, p2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.grad, c2.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: rankgen_contrastive_loss(a, b, torch.tensor(gold)),
        (p.detach().requires_grad_(), c.detach().requires_grad_()),
    )
    # large logits (no temperature) stay finite
    big = rankgen_contrastive_loss(p.detach() * 1e3, c.detach() * 1e3, torch.tensor(gold))
    assert torch.isfinite(big)


def test_loss_under_bf16_autocast_uses_float32_logits():
    torch.manual_seed(1)
    p, c = torch.randn(4, 16), torch.randn(9, 16)
    gold = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rankgen_contrastive_loss(p, c, gold)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss.double(), reference_loss(p.double(), c.double(), gold.tolist()), rtol=1e-5, atol=1e-5
    )


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same d"):
        rankgen_contrastive_loss(torch.randn(2, 3), torch.randn(4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="gold_index must have shape"):
        rankgen_contrastive_loss(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------------------------
# 2. data


def test_make_pairs_cuts_prefix_gold_and_disjoint_negatives():
    doc = " ".join(f"w{i}" for i in range(100))
    rows = make_pairs(
        [doc, "too short"],
        PairConfig(prefix_words=10, continuation_words=5, num_document_negatives=4, pairs_per_document=3, seed=3),
    )
    assert len(rows) == 3  # the short document is skipped
    for row in rows:
        prefix, gold = row["prefix"].split(), row["continuation"].split()
        assert len(prefix) == 10 and len(gold) == 5 and len(row["negatives"]) == 4
        split = int(gold[0][1:])
        assert int(prefix[-1][1:]) == split - 1  # the gold continues the prefix
        used = set(prefix) | set(gold)
        for negative in row["negatives"]:
            assert len(negative.split()) == 5 and not used & set(negative.split())
    with pytest.raises(ValueError, match="prefix_words"):
        PairConfig(prefix_words=0)
    with pytest.raises(TypeError, match="item 0"):
        make_pairs([3])


def test_as_pairs_dataset_accepts_documents_and_ready_pairs():
    docs = datasets.Dataset.from_dict({"body": TRAIN_DOCS[:5]})
    with pytest.raises(ValueError, match="'prefix' and 'continuation'"):
        as_pairs_dataset(docs)
    pairs = as_pairs_dataset(docs, PairConfig(text_column="body", **PAIRS))
    assert set(pairs.column_names) == {"prefix", "continuation", "negatives"} and len(pairs) > 0
    ready = as_pairs_dataset([{"prefix": "a b", "continuation": "c d"}])
    assert ready[0]["negatives"] == []
    with pytest.raises(ValueError, match="long enough"):
        as_pairs_dataset(["one two three"], PairConfig(**PAIRS))


def test_collator_layout(tok):
    rows = [
        {"prefix": "the class", "continuation": "is a type", "negatives": ["a b", "c d"], "generated_negatives": ["x"]},
        {"prefix": "import", "continuation": "the module", "negatives": ["e"], "generated_negatives": ["y z"]},
    ]
    collate = RankGenCollator(tok, max_prefix_tokens=3, max_suffix_tokens=64)
    batch = collate(rows)
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert texts == [
        "pre the class",
        "pre import </s>",
        "suffi is a type </s>",
        "suffi the module </s>",
        "suffi a b </s>",
        "suffi c d </s>",
        "suffi x </s>",
        "suffi e </s>",
        "suffi y z </s>",
    ]
    assert batch["num_prefixes"].tolist() == [2] and batch["gold_index"].tolist() == [0, 1]
    # right padding: position 0 is always a real token
    assert bool(batch["attention_mask"][:, 0].all())
    without = RankGenCollator(tok, use_document_negatives=False, use_generated_negatives=False)(rows)
    assert without["input_ids"].shape[0] == 4


def test_one_padded_forward_equals_separate_encodings(tok):
    """The trainer embeds prefixes and candidates in one right-padded call; that must equal the scorer's encodings."""
    scorer = tiny_scorer(tok).eval()
    rows = make_pairs(TRAIN_DOCS[:6], PairConfig(**PAIRS))
    config = RankGenTrainingConfig()
    batch = config.collator(scorer, tok)(rows)
    trainer = RankGenTrainer(model=scorer, args=args_for("/tmp/unused"), data_collator=config.collator(scorer, tok))
    with torch.no_grad():
        loss = trainer.compute_loss(scorer, batch)
    p = scorer.encode_prefix([r["prefix"] for r in rows])
    c = scorer.encode_suffix([r["continuation"] for r in rows] + [n for r in rows for n in r["negatives"]])
    expected = reference_loss(p.double(), c.double(), list(range(len(rows))))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 3. training


def topic_documents(tok, n_docs: int, seed: int) -> list[str]:
    """Documents on 10 topics, each drawing its words from its own 20-word vocabulary (real words of the tokenizer).

    A scorer can only tell a held-out document's continuation from another document's by learning which words go
    together; an untrained encoder is at chance.
    """
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) > 3)[:200]
    topics_ = [words[i::10] for i in range(10)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(topics_[i % 10]) for _ in range(120)) for i in range(n_docs)]


def other_document_accuracy(scorer, docs: list[str]) -> float:
    rows = make_pairs(docs, PairConfig(prefix_words=32, continuation_words=16, num_document_negatives=0, seed=7))
    negatives = [[rows[(i + 1 + i % 9) % len(rows)]["continuation"]] for i in range(len(rows))]  # another topic
    scorer.eval()
    result = identification_accuracy(scorer, [r["prefix"] for r in rows], [r["continuation"] for r in rows], negatives)
    return result["accuracy"]


def test_training_improves_heldout_identification(tok, tmp_path):
    scorer = tiny_scorer(tok)
    heldout = topic_documents(tok, 60, seed=1)
    before = other_document_accuracy(scorer, heldout)
    config = RankGenTrainingConfig(pairs_per_document=2, **PAIRS)
    trainer = train_rankgen(
        scorer,
        topic_documents(tok, 80, seed=0),
        args_for(tmp_path, max_steps=60, logging_steps=20),
        config,
        eval_data=heldout,
    )
    after = other_document_accuracy(scorer, heldout)
    # 2-way choices on held-out documents, chance 0.5
    assert before < 0.75 and after >= 0.9, (before, after)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_identification_accuracy"} <= set(metrics)
    # the gold among a batch's 32 candidates, 3 of them same-topic spans of the same document: chance is 1/32
    assert metrics["eval_identification_accuracy"] > 2 / 32


def test_resume_from_checkpoint_matches_uninterrupted_run(tok, tmp_path):
    data = as_pairs_dataset(TRAIN_DOCS[:40], PairConfig(**PAIRS))
    data = data.select(range(32))  # 4 batches of 8: checkpoint-2 is mid-epoch
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    config = RankGenTrainingConfig()

    full = tiny_scorer(tok, seed=0)
    train_rankgen(full, data, args_for(tmp_path / "full", **overrides), config)
    final = weights(full)
    saved = load_file(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"))
    assert (tmp_path / "full" / "checkpoint-2" / "tokenizer.json").exists()

    resumed = tiny_scorer(tok, seed=123)  # different init: only the checkpoint can bring it to `final`
    trainer = train_rankgen(
        resumed,
        data,
        args_for(tmp_path / "resumed", **overrides),
        config,
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
    )
    assert trainer.state.global_step == 4
    got = weights(resumed)
    for name in final:
        torch.testing.assert_close(got[name], final[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in final if n in saved and not torch.allclose(final[n], saved[n])]
    assert moved, "training did not continue past the checkpoint"
    reloaded = RankGenScorer.from_pretrained(tmp_path / "full" / "checkpoint-4")
    torch.testing.assert_close(reloaded.projection.weight, final["projection.weight"])


def test_bf16_mixed_precision_trains(tok, tmp_path):
    scorer = tiny_scorer(tok)
    before = weights(scorer)
    trainer = train_rankgen(
        scorer, TRAIN_DOCS[:30], args_for(tmp_path, max_steps=3, bf16=True), RankGenTrainingConfig(**PAIRS)
    )
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    assert scorer.projection.weight.dtype == torch.float32
    assert not torch.equal(before["projection.weight"], scorer.projection.weight)


def test_generated_negatives_from_a_causal_lm(tok):
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    lm = tiny_model("llama", num_hidden_layers=1, max_position_embeddings=256, **ids)
    pairs = as_pairs_dataset(TRAIN_DOCS[:6], PairConfig(**PAIRS))
    side = tok.padding_side
    out = add_generated_negatives(pairs, lm, tok, num_negatives=2, batch_size=4, seed=0)
    assert "generated_negatives" not in pairs.column_names and tok.padding_side == side
    for row in out:
        assert len(row["generated_negatives"]) == 2
        assert all(0 < len(n.split()) <= len(row["continuation"].split()) for n in row["generated_negatives"])
    again = add_generated_negatives(pairs, lm, tok, num_negatives=2, batch_size=4, seed=0)
    assert again["generated_negatives"] == out["generated_negatives"]  # seeded
    config = RankGenTrainingConfig(num_generated_negatives=1, **PAIRS)
    with pytest.raises(ValueError, match="needs a causal LM"):
        train_rankgen(tiny_scorer(tok), TRAIN_DOCS[:6], args_for("/tmp/unused", max_steps=1), config)
    batch = config.collator(tiny_scorer(tok), tok)(list(out.select(range(3))))
    assert batch["input_ids"].shape[0] == 3 + 3 * (1 + 3 + 2)


def test_push_to_hub_pushes_the_trained_scorer(tok, tmp_path, monkeypatch):
    """With TrainingArguments(push_to_hub=True) the final model is pushed (Hub calls replaced by recorders)."""
    calls = []
    monkeypatch.setattr(RankGenTrainer, "init_hf_repo", lambda self, *a, **k: calls.append("init"))
    monkeypatch.setattr(RankGenTrainer, "push_to_hub", lambda self, *a, **k: calls.append("push"))
    args = args_for(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="me/my-rankgen")
    train_rankgen(tiny_scorer(tok), TRAIN_DOCS[:10], args, RankGenTrainingConfig(**PAIRS))
    assert calls == ["init", "push"]


# ---------------------------------------------------------------------------------------------------------------------
# 4. any encoder


def tiny_bert(tok, seed: int = 0) -> BertModel:
    return tiny_bert_encoder(
        len(tok), seed, num_hidden_layers=1, max_position_embeddings=128, pad_token_id=tok.pad_token_id
    )


def test_any_encoder_trains_saves_and_scores(tok, tmp_path):
    scorer = PooledEncoderScorer(tiny_bert(tok), tok, pooling="mean", projection_dim=16, max_suffix_tokens=12)
    collate = RankGenTrainingConfig().collator(scorer, tok)  # budgets from the encoder: 128 positions, 12 suffix tokens
    assert (collate.max_prefix_tokens, collate.max_suffix_tokens) == (128, 12)
    trainer = train_rankgen(
        scorer,
        TRAIN_DOCS[:30],
        args_for(tmp_path / "run", max_steps=20, learning_rate=1e-3, logging_steps=5),
        RankGenTrainingConfig(**PAIRS),
    )
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    scorer.eval()
    scorer.save_pretrained(tmp_path / "saved")
    loaded = PooledEncoderScorer.from_pretrained(tmp_path / "saved").eval()
    prefixes, continuations = ["the class statement", "import a module"], ["defines a type", "binds a name"]
    torch.testing.assert_close(loaded.score(prefixes, continuations), scorer.score(prefixes, continuations))
    expected = (scorer.encode_prefix(prefixes) * scorer.encode_suffix(continuations)).sum(-1)
    torch.testing.assert_close(scorer.score(prefixes, continuations), expected)


def test_encoder_with_the_wrong_output_gets_a_clear_error(tok, tmp_path):
    with pytest.raises(TypeError, match="one vector per row.*PooledEncoderScorer"):
        train_rankgen(
            tiny_bert(tok),
            TRAIN_DOCS[:10],
            args_for(tmp_path, max_steps=1),
            RankGenTrainingConfig(**PAIRS),
            tokenizer=tok,
        )
    with pytest.raises(ValueError, match="tokenizer"):
        train_rankgen(tiny_bert(tok), TRAIN_DOCS[:10], args_for(tmp_path, max_steps=1), RankGenTrainingConfig(**PAIRS))


# ---------------------------------------------------------------------------------------------------------------------
# 5. command line


def test_cli_quick_run_saves_a_loadable_scorer(tmp_path, capsys):
    main(["--quick", "--output_dir", str(tmp_path), "--max_steps", "4"])
    printed = capsys.readouterr().out
    metrics = json.loads(next(line for line in printed.splitlines() if line.startswith("eval metrics: "))[14:])
    assert "eval_identification_accuracy" in metrics
    scorer = RankGenScorer.from_pretrained(tmp_path / "final")
    assert scorer.tokenizer is not None and scorer.score(["pre"], ["suffi"]).shape == (1,)


def test_cli_needs_data_and_model(tmp_path):
    with pytest.raises(ValueError, match="--dataset_path"):
        main(["--output_dir", str(tmp_path), "--t5_config", "{}"])
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in TRAIN_DOCS[:5]))
    with pytest.raises(ValueError, match="--model_name_or_path"):
        main(["--output_dir", str(tmp_path), "--dataset_path", str(data)])
