"""What generation needs from a scorer: anything with ``score(prefixes, continuations)``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ContinuationScorer(Protocol):
    """Ranks continuations of prefixes; higher is better.

    ``score(prefixes, continuations)`` takes two equally long lists of strings and returns a float tensor of shape
    ``(len(prefixes),)``: the score of ``continuations[i]`` as a continuation of ``prefixes[i]``. A reward model, an
    embedding model (cosine of the two embeddings) or :class:`rankgen_logits.RankGenScorer` all fit.

    A scorer may also offer ``encode_prefix(texts) -> (n, d)`` and ``encode_suffix(texts) -> (n, d)`` with
    ``score = (prefix_vector * suffix_vector).sum(-1)``; generation then encodes each prompt once instead of every
    round. ``max_suffix_tokens`` (an int) tells generation how much of a continuation the scorer reads, so it can
    slide a window over long continuations.
    """

    def score(self, prefixes: list[str], continuations: list[str]) -> torch.Tensor: ...


def has_vector_api(scorer: object) -> bool:
    return callable(getattr(scorer, "encode_prefix", None)) and callable(getattr(scorer, "encode_suffix", None))
