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

Device→host synchronisations: on a GPU every value the host reads from the device (``bool(t)``, ``.item()``,
``.tolist()``, a boolean-mask index) waits for the whole queue of kernels to finish. :meth:`TokenSampler.sample` reads
the device ONCE per call in the common case: it draws from the first candidates speculatively, then reads, in one
``tolist()``, whether some row's logits are not finite, whether top-k has ties at its boundary, whether every nucleus
fit, the next step's candidate count, and whatever flags the caller asks for about the drawn tokens (RankGen's loop
adds its stopping check). Only when a nucleus did not fit (or top-k ties) does it restore the random generator and
redo the step exactly as the sequential algorithm (:meth:`TokenSampler.candidates_and_probabilities`) would, so the
tokens for a given seed are the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def _any_not_finite(log_total: torch.Tensor) -> torch.Tensor:
    """0-d bool on the device: whether some entry is NaN or ±inf (``x · 0`` is 0 exactly when ``x`` is finite)."""
    return (log_total * 0).sum() != 0


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
    # the clamp changes nothing for a valid row; it keeps a row of NaN (drawn speculatively, before the check that
    # raises for it) from indexing past its candidates, which on a GPU would be a device-side assert
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _rng_state(device: torch.device) -> torch.Tensor | None:
    """The state of the generator ``torch.rand`` uses on ``device`` (read on the host, no synchronisation), or
    ``None`` where it cannot be saved."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class _FirstPass:
    """The sampler's work on every row with the first candidates, before anything is read on the host.

    ``ids``/``probs``: as in a group of :meth:`TokenSampler.candidates_and_probabilities` (valid when the checks pass);
    ``log_total``: the rows' normalisers (all must be finite); ``ties``: 0-d bool, top-k has ties at its boundary (then
    transformers' warpers run instead); ``fits``: (rows,) bool, the nucleus ended within ``width`` candidates (``None``
    when that is certain); ``typical``: 0-d, the 0.9-quantile of the kept sizes, which sizes the next step's candidates
    when every row fit; ``width``/``k``: the candidates taken and the most top-k allows."""

    def __init__(self, scores, log_total, ids=None, probs=None, ties=None, fits=None, width=None, k=None, typical=None):
        self.scores, self.log_total, self.ids, self.probs = scores, log_total, ids, probs
        self.ties, self.fits, self.width, self.k, self.typical = ties, fits, width, k, typical

    def flags(self) -> list[torch.Tensor]:
        flags = [_any_not_finite(self.log_total)]
        if self.ties is not None:
            flags.append(self.ties)
        if self.fits is not None:
            flags.append(self.fits)  # per row: a redo needs to know which rows to keep
        if self.typical is not None:
            flags.append(self.typical)
        return flags

    @property
    def may_redo(self) -> bool:
        """Whether the host's reading can send the step down another path (then the draw is redone)."""
        return self.ties is not None or self.fits is not None


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
        """The next token of every row: ``(rows,)``. One device→host synchronisation in the common case."""
        return self.sample(input_ids, logits)[0]

    def sample(
        self,
        input_ids: torch.LongTensor,
        logits: torch.Tensor,
        follow: Callable[[torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
    ) -> tuple[torch.LongTensor, Any, list]:
        """The next token of every row, and ``follow``'s work on them, with ONE device→host read in the common case.

        ``follow(tokens) -> (result, flags)``: device work on the drawn tokens whose 1-d ``flags`` (bool, integer or
        float; exactly representable in float64) the caller needs on the host; they are read together with the
        sampler's own checks. Returns ``(tokens, result, flags as a list of floats)``. When the first candidates
        turn out too few for some row's nucleus (or top-k has ties), the random generator is restored and the step
        is redone as :meth:`candidates_and_probabilities` describes (more reads), and ``follow`` is called again on
        the final tokens: it must be free of side effects. The tokens are those of the sequential algorithm either
        way: same seed, same tokens.
        """
        device = logits.device
        first = self._first_pass(input_ids, logits)
        state = _rng_state(device) if first.may_redo else None
        if first.may_redo and state is None:  # no generator state to restore here: decide first, then draw
            groups = self._resolve(input_ids, first, self._read(first.flags()))
            return self._finish(self._draw_groups(groups, logits), follow)
        tokens = self._draw(first.ids, first.probs)
        result, extra = follow(tokens) if follow is not None else (None, None)
        own = first.flags()
        # the one device→host synchronisation of the common case
        values = self._read(own if extra is None else [*own, extra])
        mine = sum(flag.numel() for flag in own)
        own_values, extra_values = values[:mine], values[mine:]
        groups = self._resolve(input_ids, first, own_values)
        if groups is None:  # every row drawn from the first candidates: done
            return tokens, result, extra_values
        _set_rng_state(device, state)  # redo the draw as the sequential algorithm makes it
        return self._finish(self._draw_groups(groups, logits), follow)

    @staticmethod
    def _read(flags: list[torch.Tensor]) -> list[float]:
        return torch.cat([f.reshape(-1).to(torch.float64) for f in flags]).tolist()

    @staticmethod
    def _finish(tokens, follow):
        if follow is None:
            return tokens, None, []
        result, extra = follow(tokens)
        return tokens, result, torch.as_tensor(extra).reshape(-1).to(torch.float64).tolist()

    @staticmethod
    def _draw(ids, probs) -> torch.Tensor:
        choice = draw(probs)
        return choice if ids is None else ids.gather(1, choice[:, None]).squeeze(1)

    def _draw_groups(self, groups, logits) -> torch.Tensor:
        if len(groups) == 1 and groups[0][0] is None:
            return self._draw(groups[0][1], groups[0][2])
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for rows, ids, probs in groups:
            tokens[rows] = self._draw(ids, probs)
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
        first = self._first_pass(input_ids, logits)
        groups = self._resolve(input_ids, first, self._read(first.flags()))
        if groups is None:
            groups = [(None, first.ids, first.probs)]
        every_row = torch.arange(logits.shape[0], device=logits.device)
        return [(every_row if rows is None else rows, ids, probs) for rows, ids, probs in groups]

    def _first_pass(self, input_ids, logits) -> _FirstPass:
        """Everything up to the first host decision, for every row; nothing is read on the host."""
        scores = self.head(input_ids, logits) if len(self.head) else logits
        if self.nucleus is None:
            log_total = torch.logsumexp(scores.to(torch.float64), dim=-1, keepdim=True)
            return _FirstPass(scores, log_total.squeeze(1), probs=torch.exp(scores.to(torch.float64) - log_total))
        vocab = scores.shape[-1]
        top_k, top_p = self.nucleus.top_k, self.nucleus.top_p
        k = vocab if top_k is None else min(top_k, vocab)
        if top_k is not None and k < vocab:
            values, ids = torch.topk(scores, k)
            # transformers keeps every token that ties with the k-th score; then the candidates are not the kept set
            ties = ((scores >= values[:, -1:]).sum(-1) > k).any()
            log_total = torch.logsumexp(values.to(torch.float64), dim=-1, keepdim=True)
            probs = self._nucleus(values, log_total, final=True)[0]
            return _FirstPass(scores, log_total.squeeze(1), ids=ids, probs=probs, ties=ties)
        # float32 is enough for the normaliser (transformers' own softmax is float32) and 5x cheaper over a vocabulary
        work = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
        log_total = torch.logsumexp(work, dim=-1, keepdim=True).to(torch.float64)
        if top_p is None:  # top_k >= vocab: nothing is filtered
            return _FirstPass(scores, log_total.squeeze(1), probs=torch.exp(scores.to(torch.float64) - log_total))
        width = min(max(self.candidates, self.nucleus.min_tokens_to_keep), k)
        values, ids = torch.topk(scores, width)
        probs, fits = self._nucleus(values, log_total, final=width == k)
        typical = torch.quantile((probs > 0).sum(-1).float(), 0.9)  # sizes the next step when every row fit
        return _FirstPass(scores, log_total.squeeze(1), ids, probs, fits=fits, width=width, k=k, typical=typical)

    def _resolve(self, input_ids, first: _FirstPass, values: list[float]):
        """Act on the host's reading of ``first.flags()``: ``None`` when every row is drawn from the first candidates
        (the common case), else the groups of :meth:`candidates_and_probabilities`. Raises for non-finite rows."""
        bad, rest = values[0], values[1:]
        if first.ties is not None:
            if rest[0]:
                return [(None, None, self._softmax(self.tail(input_ids, first.scores)))]
            rest = rest[1:]
        if bad:
            _check_rows(first.log_total)  # raises, naming the rows
        if first.fits is not None:
            fit, rest = rest[: len(first.fits)], rest[len(first.fits) :]
            if not all(fit):
                return self._redo_nucleus(first, fit)
        if first.typical is not None:
            self._next_candidates(int(rest[0]))
        return None

    def _redo_nucleus(self, first: _FirstPass, fit: list[float]):
        """Some rows' nucleus did not fit in the first candidates (``fit``: read per row): the sequential algorithm
        from there on. Each round keeps the rows that fit as a group and redoes the others with four times the
        candidates; one read per round (which rows fit, and the next step's candidate count in case all do)."""
        scores, log_total, k, device = first.scores, first.log_total[:, None], first.k, first.scores.device
        groups, pending, width = [], torch.arange(scores.shape[0], device=device), first.width
        ids, probs = first.ids, first.probs
        while True:
            keep = torch.tensor([i for i, f in enumerate(fit) if f], dtype=torch.long, device=device)
            if len(keep):
                groups.append((pending[keep], ids[keep], probs[keep]))
            # only the rows whose nucleus did not fit are redone, with four times the candidates
            redo = torch.tensor([i for i, f in enumerate(fit) if not f], dtype=torch.long, device=device)
            pending, width = pending[redo], min(4 * width, k)
            values, ids = torch.topk(scores[pending], width)
            probs, fits = self._nucleus(values, log_total[pending], final=width == k)
            kept = torch.cat([(p > 0).sum(-1) for _, _, p in groups] + [(probs > 0).sum(-1)]).float()
            *fit, typical = self._read(([] if fits is None else [fits]) + [torch.quantile(kept, 0.9)])
            if all(fit):
                groups.append((pending, ids, probs))
                break
        self._next_candidates(int(typical))
        return groups

    def _next_candidates(self, typical: int) -> None:
        # the next step starts with room for twice the nucleus of 9 rows in 10
        self.candidates = max(self.initial_candidates, 1 << max(2 * typical - 1, 1).bit_length())

    def _nucleus(self, values, log_total, final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probabilities of the sorted candidates ``values`` after top-p, and which rows' nucleus certainly ends
        within the candidates (``None``: all rows, when ``final``: the candidates are everything top-k allows)."""
        probs = torch.exp(values.to(torch.float64) - log_total)
        top_p = self.nucleus.top_p
        if top_p is None:
            return probs, None
        head_mass = probs.cumsum(-1) - probs  # mass of the better candidates
        kept = head_mass < top_p
        if self.nucleus.min_tokens_to_keep > 0:
            kept[:, : self.nucleus.min_tokens_to_keep] = True
        return torch.where(kept, probs, 0.0), None if final else ~kept[:, -1]

    @staticmethod
    def _softmax(scores: torch.Tensor) -> torch.Tensor:
        """float64 probabilities over the whole vocabulary (the path without candidates)."""
        log_total = torch.logsumexp(scores.to(torch.float64), dim=-1, keepdim=True)
        _check_rows(log_total.squeeze(1))
        return torch.exp(scores.to(torch.float64) - log_total)
