"""``generate(..., rankgen=...)``: routes such calls to :func:`rankgen_logits.rankgen_generate`.

``import rankgen_logits`` calls :func:`enable_rankgen_generate`, which wraps ``transformers.GenerationMixin.generate``
(every model class that inherits it, PEFT models whose ``generate`` forwards to the base model, and
``pipeline("text-generation")``). Only calls carrying ``rankgen=`` take the new route; every other call reaches the
original ``generate`` unchanged. :func:`disable_rankgen_generate` puts the original back.

Both replacements are :class:`~rankgen_logits._patching.MethodPatch` es: ``GenerationMixin.generate`` and
``TextGenerationPipeline._forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import GenerationMixin
from transformers.pipelines.text_generation import TextGenerationPipeline

from ._patching import MethodPatch
from .generation import rankgen_generate


def _routing_generate(original: Callable[..., Any]) -> Callable[..., Any]:
    """``generate`` that sends calls carrying ``rankgen=`` to RankGen decoding (see :func:`enable_rankgen_generate`)."""

    def generate(self, *args, rankgen=None, **kwargs):
        if rankgen is None:
            return original(self, *args, **kwargs)
        custom = kwargs.pop("custom_generate", None)
        if custom is not None and custom is not rankgen_generate:
            raise ValueError(
                f"`rankgen=` selects RankGen decoding; it cannot be combined with custom_generate={custom!r}."
            )
        if kwargs.get("streamer") is not None:
            raise ValueError(
                "Streaming is not supported with `rankgen=`: RankGen decoding only knows the final text at the end."
            )
        tokenizer = kwargs.pop("tokenizer", None)
        if kwargs.get("rankgen_tokenizer") is None:
            kwargs["rankgen_tokenizer"] = tokenizer
        kwargs.setdefault("do_sample", True)
        return original(self, *args, custom_generate=rankgen_generate, rankgen=rankgen, **kwargs)

    return generate


def _forward_pipeline_tokenizer(original: Callable[..., Any]) -> Callable[..., Any]:
    """``pipeline("text-generation")`` calls ``generate`` without its tokenizer; RankGen needs it to read candidates,
    so a pipeline call that carries ``rankgen=`` hands the pipeline's own tokenizer on as ``rankgen_tokenizer``."""

    def _forward(self, model_inputs, **generate_kwargs):
        if generate_kwargs.get("rankgen") is not None and self.tokenizer is not None:
            if generate_kwargs.get("rankgen_tokenizer") is None and generate_kwargs.get("tokenizer") is None:
                generate_kwargs["rankgen_tokenizer"] = self.tokenizer
        return original(self, model_inputs, **generate_kwargs)

    return _forward


GENERATE_PATCH = MethodPatch(GenerationMixin, "generate", _routing_generate)
PIPELINE_PATCH = MethodPatch(TextGenerationPipeline, "_forward", _forward_pipeline_tokenizer)
PATCHES = (PIPELINE_PATCH, GENERATE_PATCH)


def rankgen_generate_enabled() -> bool:
    """Whether ``GenerationMixin.generate`` currently routes ``rankgen=`` calls to RankGen decoding."""
    return GENERATE_PATCH.applied


def enable_rankgen_generate() -> None:
    """Let ``model.generate(..., rankgen=...)`` decode with RankGen. Idempotent; undo with :func:`disable_rankgen_generate`.

    With the patch, a ``generate`` call that carries ``rankgen=`` (a :class:`rankgen_logits.RankGenSettings` or a
    bare scorer) becomes ``generate(..., custom_generate=rankgen_generate, rankgen=..., rankgen_tokenizer=...)``:

    - ``tokenizer=`` given to ``generate`` is handed to RankGen decoding as the generator's tokenizer (plain
      ``generate`` drops it before calling a custom decoding function);
    - ``do_sample=True`` is added unless ``do_sample`` is passed (RankGen decoding samples; an explicit
      ``do_sample=False`` is an error);
    - a ``streamer`` is refused (candidates only become final at the end, and ``generate`` would not hand it on).

    Calls without ``rankgen=`` are passed through unchanged.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    >>> import rankgen_logits

    >>> class LikesCats:
    ...     def score(self, prefixes, continuations):
    ...         return torch.tensor([float(c.count("cat")) for c in continuations])

    >>> rankgen_logits.enable_rankgen_generate()
    >>> tok = AutoTokenizer.from_pretrained("openai-community/gpt2")
    >>> model = AutoModelForCausalLM.from_pretrained("openai-community/gpt2")
    >>> inputs = tok(["My neighbour has a pet"], return_tensors="pt")
    >>> out = model.generate(**inputs, rankgen=LikesCats(), tokenizer=tok, max_new_tokens=30, top_p=0.9,
    ...                      pad_token_id=tok.eos_token_id)
    >>> settings = rankgen_logits.RankGenSettings(LikesCats(), tokenizer=tok, mode="rerank", num_samples=8)
    >>> text = pipeline("text-generation", model=model, tokenizer=tok)("My neighbour has a pet", rankgen=settings,
    ...                                                                 max_new_tokens=30)[0]["generated_text"]
    >>> rankgen_logits.disable_rankgen_generate()
    ```
    """
    for patch in PATCHES:
        patch.apply()


def disable_rankgen_generate() -> None:
    """Undo :func:`enable_rankgen_generate` (a no-op when it is not enabled)."""
    for patch in reversed(PATCHES):
        patch.revert()
