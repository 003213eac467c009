"""Drawing the next token of every row in RankGen's decoding loop, with top-k / top-p but without sorting the vocabulary.

transformers samples by running ``TopPLogitsWarper`` (a full sort of every row's vocabulary) and then
``torch.multinomial`` over the whole vocabulary. With a real vocabulary on a CPU that is the most expensive part of a
decoding step for small models: on one thread, 20 rows of 50,257 logits take about 80 ms to sort and sample, about
as long as GPT-2 small's forward for those rows. RankGen draws B·N rows per prompt, so it pays this B·N times per token.

:class:`TokenSampler` keeps the user's logits processors but takes trailing ``TopKLogitsWarper`` /
``TopPLogitsWarper`` off the list and applies them itself, to the ``K`` best candidates of each row from
``torch.topk``: the nucleus is the shortest head of the candidates whose probability reaches ``top_p``, and when a
row's nucleus does not fit in ``K`` candidates, that row is redone with ``4K`` (the next step starts with room for twice
the nucleus of 9 rows in 10). The token is then
drawn from the kept candidates by inverting their cumulative distribution (float64), one uniform number per row.

What stays the same as transformers: the kept set (including tokens tied with the k-th score, which
``TopKLogitsWarper`` keeps) and the probability of every token (the softmax over the kept set), so the distribution
sampled from is the same. What differs: the random numbers are used differently, so a given seed gives other tokens
than ``torch.multinomial``; and at the top-p boundary the head mass is summed from the top rather than the tail from the
bottom, which can differ only when a head mass lies within float rounding (about 1e-7) of ``top_p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

INITIAL_CANDIDATES = 64


@dataclass(frozen=True)
class NucleusSettings:
    """The trailing top-k / top-p filter that :class:`TokenSampler` applies itself (``None``: that filter is off)."""

    top_k: int | None = None
    top_p: float | None = None
    min_tokens_to_keep: int = 1  # top-p's


def _filters_to_minus_inf(warper) -> bool:
    value = getattr(warper, "filter_value", None)
    return isinstance(value, float) and value == -math.inf


def split_processors(processors) -> tuple[LogitsProcessorList, NucleusSettings | None]:
    """Split ``processors`` into the ones to run as they are and a trailing top-k / top-p filter.

    Only exact ``TopKLogitsWarper`` / ``TopPLogitsWarper`` instances (not subclasses) that filter to ``-inf`` and sit at
    the end of the list, in transformers' order (top-k, then top-p), are taken off; anything after them (``min_p``,
    ``typical_p``, a custom processor, ...) keeps the whole list as it is.
    """
    head = list(processors or [])
    top_k = top_p = None
    min_keep = 1
    if head and type(head[-1]) is TopPLogitsWarper and _filters_to_minus_inf(head[-1]):
        warper = head.pop()
        top_p, min_keep = float(warper.top_p), int(warper.min_tokens_to_keep)
    if head and type(head[-1]) is TopKLogitsWarper and _filters_to_minus_inf(head[-1]):
        top_k = int(head.pop().top_k)
    if top_k is None and top_p is None:
        return LogitsProcessorList(head), None
    return LogitsProcessorList(head), NucleusSettings(top_k=top_k, top_p=top_p, min_tokens_to_keep=min_keep)


def _check_rows(log_total: torch.Tensor) -> None:
    bad = ~torch.isfinite(log_total)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        if bool(torch.isnan(log_total[bad]).any()):
            raise ValueError(
                f"RankGen decoding: the logits of row(s) {rows[:10]} are NaN after the logits processors, so no token "
                "can be drawn. The model's forward overflowed or produced NaN (e.g. fp16 weights on a model trained in "
                "bf16); run it in float32/bfloat16, or check custom logits processors."
            )
        raise ValueError(
            f"RankGen decoding: every token of row(s) {rows[:10]} was filtered out (all logits are -inf after the "
            "logits processors), so no token can be drawn. Check `suppress_tokens`, `bad_words_ids`, "
            "`begin_suppress_tokens` and custom logits processors: together they must leave at least one token."
        )


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` (rows, n), non-negative, not necessarily normalised: the smallest ``i`` whose
    cumulative mass exceeds ``u · total`` for a uniform ``u`` in [0, 1). Entries of probability 0 are never drawn."""
    cdf = probs.to(torch.float64).cumsum(-1)
    total = cdf[:, -1:]
    # u < 1 gives u · total < total in float64 (the product rounds to at most total minus one ulp), so a row's last
    # positive entry bounds the draw
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


