"""Training examples for a RankGen scorer: prefixes, gold continuations and negatives, and the batch collator.

RankGen (Krishna et al., 2022) trains its encoder contrastively: a prefix should score its true continuation higher
than other continuations. The negatives are

* **in-document negatives**: other continuation-sized spans of the *same* document (same topic and style, so the
  scorer must learn coherence, not topic matching);
* **generated negatives**: continuations of the same prefix sampled from a causal LM (so the scorer learns to
  prefer human text over model text, the property generation exploits);
* and, implicitly, every other continuation in the batch (in-batch negatives).

This module turns documents into ``{"prefix", "continuation", "negatives"}`` rows (:func:`make_pairs`), adds
``"generated_negatives"`` with a causal LM (:func:`add_generated_negatives`), and collates rows into one padded batch
of prefixes followed by continuations (:class:`RankGenCollator`). Lengths are counted in whitespace-separated words,
independent of any tokenizer; the collator then cuts each text to the scorer's token budget.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = ["PairConfig", "make_pairs", "as_pairs_dataset", "add_generated_negatives", "RankGenCollator"]

PAIR_COLUMNS = ("prefix", "continuation")


@dataclass
class PairConfig:
    """How :func:`make_pairs` cuts documents into training examples.

    Example:

    ```python
    >>> from rankgen_logits.training_data import PairConfig, make_pairs
    >>> doc = " ".join(f"w{i}" for i in range(40))
    >>> rows = make_pairs([doc], PairConfig(prefix_words=8, continuation_words=4, num_document_negatives=2))
    >>> len(rows), len(rows[0]["continuation"].split()), len(rows[0]["negatives"])
    (1, 4, 2)

    ```
    """

    prefix_words: int = field(default=128, metadata={"help": "Words in a prefix (the text before the split point)."})
    continuation_words: int = field(
        default=64, metadata={"help": "Words in a continuation (gold and negatives alike)."}
    )
    num_document_negatives: int = field(
        default=3,
        metadata={"help": "In-document negatives per example: other continuation-sized spans of the same document."},
    )
    pairs_per_document: int = field(
        default=1, metadata={"help": "Examples cut from each document (different split points)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    seed: int = field(default=0, metadata={"help": "Seed for choosing split points and negatives."})

    def __post_init__(self):
        for name in ("prefix_words", "continuation_words", "pairs_per_document"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PairConfig.{name} must be a positive integer, got {value!r}.")
        if (
            isinstance(self.num_document_negatives, bool)
            or not isinstance(self.num_document_negatives, int)
            or (self.num_document_negatives < 0)
        ):
            raise ValueError(
                f"PairConfig.num_document_negatives must be a non-negative integer, got {self.num_document_negatives!r}."
            )


def _spans(n_words: int, width: int, exclude: tuple[int, int]) -> list[int]:
    """Starts of non-overlapping ``width``-word windows of a document that do not overlap ``[exclude)``."""
    lo, hi = exclude
    return [s for s in range(0, n_words - width + 1, width) if s + width <= lo or s >= hi]


def make_pairs(documents: Iterable[str], config: PairConfig | None = None) -> list[dict[str, Any]]:
    """Cut documents into ``{"prefix", "continuation", "negatives"}`` examples.

    For each document (split on whitespace) a split point ``s`` is drawn so that ``prefix_words`` words precede it and
    ``continuation_words`` follow it: the prefix is the ``prefix_words`` words before ``s``, the gold continuation the
    ``continuation_words`` words from ``s``. The negatives are up to ``num_document_negatives`` other
    continuation-sized windows of the same document that overlap neither the prefix nor the gold. Documents too short
    for a prefix, a gold continuation and (when negatives are asked for) at least one negative are skipped.
    """
    config = config or PairConfig()
    rng = random.Random(config.seed)
    rows: list[dict[str, Any]] = []
    skipped = 0
    p, c = config.prefix_words, config.continuation_words
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"documents must be strings; item {index} is a {type(document).__name__}")
        words = document.split()
        starts = list(range(p, len(words) - c + 1))
        made = 0
        for split in rng.sample(starts, min(config.pairs_per_document, len(starts))):
            negatives = _spans(len(words), c, (split - p, split + c))
            if config.num_document_negatives and not negatives:
                continue
            chosen = sorted(rng.sample(negatives, min(config.num_document_negatives, len(negatives))))
            rows.append(
                {
                    "prefix": " ".join(words[split - p : split]),
                    "continuation": " ".join(words[split : split + c]),
                    "negatives": [" ".join(words[s : s + c]) for s in chosen],
                }
            )
            made += 1
        skipped += made == 0
    if skipped:
        logger.info(f"make_pairs: {skipped} document(s) too short for a prefix, a continuation and a negative")
    return rows


def require_datasets():
    """The ``datasets`` module, which only training needs: an ImportError that says how to install it otherwise."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "Training RankGen scorers needs the `datasets` package: pip install 'peft-ntk-rankgen[train]' "
            "(or pip install datasets)."
        ) from err
    return datasets


