"""RankGen evaluation as ``evaluate`` modules that ship inside the package and load offline from a local path.

* ``rankgen_score``: the mean RankGen score of continuations given their prefixes (and every score);
* ``continuation_accuracy``: how often a scorer ranks the gold continuation of a prefix above its negatives
  (in-document spans or LM samples), the paper's continuation-identification accuracy (Tables 1 and 2).

Both take the scorer at compute time, ``scorer=`` (an object with ``score`` or ``encode_prefix``/``encode_suffix``, or
a local checkpoint folder); nothing is downloaded unless you name a Hub id yourself.

Example:

```python
>>> import evaluate
>>> from rankgen_logits import metrics
>>> rankgen_score = evaluate.load(metrics.path("rankgen_score"))  # doctest: +SKIP
>>> rankgen_score.compute(prefixes=["The cat"], continuations=["sat on the mat."], scorer=my_scorer)  # doctest: +SKIP
{'rankgen_score': ..., 'scores': [...]}

```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["METRICS", "path", "resolve_scorer", "score_pairs", "identification_accuracy"]

METRICS = ("rankgen_score", "continuation_accuracy")
_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The folder of a bundled metric, for ``evaluate.load(path(name))`` (works offline)."""
    if name not in METRICS:
        raise ValueError(f"Unknown RankGen metric {name!r}; the bundled metrics are {METRICS}")
    return os.path.join(_HERE, name)


def resolve_scorer(scorer: Any, tokenizer: Any = None) -> Any:
    """A scorer object from ``scorer``: returned as is when it can score, else loaded from a folder or Hub id.

    A folder with ``pooled_scorer.json`` loads as :class:`rankgen_logits.train.PooledEncoderScorer`; anything else as
    :class:`rankgen_logits.RankGenScorer` (official layout or this package's), with ``tokenizer`` when given.
    """
    if scorer is None:
        raise ValueError(
            "Pass the scorer at compute time: `compute(..., scorer=my_scorer)` with an object that has "
            "`score(prefixes, continuations)` (e.g. rankgen_logits.RankGenScorer), or a local checkpoint folder."
        )
    if callable(getattr(scorer, "score", None)) or callable(getattr(scorer, "encode_suffix", None)):
        return scorer
    if isinstance(scorer, (str, os.PathLike)):
        location = os.fspath(scorer)
        if os.path.isfile(os.path.join(location, "pooled_scorer.json")):
            from ..train import PooledEncoderScorer

            return PooledEncoderScorer.from_pretrained(location).eval()
        from ..scorer import RankGenScorer

        return RankGenScorer.from_pretrained(location, tokenizer=tokenizer).eval()
    raise TypeError(
        f"scorer must be a scorer object (with `score` or `encode_prefix`/`encode_suffix`) or a checkpoint path, got "
        f"{type(scorer).__name__}"
    )


def score_pairs(
    scorer: Any, prefixes: Sequence[str], continuations: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Scores ``(n,)`` (float32, CPU) of ``continuations[i]`` given ``prefixes[i]``; each prefix is encoded once."""
    prefixes, continuations = list(prefixes), list(continuations)
    if len(prefixes) != len(continuations):
        raise ValueError(f"Got {len(prefixes)} prefixes and {len(continuations)} continuations; they must pair up.")
    if not prefixes:
        return torch.empty(0)
    if callable(getattr(scorer, "encode_prefix", None)) and callable(getattr(scorer, "encode_suffix", None)):
        unique: dict[str, int] = {}
        index = [unique.setdefault(p, len(unique)) for p in prefixes]
        p = torch.as_tensor(scorer.encode_prefix(list(unique))).float().cpu()[torch.tensor(index)]
        c = torch.cat(
            [
                torch.as_tensor(scorer.encode_suffix(continuations[i : i + batch_size])).float().cpu()
                for i in range(0, len(continuations), batch_size)
            ]
        )
        scores = (p * c).sum(-1)
    else:
        scores = torch.cat(
            [
                torch.as_tensor(scorer.score(prefixes[i : i + batch_size], continuations[i : i + batch_size]))
                .float()
                .flatten()
                .cpu()
                for i in range(0, len(prefixes), batch_size)
            ]
        )
    if scores.shape != (len(prefixes),):
        raise ValueError(f"The scorer returned {tuple(scores.shape)} scores for {len(prefixes)} pairs")
    return scores


def identification_accuracy(
    scorer: Any,
    prefixes: Sequence[str],
    continuations: Sequence[str],
    negatives: Sequence[Sequence[str]],
    batch_size: int = 32,
) -> dict[str, float]:
    """How often the gold continuation outscores its negatives.

    Returns ``accuracy`` (the gold scores strictly above every one of its negatives: a (1+k)-way choice),
    ``pairwise_accuracy`` (over all gold-negative pairs, the share where the gold scores strictly higher), the chance
    levels of both (``chance``: mean of 1/(1+k); ``pairwise_chance``: 0.5) and the numbers of examples and pairs.
    Examples without negatives are refused (there is nothing to identify).
    """
    prefixes, continuations, negatives = list(prefixes), list(continuations), [list(n) for n in negatives]
    if not len(prefixes) == len(continuations) == len(negatives):
        raise ValueError(
            f"prefixes ({len(prefixes)}), continuations ({len(continuations)}) and negatives ({len(negatives)}) must "
            "have the same length"
        )
    empty = [i for i, n in enumerate(negatives) if not n]
    if empty:
        raise ValueError(f"Example(s) {empty[:10]} have no negatives; every gold needs at least one to compete with.")
    flat_prefixes = [p for p, n in zip(prefixes, negatives) for _ in range(1 + len(n))]
    flat_texts = [t for c, n in zip(continuations, negatives) for t in [c, *n]]
    scores = score_pairs(scorer, flat_prefixes, flat_texts, batch_size).tolist()
    wins = pairs = correct = 0
    start = 0
    for n in negatives:
        gold, rest = scores[start], scores[start + 1 : start + 1 + len(n)]
        start += 1 + len(n)
        correct += all(gold > s for s in rest)
        wins += sum(gold > s for s in rest)
        pairs += len(rest)
    return {
        "accuracy": correct / len(negatives),
        "pairwise_accuracy": wins / pairs,
        "chance": sum(1 / (1 + len(n)) for n in negatives) / len(negatives),
        "pairwise_chance": 0.5,
        "num_examples": len(negatives),
        "num_pairs": pairs,
    }