class TokenSampler:
    """Draws one token per row from ``processors(input_ids, logits)``, with trailing top-k / top-p done on candidates.

    Args:
        processors: the ``LogitsProcessorList`` that ``generate`` built (the user's processors and the sampling
            warpers). Not modified.
        initial_candidates: how many candidates per row ``torch.topk`` starts with for top-p without top-k.

    Example:

    ```python
    >>> import torch
    >>> from transformers.generation.logits_process import LogitsProcessorList, TopPLogitsWarper
    >>> from rankgen_logits.sampling import TokenSampler

    >>> sampler = TokenSampler(LogitsProcessorList([TopPLogitsWarper(top_p=0.9)]))
    >>> logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 0.0, 9.0, 0.0]])
    >>> sampler.probabilities(logits).round(decimals=3)
    tensor([[0.7310, 0.2690, 0.0000, 0.0000],
            [0.0000, 0.0000, 1.0000, 0.0000]], dtype=torch.float64)
    >>> sampler(torch.zeros(2, 1, dtype=torch.long), logits).shape
    torch.Size([2])
    ```
    """

    def __init__(self, processors=None, initial_candidates: int = INITIAL_CANDIDATES):
        if isinstance(initial_candidates, bool) or not isinstance(initial_candidates, int) or initial_candidates < 1:
            raise ValueError(f"initial_candidates must be a positive integer, got {initial_candidates!r}.")
        processors = LogitsProcessorList(processors or [])
        self.head, self.nucleus = split_processors(processors)
        # the warpers taken off, run as they are on the rare rows where candidates cannot stand in for them
        self.tail = LogitsProcessorList(list(processors)[len(self.head) :])
        self.initial_candidates = initial_candidates
        self.candidates = initial_candidates

    def __call__(self, input_ids: torch.LongTensor, logits: torch.Tensor) -> torch.LongTensor:
        """The next token of every row: ``(rows,)``."""
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for rows, ids, probs in self.candidates_and_probabilities(input_ids, logits):
            choice = draw(probs)
            tokens[rows] = choice if ids is None else ids.gather(1, choice[:, None]).squeeze(1)
        return tokens

    def probabilities(self, logits: torch.Tensor, input_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """The full ``(rows, vocab)`` float64 distribution that ``__call__`` samples from (for tests and inspection)."""
        if input_ids is None:
            input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)
        full = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
        for rows, ids, probs in self.candidates_and_probabilities(input_ids, logits):
            probs = probs / probs.sum(-1, keepdim=True)
            full[rows] = probs if ids is None else torch.zeros_like(full[rows]).scatter_(1, ids, probs)
        return full

    def candidates_and_probabilities(
        self, input_ids, logits
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Groups of rows ``(rows, ids, probs)``: the rows' candidate token ids ``(len(rows), K)`` and their
        unnormalised probabilities (0 outside the kept set; proportional to the softmax over it). ``ids`` is ``None``
        when ``probs`` covers the whole vocabulary. Rows whose nucleus needs more candidates form later groups."""
        scores = self.head(input_ids, logits) if len(self.head) else logits
        every_row = torch.arange(scores.shape[0], device=scores.device)
        if self.nucleus is None:
            return [(every_row, None, self._softmax(scores))]
        vocab = scores.shape[-1]
        top_k, top_p = self.nucleus.top_k, self.nucleus.top_p
        k = vocab if top_k is None else min(top_k, vocab)
        if top_k is not None and k < vocab:
            values, ids = torch.topk(scores, k)
            # transformers keeps every token that ties with the k-th score; then the candidates are not the kept set
            if bool(((scores >= values[:, -1:]).sum(-1) > k).any()):
                return [(every_row, None, self._softmax(self.tail(input_ids, scores)))]
            log_total = torch.logsumexp(values.to(torch.float64), dim=-1, keepdim=True)
            _check_rows(log_total.squeeze(1))
            return [(every_row, ids, self._nucleus(values, log_total, final=True)[0])]
        # float32 is enough for the normaliser (transformers' own softmax is float32) and 5x cheaper over a vocabulary
        work = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
        log_total = torch.logsumexp(work, dim=-1, keepdim=True).to(torch.float64)
        _check_rows(log_total.squeeze(1))
        if top_p is None:  # top_k >= vocab: nothing is filtered
            return [(every_row, None, torch.exp(scores.to(torch.float64) - log_total))]
        groups, pending = [], every_row
        width = min(max(self.candidates, self.nucleus.min_tokens_to_keep), k)
        while True:
            subset = scores if len(pending) == len(every_row) else scores[pending]
            values, ids = torch.topk(subset, width)
            probs, fits = self._nucleus(values, log_total[pending], final=width == k)
            if bool(fits.all()):
                groups.append((pending, ids, probs))
                break
            if bool(fits.any()):
                groups.append((pending[fits], ids[fits], probs[fits]))
            # only the rows whose nucleus did not fit are redone, with four times the candidates
            pending, width = pending[~fits], min(4 * width, k)
        # the next step starts with room for twice the nucleus of 9 rows in 10
        kept = torch.cat([(probs > 0).sum(-1) for _, _, probs in groups]).float()
        typical = int(torch.quantile(kept, 0.9)) if len(kept) else 1
        self.candidates = max(self.initial_candidates, 1 << max(2 * typical - 1, 1).bit_length())
        return groups

    def _nucleus(self, values, log_total, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The probabilities of the sorted candidates ``values`` after top-p, and which rows' nucleus certainly ends
        within the candidates (all rows when ``final``: the candidates are everything top-k allows)."""
        probs = torch.exp(values.to(torch.float64) - log_total)
        top_p = self.nucleus.top_p
        if top_p is None:
            return probs, torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        head_mass = probs.cumsum(-1) - probs  # mass of the better candidates
        rank = torch.arange(probs.shape[-1], device=probs.device)
        kept = (head_mass < top_p) | (rank < self.nucleus.min_tokens_to_keep)
        fits = torch.ones_like(kept[:, -1]) if final else ~kept[:, -1]
        return probs.masked_fill(~kept, 0.0), fits

    @staticmethod
    def _softmax(scores: torch.Tensor) -> torch.Tensor:
        """float64 probabilities over the whole vocabulary (the path without candidates)."""
        log_total = torch.logsumexp(scores.to(torch.float64), dim=-1, keepdim=True)
        _check_rows(log_total.squeeze(1))
        return torch.exp(scores.to(torch.float64) - log_total)