def as_pairs_dataset(data: Any, config: PairConfig | None = None):
    """A :class:`datasets.Dataset` of training examples from documents or ready-made pairs.

    ``data`` is a ``datasets.Dataset`` (or a list of dicts / strings). A dataset with ``prefix`` and ``continuation``
    columns is taken as ready-made pairs (``negatives`` / ``generated_negatives`` list columns are kept; a missing
    ``negatives`` column becomes empty lists); otherwise ``config.text_column`` holds documents for
    :func:`make_pairs`.
    """
    datasets = require_datasets()
    config = config or PairConfig()
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(d, str) for d in data):
            data = datasets.Dataset.from_dict({config.text_column: list(data)})
        else:
            data = datasets.Dataset.from_list(list(data))
    if not isinstance(data, datasets.Dataset):
        raise TypeError(
            f"Expected a datasets.Dataset (or a list of documents / of dicts), got {type(data).__name__}; for a "
            "DatasetDict pick the split, e.g. data['train']."
        )
    columns = set(data.column_names)
    if set(PAIR_COLUMNS) <= columns:
        if "negatives" not in columns:
            data = data.add_column("negatives", [[] for _ in range(len(data))])
        return data
    if config.text_column not in columns:
        raise ValueError(
            f"The dataset has columns {sorted(columns)}: it needs either 'prefix' and 'continuation' (ready-made "
            f"pairs) or a document column named {config.text_column!r} (set PairConfig.text_column / --text_column)."
        )
    rows = make_pairs(data[config.text_column], config)
    if not rows:
        raise ValueError(
            f"No document is long enough for prefix_words={config.prefix_words} + continuation_words="
            f"{config.continuation_words} (+ a negative): lower them or give longer documents."
        )
    return datasets.Dataset.from_list(rows)


@torch.no_grad()
def add_generated_negatives(
    dataset,
    model,
    tokenizer,
    *,
    num_negatives: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    **generate_kwargs,
):
    """Return ``dataset`` with a ``generated_negatives`` column: ``num_negatives`` samples of ``model`` per prefix.

    Each prefix is continued by the causal LM ``model`` (sampling; ``top_p=0.9`` unless ``generate_kwargs`` say
    otherwise) for ``max_new_tokens`` tokens (default: the gold continuation's length in ``tokenizer`` tokens, the
    longest in the batch), and each sample is cut to the gold continuation's number of words, so that length gives
    nothing away. ``dataset`` itself is not changed.

    Example:

    ```python
    >>> rows = add_generated_negatives(rows, lm, lm_tokenizer, num_negatives=2)  # doctest: +SKIP
    >>> rows[0]["generated_negatives"]  # doctest: +SKIP
    ['... two sampled continuations ...']

    ```
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if tokenizer.pad_token_id is None:
        raise ValueError("The generator's tokenizer has no pad token: set `tokenizer.pad_token = tokenizer.eos_token`.")
    generate_kwargs = {"do_sample": True, "top_p": 0.9, "top_k": 0, **generate_kwargs}
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out: list[list[str]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            prefixes, golds = rows["prefix"], rows["continuation"]
            budget = max_new_tokens or max(len(tokenizer(g, add_special_tokens=False)["input_ids"]) for g in golds)
            inputs = tokenizer(prefixes, return_tensors="pt", padding=True).to(device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            ids = model.generate(
                **inputs,
                max_new_tokens=max(1, budget),
                num_return_sequences=num_negatives,
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            texts = tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, gold in enumerate(golds):
                words = len(gold.split())
                samples = texts[i * num_negatives : (i + 1) * num_negatives]
                out.append([" ".join(t.split()[:words]) for t in samples])
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    if "generated_negatives" in dataset.column_names:
        dataset = dataset.remove_columns("generated_negatives")
    return dataset.add_column("generated_negatives", out)


def tokenize_head(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (special tokens included), cut to the first ``max_tokens``, as RankGenScorer reads them."""
    encoded = tokenizer(list(texts), add_special_tokens=True, padding=False, truncation=False, verbose=False)
    ids = [list(row[:max_tokens]) for row in encoded["input_ids"]]
    for text, row in zip(texts, ids):
        if not row:
            raise ValueError(f"The tokenizer produced no tokens for {text!r}")
    return ids


@dataclass
class RankGenCollator:
    """Collates ``{"prefix", "continuation", "negatives"[, "generated_negatives"]}`` rows for one forward pass.

    The batch's ``P`` prefixes (``prefix_prompt + prefix``, first ``max_prefix_tokens`` tokens) come first, then its
    ``C`` candidate continuations (``suffix_prompt + text``, first ``max_suffix_tokens`` tokens): the ``P`` gold
    continuations in row order, then every row's negatives. All ``P + C`` rows are right padded to one width (so one
    encoder call embeds them: position 0 is always the first real token, and masked padding does not change it).
    ``gold_index[i]`` is the column of prefix ``i``'s gold continuation among the ``C`` candidates.

    Returns ``input_ids``, ``attention_mask`` (``(P + C, width)``), ``num_prefixes`` (``(1,)``) and ``gold_index``
    (``(P,)``).
    """

    tokenizer: Any
    prefix_prompt: str = "pre "
    suffix_prompt: str = "suffi "
    max_prefix_tokens: int = 512
    max_suffix_tokens: int = 128
    use_document_negatives: bool = True
    use_generated_negatives: bool = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("RankGenCollator got an empty batch")
        for key in PAIR_COLUMNS:
            if any(key not in row for row in rows):
                raise KeyError(f"Every row needs {PAIR_COLUMNS}; a row is missing {key!r} (rows: {sorted(rows[0])})")
        prefixes = [self.prefix_prompt + row["prefix"] for row in rows]
        candidates = [row["continuation"] for row in rows]
        for row in rows:
            if self.use_document_negatives:
                candidates += list(row.get("negatives") or [])
            if self.use_generated_negatives:
                candidates += list(row.get("generated_negatives") or [])
        suffixes = [self.suffix_prompt + text for text in candidates]
        ids = tokenize_head(self.tokenizer, prefixes, self.max_prefix_tokens)
        ids += tokenize_head(self.tokenizer, suffixes, self.max_suffix_tokens)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_prefixes": torch.tensor([len(rows)]),
            "gold_index": torch.arange(len(rows)),
        }
