"""RankGen ("Improving Text Generation with Large Ranking Models") as a generation strategy for transformers.

Generation API (``rankgen_logits.generation``): RankGen decoding is a ``custom_generate`` callable, so the LM only
proposes and a scorer (anything with ``score(prefixes, continuations) -> Tensor``, see ``rankgen_logits.protocol``)
ranks. One model forward per new token serves every prompt, beam and sample; the prompt is prefilled once and the KV
cache rows of the survivors are reordered after each scoring round.

- ``RankGenSettings(scorer, tokenizer=generator_tokenizer, mode="beam"|"rerank", num_beams=2, num_samples=10,
  rerank_every=20)``;
- ``model.generate(ids, custom_generate=rankgen_generate, rankgen=settings, do_sample=True, max_new_tokens=...)``
  works with no patching;
- ``import rankgen_logits`` wraps ``transformers.GenerationMixin.generate`` so that
  ``model.generate(ids, rankgen=settings_or_scorer, tokenizer=tok, ...)`` works, also through PEFT models and
  ``pipeline("text-generation")``. Only calls that carry ``rankgen=`` change; ``disable_rankgen_generate()`` removes
  the wrapper and ``enable_rankgen_generate()`` puts it back (both idempotent).
"""

from importlib import metadata as _metadata

from .generation import RankGenSettings, rankgen_generate  # noqa: F401
from .hub import push_scorer_to_hub, record_scorer_training_settings  # noqa: F401
from .patch import disable_rankgen_generate, enable_rankgen_generate, rankgen_generate_enabled  # noqa: F401
from .scorer import RankGenConfig, RankGenScorer  # noqa: F401

try:  # one version for both packages: the distribution's (peft_ntk.__version__ is its source)
    __version__ = _metadata.version("peft-ntk-rankgen")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

enable_rankgen_generate()
