"""RankGen evaluation: the bundled evaluate modules (offline, from a local path), identification accuracy and the
MAUVE helper with a user-named featuriser. CPU, offline, tiny models."""

from __future__ import annotations

import sys

import evaluate
import numpy as np
import pytest
import torch
from helpers import tiny_bert_encoder, tiny_rankgen_scorer
from transformers import BertModel

from rankgen_logits import RankGenScorer, metrics
from rankgen_logits.mauve import compute_mauve, featurize
from rankgen_logits.metrics import identification_accuracy, resolve_scorer, score_pairs
from rankgen_logits.train import QUICK_T5, _quick_tokenizer

WORDS = "the class statement defines a new type and the import statement binds a module name in scope".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _quick_tokenizer([" ".join(WORDS)] * 3)


@pytest.fixture(scope="module")
def scorer(tok) -> RankGenScorer:
    return tiny_rankgen_scorer(tok, vocab_size=len(tok), pad_token_id=0, **QUICK_T5).eval()


class Overlap:
    """Scores a continuation by how many of its words appear in the prefix (score API only)."""

    def __init__(self):
        self.calls = 0

    def score(self, prefixes, continuations):
        self.calls += 1
        return torch.tensor([float(len(set(p.split()) & set(c.split()))) for p, c in zip(prefixes, continuations)])


class VectorOverlap(Overlap):
    """The same scores through the vector API (bag-of-words vectors over WORDS)."""

    def _vectors(self, texts):
        return torch.tensor([[float(w in t.split()) for w in sorted(set(WORDS))] for t in texts])

    def encode_prefix(self, texts):
        return self._vectors(texts)

    def encode_suffix(self, texts):
        return self._vectors(texts)


PREFIXES = ["the class statement", "the import statement", "a module name"]
GOLDS = ["class defines a type", "import binds a module", "module name in scope"]
NEGATIVES = [["and new"], ["the class type", "in"], ["a"]]


def test_metric_paths_are_bundled_and_unknown_names_refused():
    for name in metrics.METRICS:
        assert metrics.path(name).endswith(name)
    with pytest.raises(ValueError, match="rankgen_score"):
        metrics.path("bleu")


def test_rankgen_score_module_loads_offline_and_matches_direct_scores(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(metrics.path("rankgen_score"), keep_in_memory=True)
    result = module.compute(prefixes=PREFIXES, continuations=GOLDS, scorer=Overlap())
    expected = Overlap().score(PREFIXES, GOLDS)
    assert result["scores"] == expected.tolist()
    assert result["rankgen_score"] == pytest.approx(float(expected.mean()))
    vector = module.compute(prefixes=PREFIXES, continuations=GOLDS, scorer=VectorOverlap())
    assert vector["scores"] == result["scores"]  # both scorer APIs agree
    with pytest.raises(ValueError, match="scorer="):
        module.compute(prefixes=PREFIXES, continuations=GOLDS)


def test_scorer_from_a_local_checkpoint_folder(scorer, tmp_path):
    scorer.save_pretrained(tmp_path / "scorer")
    module = evaluate.load(metrics.path("rankgen_score"), keep_in_memory=True)
    by_path = module.compute(prefixes=PREFIXES, continuations=GOLDS, scorer=str(tmp_path / "scorer"))
    direct = scorer.score(PREFIXES, GOLDS)
    np.testing.assert_allclose(by_path["scores"], direct.tolist(), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="scorer must be"):
        resolve_scorer(3)


def test_continuation_accuracy_module(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(metrics.path("continuation_accuracy"), keep_in_memory=True)
    result = module.compute(prefixes=PREFIXES, continuations=GOLDS, negatives=NEGATIVES, scorer=Overlap())
    direct = identification_accuracy(Overlap(), PREFIXES, GOLDS, NEGATIVES)
    assert result == direct
    # by hand (gold vs negatives): 1 vs [0]; 1 vs [1, 0] (a tie: not identified); 2 vs [1]
    assert direct["accuracy"] == pytest.approx(2 / 3)
    assert direct["pairwise_accuracy"] == pytest.approx(3 / 4)
    assert direct["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert direct["num_examples"] == 3 and direct["num_pairs"] == 4


def test_identification_accuracy_extremes_and_errors():
    class Oracle:
        def score(self, prefixes, continuations):
            return torch.tensor([1.0 if c in GOLDS else 0.0 for c in continuations])

    class Anti(Oracle):
        def score(self, prefixes, continuations):
            return -super().score(prefixes, continuations)

    assert identification_accuracy(Oracle(), PREFIXES, GOLDS, NEGATIVES)["accuracy"] == 1.0
    assert identification_accuracy(Anti(), PREFIXES, GOLDS, NEGATIVES)["pairwise_accuracy"] == 0.0
    with pytest.raises(ValueError, match="no negatives"):
        identification_accuracy(Oracle(), PREFIXES, GOLDS, [["x"], [], ["y"]])
    with pytest.raises(ValueError, match="same length"):
        identification_accuracy(Oracle(), PREFIXES, GOLDS[:2], NEGATIVES)
    with pytest.raises(ValueError, match="pair up"):
        score_pairs(Oracle(), PREFIXES, GOLDS[:1])


def test_score_pairs_encodes_each_prefix_once():
    calls = []

    class Counting(VectorOverlap):
        def encode_prefix(self, texts):
            calls.append(list(texts))
            return super().encode_prefix(texts)

    scores = score_pairs(Counting(), [PREFIXES[0]] * 5, GOLDS[:1] * 5, batch_size=2)
    assert calls == [[PREFIXES[0]]] and scores.shape == (5,)


# ---------------------------------------------------------------------------------------------------------------------
# MAUVE


def tiny_bert(tok) -> BertModel:
    shape = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return tiny_bert_encoder(len(tok), **shape).eval()


def test_featurize_mean_and_last_pooling_match_manual(tok):
    model = tiny_bert(tok)
    texts = ["the class", "the import statement binds a module"]
    feats = featurize(texts, model, tok, pooling="mean")
    last = featurize(texts, model, tok, pooling="last")
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt")
            hidden = model(**ids).last_hidden_state[0]
            np.testing.assert_allclose(feats[i], hidden.mean(0).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(last[i], hidden[-1].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        featurize(texts, model, tok, pooling="max")
    with pytest.raises(ValueError, match="tokenizer"):
        featurize(texts, model)


def test_compute_mauve_separates_same_from_different_text(tok):
    pytest.importorskip("mauve")
    words = sorted(set(WORDS))

    def texts(vocab, n, seed):
        r = np.random.default_rng(seed)
        return [" ".join(r.choice(vocab, size=8)) for _ in range(n)]

    model = tiny_bert(tok)
    same = compute_mauve(texts(words, 60, 1), texts(words, 60, 2), model, tok, num_buckets=4)
    different = compute_mauve(texts(words[:5], 60, 1), texts(words[-5:], 60, 2), model, tok, num_buckets=4)
    assert same.mauve > 0.8 and different.mauve < same.mauve - 0.3, (same.mauve, different.mauve)


def test_missing_mauve_package_says_how_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "mauve", None)
    with pytest.raises(ImportError, match="pip install mauve-text"):
        compute_mauve(["a"], ["b"], tiny_bert(tok), tok)
