"""RankGen decoding as a ``custom_generate`` callable for :meth:`transformers.GenerationMixin.generate`.

RankGen (Krishna et al., 2022, "RankGen: Improving Text Generation with Large Ranking Models") lets the language model
only *propose*: it samples candidate continuations, and a separate scorer (any object following
:class:`rankgen_logits.protocol.ContinuationScorer`) decides which of them to keep.

- ``mode="beam"`` (the paper's "beam search", defaults B=2, N=10, L=20): every prompt starts with ``B·N`` sampled rows;
  every ``L`` new tokens each candidate's whole continuation so far is scored against its prompt, the ``B`` best
  (distinct) candidates per prompt survive, and each survivor is continued by ``N`` fresh samples. At the end the best
  candidate is returned.
- ``mode="rerank"``: ``N`` samples of the full length per prompt, scored once at the end; the best is returned.

Unlike a loop around ``generate`` (what the paper's released code does), this runs ONE model forward per new token
for all prompts × beams × samples together, and the prompt is prefilled once: after each scoring round the KV cache
rows of the survivors are copied (``Cache.reorder_cache``) instead of re-tokenising and re-feeding text.
For plain decoder-only models (``sdpa``/``eager`` attention, no sliding window) each prompt's keys/values are kept once
and all its rows attend to them together, merged exactly with each row's own continuation (``shared_prompt.py``);
otherwise every row carries the prompt's cache, grown in place (``kv_cache.py``). Tokens are drawn with the
``generate`` call's own logits processors, except that trailing top-k / top-p are applied to ``torch.topk``
candidates instead of a sort of the whole vocabulary (``sampling.py``: the same distribution, other random draws than
``torch.multinomial``).

Use it either directly, with no patching::

    model.generate(input_ids, custom_generate=rankgen_generate, rankgen=RankGenSettings(scorer, tokenizer=tok),
                   do_sample=True, top_p=0.9, max_new_tokens=60)

or, after :func:`rankgen_logits.enable_rankgen_generate`, as ``model.generate(input_ids, rankgen=..., tokenizer=tok)``
(which also works through PEFT models and ``pipeline("text-generation")``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .kv_cache import use_growing_layers
from .protocol import has_vector_api
from .sampling import TokenSampler
from .shared_prompt import shared_prompt_attention, use_shared_prompt_layers

# A logger under the `transformers` hierarchy, so that `transformers.logging.set_verbosity_*` governs it like the
# warnings that `generate` itself emits.
logger = logging.get_logger("transformers.rankgen_logits.generation")

MODES = ("beam", "rerank")
# stopping criteria without state: calling one twice on a step (when the sampler redoes a draw) changes nothing
PURE_STOPPING_CRITERIA = (EosTokenCriteria, MaxTimeCriteria)
CHARS_PER_TOKEN = 4  # used to measure continuations for `max_suffix_tokens` when the scorer has no `.tokenizer`


@dataclass
class RankGenSettings:
    """How to decode with RankGen.

    Args:
        scorer: ranks continuations; anything with ``score(prefixes, continuations) -> Tensor (n,)`` (higher is
            better), optionally ``encode_prefix`` / ``encode_suffix`` (then each prompt is encoded once per
            ``generate`` call and scores are dot products) and ``max_suffix_tokens`` (then continuations longer than
            that are scored by their last window, with the earlier part appended to the prefix). See
            :class:`rankgen_logits.protocol.ContinuationScorer`.
        tokenizer: the GENERATOR's tokenizer, used to turn prompts and candidates into text for the scorer. It can
            also be given to ``generate`` as ``rankgen_tokenizer=`` (or as ``tokenizer=`` with the patch enabled).
        mode: ``"beam"`` (RankGen beam search) or ``"rerank"`` (sample ``num_samples`` full continuations, return the
            best).
        num_beams: ``B``, candidates kept per prompt after each scoring round (beam mode; ignored in rerank mode).
        num_samples: ``N``, samples drawn from each kept candidate per round (beam mode; the first round draws
            ``B·N`` samples from the prompt), or the number of full samples (rerank mode).
        rerank_every: ``L``, new tokens between scoring rounds (beam mode; rerank mode scores once, at the end).
        scorer_batch_size: at most this many texts per scorer call (``None``: all candidates of a round in one call).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from rankgen_logits import RankGenSettings, rankgen_generate

    >>> class LikesCats:  # any object with score(prefixes, continuations) -> tensor
    ...     def score(self, prefixes, continuations):
    ...         return torch.tensor([float(c.count("cat")) for c in continuations])

    >>> tok = AutoTokenizer.from_pretrained("openai-community/gpt2")
    >>> model = AutoModelForCausalLM.from_pretrained("openai-community/gpt2")
    >>> inputs = tok(["My neighbour has a pet"], return_tensors="pt")
    >>> settings = RankGenSettings(LikesCats(), tokenizer=tok, num_beams=2, num_samples=4, rerank_every=10)
    >>> torch.manual_seed(0)  # doctest: +IGNORE_RESULT
    >>> out = model.generate(**inputs, custom_generate=rankgen_generate, rankgen=settings, do_sample=True,
    ...                      top_p=0.9, max_new_tokens=30, pad_token_id=tok.eos_token_id)
    >>> out.shape[0]
    1
    ```
    """

    scorer: Any
    tokenizer: Any = None
    mode: str = "beam"
    num_beams: int = 2
    num_samples: int = 10
    rerank_every: int = 20
    scorer_batch_size: int | None = None

    def __post_init__(self):
        if self.scorer is None or not (callable(getattr(self.scorer, "score", None)) or has_vector_api(self.scorer)):
            raise ValueError(
                f"RankGenSettings.scorer must have a `score(prefixes, continuations)` method (or `encode_prefix` and "
                f"`encode_suffix`), got {type(self.scorer).__name__}."
            )
        if self.mode not in MODES:
            raise ValueError(f"RankGenSettings.mode must be one of {MODES}, got {self.mode!r}.")
        for name in ("num_beams", "num_samples", "rerank_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RankGenSettings.{name} must be a positive integer, got {value!r}.")
        value = self.scorer_batch_size
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"RankGenSettings.scorer_batch_size must be a positive integer or None, got {value!r}.")
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "batch_decode", None)):
            raise ValueError(
                "RankGenSettings.tokenizer must be the generator's tokenizer (with `decode`/`batch_decode`), got "
                f"{type(self.tokenizer).__name__}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain, JSON-serialisable dict, with the scorer by its folder or Hub id.

        It can be stored next to a ``GenerationConfig``; :meth:`from_dict` loads the scorer again. The generator's
        tokenizer is not part of it: give it to :meth:`from_dict` or to ``generate``.
        """
        location = _location(self.scorer)
        if location is None:
            raise ValueError(
                f"RankGenSettings.to_dict() names the scorer by its folder or Hub id, and this "
                f"{type(self.scorer).__name__} has none (it was not loaded with from_pretrained). Save it first "
                "(`scorer.save_pretrained(folder)`) and load it from there, or keep the settings in code."
            )
        scorer_tokenizer = _location(getattr(self.scorer, "tokenizer", None))
        return {
            "scorer": location,
            "scorer_tokenizer": scorer_tokenizer if scorer_tokenizer != location else None,
            "mode": self.mode,
            "num_beams": self.num_beams,
            "num_samples": self.num_samples,
            "rerank_every": self.rerank_every,
            "scorer_batch_size": self.scorer_batch_size,
        }

    @classmethod
    def from_dict(cls, settings: dict[str, Any], tokenizer: Any = None, scorer: Any = None) -> RankGenSettings:
        """Settings from :meth:`to_dict`'s output: the scorer is loaded from its folder or Hub id (a
        :class:`~rankgen_logits.RankGenScorer`, or a ``PooledEncoderScorer`` folder), unless ``scorer`` is given.

        Args:
            settings: the dict (for example ``json.load`` of a file that :meth:`to_dict` wrote).
            tokenizer: the generator's tokenizer (optional, as for the constructor).
            scorer: an already loaded scorer to use instead of the one the dict names.
        """
        known = {"scorer", "scorer_tokenizer", "mode", "num_beams", "num_samples", "rerank_every", "scorer_batch_size"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(
                f"RankGenSettings.from_dict got unknown keys {unknown}; the known ones are {sorted(known)}."
            )
        if scorer is None:
            if not settings.get("scorer"):
                raise ValueError("RankGenSettings.from_dict needs 'scorer' (a folder or Hub id), or pass scorer=.")
            try:  # absolute, so that the module also works as an exported custom_generate folder
                from rankgen_logits.metrics import resolve_scorer
            except ImportError as err:
                raise ImportError(
                    "Loading a scorer by name needs the peft-ntk-rankgen package; pass the scorer object as scorer="
                ) from err

            scorer = resolve_scorer(settings["scorer"], settings.get("scorer_tokenizer"))
        options = {k: v for k, v in settings.items() if k not in ("scorer", "scorer_tokenizer")}
        return cls(scorer, tokenizer=tokenizer, **options)


def _location(obj: Any) -> str | None:
    """Where ``obj`` (a scorer or tokenizer) was loaded from: its folder or Hub id, or None."""
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    location = getattr(obj, "name_or_path", None) or getattr(getattr(obj, "config", None), "_name_or_path", None)
    return str(location) if location else None


@dataclass
class RankGenDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """What :func:`rankgen_generate` returns with ``return_dict_in_generate=True``.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size * num_return_sequences, sequence_length)`):
            Each prompt (as given, left padding included) followed by its best continuation, right-padded with
            ``pad_token_id`` to a common length.
        sequences_scores (`torch.FloatTensor` of shape `(batch_size * num_return_sequences,)`):
            The RankGen score of each returned sequence, as beam search reports its sequences' scores: the scorer's
            score of the continuation's text (generator tokenizer, special tokens skipped, cut at EOS) as a
            continuation of the prompt's text (windowed as described in :func:`rankgen_generate` when the scorer
            has ``max_suffix_tokens``).

    The per-step fields of :class:`~transformers.generation.GenerateDecoderOnlyOutput` (``scores``, ``logits``,
    ``attentions``, ``hidden_states``, ``cache``) are ``None``: rows are reshuffled between rounds, so per-step values
    would not describe the returned sequences. Reading ``scores`` still returns ``sequences_scores``, with a
    ``FutureWarning``, as earlier versions stored them there; it will be ``None`` from version 0.3.
    """

    sequences_scores: torch.FloatTensor | None = None

    def __getattribute__(self, name: str) -> Any:
        if name == "scores":
            value = super().__getattribute__("scores")
            ranked = super().__getattribute__("sequences_scores")
            if value is None and ranked is not None:
                warnings.warn(
                    "RankGen's score of each returned sequence is now `sequences_scores` (as in beam search); "
                    "`scores` will be None from peft-ntk-rankgen 0.3, as transformers documents it for per-step "
                    "logits. Read `out.sequences_scores` instead.",
                    FutureWarning,
                    stacklevel=2,
                )
                return ranked
            return value
        return super().__getattribute__(name)


@dataclass
class _Candidate:
    tokens: list[int]  # the continuation's token ids (EOS included when it ended on one)
    text: str
    score: float
    finished: bool


@dataclass
class _Plan:
    """What a :func:`rankgen_generate` call decides before decoding and keeps to the end."""

    settings: RankGenSettings
    device: torch.device
    k: int  # num_return_sequences: candidates returned per prompt
    candidates_per_round: int  # rows per prompt after the prefill: B·N (beam) or N (rerank)
    prompt_ids: torch.LongTensor  # (prompts, prompt length), as given: the start of the returned sequences
    pad_token: torch.Tensor | None
    eos_set: set[int]
    pad_finished: bool  # finished rows emit padding (an EOS stopping criterion and a pad token)
    stopping_criteria: StoppingCriteriaList  # without MaxLengthCriteria: `max_new_tokens` bounds the steps
    max_new_tokens: int
    every: int  # new tokens between scoring rounds
    prompt_texts: list[str]
    fresh_cache: bool  # no cache was passed in, or an empty one
    use_cache: bool
    model_length: int = 0  # where the continuation starts in the model's (truncated) rows

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]


@dataclass
class _Rows:
    """The decoding rows between steps; a scoring round replaces them by the survivors' continuations."""

    input_ids: torch.LongTensor  # the model's rows: (truncated) prompt and continuation so far
    model_kwargs: dict  # attention mask, cache, ... with one row per decoding row
    next_logits: torch.Tensor  # float32 logits of each row's next token
    row_prompt: torch.Tensor  # the prompt of each row
    unfinished: torch.Tensor  # 1 for rows still producing tokens in this round
    lengths: torch.Tensor  # tokens each row produced before finishing (its continuation)


def _resolve_settings(rankgen: Any, rankgen_tokenizer: Any) -> RankGenSettings:
    missing_tokenizer = (
        "RankGen decoding needs the generator's tokenizer to turn candidates into text: pass "
        "`rankgen=RankGenSettings(scorer, tokenizer=tok)` or `rankgen_tokenizer=tok` (with "
        "`rankgen_logits.enable_rankgen_generate()`, `tokenizer=tok` works too)."
    )
    if rankgen is None:
        raise ValueError(
            "rankgen_generate needs `rankgen=RankGenSettings(scorer, tokenizer=tok)` (or `rankgen=scorer` with "
            "`rankgen_tokenizer=tok`)."
        )
    if isinstance(rankgen, RankGenSettings):
        if rankgen.tokenizer is None:
            if rankgen_tokenizer is None:
                raise ValueError(missing_tokenizer)
            return RankGenSettings(**{**vars(rankgen), "tokenizer": rankgen_tokenizer})
        return rankgen
    if rankgen_tokenizer is None:
        raise ValueError(missing_tokenizer)
    return RankGenSettings(scorer=rankgen, tokenizer=rankgen_tokenizer)


def _batches(items: list, size: int | None):
    size = size or max(len(items), 1)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_scores(value: Any, expected: int, scorer: Any, what: str, texts: list[str]) -> list[float]:
    """The scorer's output as floats, read from the device once; refused when its size or a value is wrong."""
    scores = torch.as_tensor(value).detach().float().flatten().tolist()
    name = f"{type(scorer).__name__}.{what}"
    if len(scores) != expected:
        raise ValueError(f"The scorer's {name} returned {len(scores)} values for {expected} texts.")
    bad = [i for i, score in enumerate(scores) if not math.isfinite(score)]
    if bad:
        raise ValueError(
            f"The scorer's {name} returned non-finite scores ({', '.join(sorted({str(scores[i]) for i in bad}))}) "
            f"for {len(bad)} of {expected} candidates, e.g. the continuation {texts[bad[0]][:80]!r}. RankGen keeps the "
            "best-scored candidates, so scores must be finite numbers: fix the scorer (an overflow in float16 or a "
            "division by zero are common causes; run it in float32), or map such candidates to a finite low score."
        )
    return scores


def split_for_window(text: str, max_tokens: int, scorer_tokenizer: Any = None) -> tuple[str, str]:
    """Split ``text`` into ``(earlier, window)`` with ``window`` its last ``max_tokens`` tokens.

    Tokens are counted with ``scorer_tokenizer`` when given (character offsets from a fast tokenizer, else decoded
    token slices), otherwise estimated as ``CHARS_PER_TOKEN`` (4) characters per token, with the window moved forward
    to the next space so that it does not start mid-word. ``earlier`` is ``""`` when the text fits.
    """
    if scorer_tokenizer is not None:
        try:
            offsets = scorer_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            ids = scorer_tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= max_tokens:
                return "", text
            return scorer_tokenizer.decode(ids[:-max_tokens]), scorer_tokenizer.decode(ids[-max_tokens:])
        if len(offsets) <= max_tokens:
            return "", text
        start = offsets[len(offsets) - max_tokens][0]
        return text[:start], text[start:]
    max_chars = CHARS_PER_TOKEN * max_tokens
    if len(text) <= max_chars:
        return "", text
    start = len(text) - max_chars
    space = text.find(" ", start)
    if 0 <= space < len(text) - 1:
        start = space
    return text[:start], text[start:]


class _RoundScorer:
    """Scores candidates against their prompts; encodes each prompt once when the scorer has the vector API."""

    def __init__(self, settings: RankGenSettings, prompt_texts: list[str]):
        self.scorer = settings.scorer
        self.batch_size = settings.scorer_batch_size
        self.prompt_texts = prompt_texts
        # `max_continuation_tokens` (RankGenScorer) excludes the "suffi " prompt and </s> from the 128-token budget.
        window = getattr(self.scorer, "max_continuation_tokens", None) or getattr(
            self.scorer, "max_suffix_tokens", None
        )
        self.window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
        self.window_tokenizer = getattr(self.scorer, "tokenizer", None)
        if self.window_tokenizer is not None and not callable(self.window_tokenizer):
            self.window_tokenizer = None
        self.vector = has_vector_api(self.scorer)
        self.prefix_vectors = self._encode(self.scorer.encode_prefix, prompt_texts) if self.vector else None

    def _encode(self, fn, texts: list[str]) -> torch.Tensor:
        parts = [torch.as_tensor(fn(batch)) for batch in _batches(texts, self.batch_size)]
        vectors = torch.cat(parts) if parts else torch.empty(0)
        if vectors.shape[0] != len(texts):
            raise ValueError(f"The scorer's encoder returned {vectors.shape[0]} vectors for {len(texts)} texts.")
        return vectors

    def __call__(self, prompt_index: list[int], texts: list[str]) -> list[float]:
        if not texts:
            return []
        prefixes, suffixes, windowed = [], [], []
        for i, (p, text) in enumerate(zip(prompt_index, texts)):
            earlier, window = (
                ("", text) if self.window is None else split_for_window(text, self.window, self.window_tokenizer)
            )
            prefixes.append(self.prompt_texts[p] + earlier)
            suffixes.append(window)
            if earlier:
                windowed.append(i)
        if not self.vector:
            return [
                score
                for pre, suf in zip(_batches(prefixes, self.batch_size), _batches(suffixes, self.batch_size))
                for score in _as_scores(self.scorer.score(pre, suf), len(pre), self.scorer, "score()", suf)
            ]
        suffix_vectors = self._encode(self.scorer.encode_suffix, suffixes)
        device = self.prefix_vectors.device
        prefix_vectors = self.prefix_vectors[torch.as_tensor(prompt_index, device=device)]
        if windowed:  # the prefix of a windowed candidate includes the earlier part of its continuation
            extra = self._encode(self.scorer.encode_prefix, [prefixes[i] for i in windowed])
            prefix_vectors = prefix_vectors.clone()
            prefix_vectors[torch.as_tensor(windowed, device=device)] = extra.to(prefix_vectors)
        scores = (prefix_vectors.float() * suffix_vectors.to(device).float()).sum(-1)
        return _as_scores(scores, len(texts), self.scorer, "encode_prefix()/encode_suffix()", suffixes)


def _rank(candidates: list[_Candidate], keep: int) -> list[_Candidate]:
    """The best ``keep`` candidates, distinct texts first (ties: earlier candidates win)."""
    ordered = sorted(candidates, key=lambda c: -c.score)
    chosen, seen = [], set()
    for candidate in ordered:
        key = (candidate.text, candidate.finished)
        if key not in seen:
            seen.add(key)
            chosen.append(candidate)
            if len(chosen) == keep:
                break
    return chosen


def _select_rows(model_kwargs: dict, index: torch.Tensor, rows: int) -> dict:
    """Keep/repeat batch rows ``index`` of every batch tensor in ``model_kwargs`` and of the KV cache."""
    for key, value in list(model_kwargs.items()):
        if key == "position_ids" and isinstance(value, torch.Tensor) and value.dim() == 3:  # (3, batch, seq) mrope
            model_kwargs[key] = value[:, index.to(value.device)]
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            model_kwargs[key] = value[index.to(value.device)]
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None:
        if not callable(getattr(cache, "reorder_cache", None)):
            raise TypeError(f"RankGen decoding needs a transformers Cache with `reorder_cache`, got {type(cache)}.")
        cache.reorder_cache(index)
    return model_kwargs


def _check_inputs(model: nn.Module, generation_config, synced_gpus: bool, model_kwargs: dict) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("RankGen decoding supports decoder-only models.")
    if not generation_config.do_sample:
        raise ValueError(
            "RankGen decoding samples candidates and lets the scorer choose, so it needs `do_sample=True` (with "
            "top_p / top_k / temperature as you like); with greedy decoding every sample would be the same. "
            "Pass `do_sample=True` to `generate` (`generate(..., rankgen=...)` through the patch does this by default)."
        )
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(
            f"`num_beams={generation_config.num_beams}` selects transformers' beam search; with RankGen decoding set "
            "the number of beams with `RankGenSettings(num_beams=...)` and leave `num_beams` unset."
        )
    if synced_gpus:
        raise NotImplementedError("RankGen decoding does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP).")
    if model_kwargs.get("inputs_embeds") is not None:
        raise NotImplementedError("RankGen decoding needs `input_ids` (the scorer reads the prompt's text).")
    cache = model_kwargs.get("cache")
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(
            "RankGen decoding changes the number of rows between rounds, which static caches cannot do; use the "
            "default dynamic cache (leave `cache_implementation` unset)."
        )


def _text_config(model: nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _kv_cache_dims(model: nn.Module) -> dict | None:
    """Layers, key/value heads, head size, bytes per element and per-layer windows of the model's KV cache."""
    config = _text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != layers:
        layer_types = ["sliding_attention" if window else "full_attention"] * layers
    windows = [
        window if window and kind in ("sliding_attention", "chunked_attention") else None for kind in layer_types
    ]
    dtype = getattr(model, "dtype", None)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "itemsize": itemsize, "windows": windows}


def predicted_kv_cache_bytes(model: nn.Module, rows: int, length: int) -> int | None:
    """Size of the KV cache for ``rows`` sequences of ``length`` tokens, or ``None`` when the config does not say.

    rows × Σ over layers of (2 × key/value heads × head size × positions × bytes per element), where a sliding-window
    layer keeps at most its window of positions.
    """
    dims = _kv_cache_dims(model)
    if dims is None:
        return None
    positions = sum(length if w is None else min(length, w) for w in dims["windows"])
    return rows * positions * 2 * dims["kv_heads"] * dims["head_dim"] * dims["itemsize"]


CGROUP = "/sys/fs/cgroup"  # where a process in a cgroup v2 container sees its own memory controller


def _cgroup_memory_left() -> int | None:
    """What a memory-limited cgroup v2 container can still take: its limit minus what it uses other than page cache
    (which the kernel reclaims); ``None`` without a limit (``memory.max`` is ``max``) or outside such a container."""
    try:
        limit = int(Path(CGROUP, "memory.max").read_text())
        used = int(Path(CGROUP, "memory.current").read_text())
        stat = dict(line.split() for line in Path(CGROUP, "memory.stat").read_text().splitlines())
        page_cache = int(stat["file"])
    except (OSError, ValueError, KeyError):
        return None
    return max(limit - (used - page_cache), 0)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory that new tensors on ``device`` can still take, or ``None`` where it cannot be told.

    CUDA: free device memory plus what torch's caching allocator holds but does not use. CPU: psutil's available
    memory (``MemAvailable`` on Linux), lowered inside a memory-limited (cgroup v2) container to its limit minus what
    it uses other than page cache, so that the estimate errs on the generous side.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):  # no usable CUDA context: check nothing
            return None
    if device.type != "cpu":
        return None
    try:  # the exported custom_generate folder runs with torch and transformers only
        import psutil
    except ImportError:
        return None
    available = psutil.virtual_memory().available
    # Inside a container MemAvailable is the host's, while the OOM killer enforces the container's limit: without it
    # the check would pass calls that the kernel then kills without a message, the failure the check is there to spare.
    left = _cgroup_memory_left()
    return available if left is None else min(available, left)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _check_memory(
    model: nn.Module,
    settings: RankGenSettings,
    num_prompts: int,
    candidates_per_round: int,
    prompt_length: int,
    max_new_tokens: int,
    device: torch.device,
) -> None:
    """Refuse, before anything is allocated, a call whose KV cache alone cannot fit in the available memory."""
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
        return  # the cache is spread over several devices; one device's free memory says little
    rows = num_prompts * candidates_per_round
    length = prompt_length + max_new_tokens
    needed = predicted_kv_cache_bytes(model, rows, length)
    if needed is None:
        return
    available = available_memory_bytes(device)
    if available is None or needed <= available:
        return
    dims = _kv_cache_dims(model)
    per_prompt = (
        f"num_beams={settings.num_beams} × num_samples={settings.num_samples}"
        if settings.mode == "beam"
        else f"num_samples={settings.num_samples}"
    )
    raise ValueError(
        f"RankGen decoding would need about {_size(needed)} for the KV cache alone, but only {_size(available)} is "
        f"available on {device}. KV cache: {rows} rows ({num_prompts} prompts × {candidates_per_round} candidates, "
        f"{per_prompt}) × {length} positions (prompt {prompt_length} + max_new_tokens {max_new_tokens}) × "
        f"{dims['layers']} layers × 2 (keys, values) × {dims['kv_heads']} key/value heads × {dims['head_dim']} "
        f"(head size) × {dims['itemsize']} bytes. Lower num_samples or num_beams, pass fewer prompts per call (split "
        "the batch), or lower max_new_tokens."
    )


def _max_new_tokens(stopping_criteria: StoppingCriteriaList, generation_config, prompt_length: int) -> int:
    limits = [generation_config.max_length] if generation_config.max_length is not None else []
    limits += [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    if not limits:
        raise ValueError("Set `max_new_tokens` (or `max_length`) for RankGen decoding.")
    return max(1, min(limits) - prompt_length)


def rankgen_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    rankgen: RankGenSettings | Any = None,
    rankgen_tokenizer: Any = None,
    **model_kwargs,
):
    r"""RankGen decoding, called by ``model.generate(..., custom_generate=rankgen_generate, rankgen=...)``.

    ``generate`` prepares everything as for ordinary sampling (generation config, logits processors such as
    top-p / top-k / temperature, stopping criteria, attention mask, position ids, cache) and calls this instead of its
    own sampling loop. Extra arguments:

    Args:
        rankgen (:class:`RankGenSettings` or a scorer): the settings, or a bare scorer (then defaults: beam mode,
            B=2, N=10, L=20, and the tokenizer from ``rankgen_tokenizer``).
        rankgen_tokenizer: the generator's tokenizer, when ``rankgen`` does not carry one. (``generate`` drops its
            own ``tokenizer=`` argument before calling a custom decoding function; the patch from
            :func:`rankgen_logits.enable_rankgen_generate` forwards it here.)

    Behaviour:

    - Sampling only: ``do_sample=False`` raises a ``ValueError`` (the logits processors transformers builds for
      greedy decoding leave out top-p/top-k/temperature, so sampling anyway would silently ignore them).
      ``generate(..., rankgen=...)`` through the patch sets ``do_sample=True`` unless ``do_sample`` is passed.
    - The prompt is prefilled once, with one row per prompt; its last logits are sampled ``B·N`` times (beam mode) or
      ``N`` times (rerank mode) and the cache rows are repeated. Then one forward per new token covers every row.
    - Every ``L`` new tokens (beam mode) and at the end, each candidate's continuation so far is decoded with the
      generator tokenizer (special tokens skipped, cut at EOS) and scored against its prompt's text (decoded from the
      prompt as given, padding removed). The ``B`` best distinct candidates per prompt survive; the cache, attention
      mask and position ids are reordered to the survivors, each repeated ``N`` times — nothing is re-fed.
    - A row that emits EOS (or is stopped by a stopping criterion) emits padding for the rest of its round; if it is
      among a round's survivors it is set aside as a candidate, scored once, and competes in every later round
      without occupying rows. A prompt whose survivors have all finished stops using rows; decoding ends when no
      rows are left or after ``max_new_tokens``.
    - Scorers with ``encode_prefix``/``encode_suffix`` get each prompt encoded once per call. With
      ``max_suffix_tokens``, a longer continuation is scored by its last ``max_suffix_tokens`` tokens, the earlier
      part being appended to the prompt as the prefix (tokens counted with the scorer's ``.tokenizer`` if it has one,
      else estimated as 4 characters per token); such prefixes are encoded per candidate.
    - Prompts longer than ``max_position_embeddings - max_new_tokens`` are truncated from the left for the model
      (a warning is logged); the returned sequences and the scorer still get the whole prompt.
    - Refused with a ``ValueError`` before anything runs: an empty prompt (``input_ids`` of length 0; give at least
      one token, e.g. BOS), a batch row that is all padding (its index is named), and a call whose KV cache alone
      (prompts × candidates per round × layers × 2 × key/value heads × head size × (prompt + ``max_new_tokens``) ×
      bytes per element) exceeds the memory available on the device (``torch.cuda.mem_get_info``; on CPU,
      ``MemAvailable``). ``max_new_tokens=0`` is refused by ``generate`` itself ("must be greater than 0"): RankGen
      has nothing to rank without new tokens, so to get the prompt back unchanged, do not call ``generate``.
    - ``num_return_sequences=k`` returns each prompt's ``k`` best candidates (distinct where possible).
    - Not supported: encoder-decoder models, ``inputs_embeds``, static caches, ``synced_gpus``, transformers'
      ``num_beams``, ``stop_strings`` (``generate`` gives custom decoding functions no tokenizer for them), streaming
      through ``generate`` (when a ``streamer`` is passed directly, the final continuation is put once at the end).

    Returns:
        ``torch.LongTensor`` ``(batch_size * num_return_sequences, sequence_length)``: each prompt as given followed
        by its best continuation (EOS included when it ended on one), right-padded with ``pad_token_id``; or, with
        ``return_dict_in_generate=True``, a :class:`RankGenDecoderOnlyOutput` whose ``sequences_scores`` are the RankGen scores
        of the returned sequences. With a fixed seed (``torch.manual_seed``) and a deterministic scorer the output is
        reproducible.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from rankgen_logits import RankGenSettings, rankgen_generate

    >>> class ShortWords:  # prefers continuations made of short words
    ...     def score(self, prefixes, continuations):
    ...         return torch.tensor([-sum(map(len, c.split())) / max(len(c.split()), 1) for c in continuations])

    >>> tok = AutoTokenizer.from_pretrained("openai-community/gpt2")
    >>> model = AutoModelForCausalLM.from_pretrained("openai-community/gpt2")
    >>> inputs = tok(["The weather today is"], return_tensors="pt")
    >>> torch.manual_seed(0)  # doctest: +IGNORE_RESULT
    >>> out = model.generate(**inputs, custom_generate=rankgen_generate, rankgen=ShortWords(), rankgen_tokenizer=tok,
    ...                      do_sample=True, top_p=0.9, max_new_tokens=40, return_dict_in_generate=True,
    ...                      pad_token_id=tok.eos_token_id)
    >>> out.sequences.shape[0], out.sequences_scores.shape
    (1, torch.Size([1]))
    ```
    """
    # 1. prepare: check the call, keep one row per prompt, read the prompts' text, fit them to the model and memory
    plan, input_ids, model_kwargs = _prepare(
        model, input_ids, stopping_criteria, generation_config, synced_gpus, rankgen, rankgen_tokenizer, model_kwargs
    )
    scorer = _RoundScorer(plan.settings, plan.prompt_texts)
    sampler = TokenSampler(logits_processor)  # top-k / top-p without sorting the vocabulary (see sampling.py)
    # 2. prefill: one forward per prompt, then each prompt's rows of the first round
    rows, decode_cache, shared = _prefill(model, plan, input_ids, generation_config, model_kwargs)
    # 3. decode: sample a token for every row; every `rerank_every` tokens, score the candidates and select survivors
    optimize = getattr(model, "_optimize_model_for_decode", contextlib.nullcontext)
    with optimize(), shared_prompt_attention(model, decode_cache, enabled=shared):
        results = _decode(model, plan, rows, sampler, scorer)
    # 4. output: each prompt as given followed by its best continuation(s)
    return _output(plan, results, generation_config, streamer)


# --------------------------------------------------------------------------------------------------------------------
# 1. prepare


def _prepare(
    model: nn.Module,
    input_ids: torch.LongTensor,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    synced_gpus: bool,
    rankgen: RankGenSettings | Any,
    rankgen_tokenizer: Any,
    model_kwargs: dict,
) -> tuple[_Plan, torch.LongTensor, dict]:
    """Check the call and plan it; returns the plan and the model's inputs: one row per prompt, truncated from the
    left to what the model can attend to. What can be refused without running the model is refused here."""
    settings = _resolve_settings(rankgen, rankgen_tokenizer)
    _check_inputs(model, generation_config, synced_gpus, model_kwargs)
    if input_ids.shape[-1] == 0:
        raise ValueError(
            "RankGen decoding got an empty prompt (input_ids of length 0): the model has nothing to continue. Give "
            "every prompt at least one token, e.g. the tokenizer's BOS token (`input_ids=[[tok.bos_token_id]]`)."
        )
    k, candidates_per_round = _candidates_per_prompt(settings, generation_config, input_ids.shape[0])
    if k > 1:  # generate repeats every prompt num_return_sequences times; RankGen draws its own samples
        rows_in = input_ids.shape[0]
        model_kwargs = _select_rows(model_kwargs, torch.arange(0, rows_in, k, device=input_ids.device), rows_in)
        input_ids = input_ids[::k]
    _check_no_empty_prompt(model_kwargs.get("attention_mask"))
    plan = _plan(settings, generation_config, stopping_criteria, input_ids, model_kwargs, k, candidates_per_round)
    input_ids = _truncate_prompts(model, input_ids, model_kwargs, plan.max_new_tokens, plan.fresh_cache)
    plan.model_length = input_ids.shape[1]
    _check_memory(
        model, settings, plan.num_prompts, candidates_per_round, plan.model_length, plan.max_new_tokens, plan.device
    )
    return plan, input_ids, model_kwargs


def _candidates_per_prompt(settings: RankGenSettings, generation_config: Any, batch_rows: int) -> tuple[int, int]:
    """``(num_return_sequences, candidates ranked per prompt in a round)``; refused when the first exceeds the second
    or does not divide the batch."""
    k = generation_config.num_return_sequences or 1
    candidates_per_round = (
        settings.num_beams * settings.num_samples if settings.mode == "beam" else settings.num_samples
    )
    if k > candidates_per_round:
        raise ValueError(
            f"num_return_sequences={k} is more than the {candidates_per_round} candidates RankGen decoding ranks per "
            "prompt; raise num_samples/num_beams or lower num_return_sequences."
        )
    if batch_rows % k:
        raise ValueError(f"The batch ({batch_rows} rows) is not a multiple of num_return_sequences={k}.")
    return k, candidates_per_round


def _check_no_empty_prompt(attention_mask: Any) -> None:
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"RankGen decoding: prompt row(s) {empty} of the batch are all padding (attention_mask all zeros, "
                "e.g. an empty prompt string), so there is nothing to continue. Drop those rows, or give every prompt "
                "at least one token (e.g. the tokenizer's BOS token)."
            )


def _plan(
    settings: RankGenSettings,
    generation_config: Any,
    stopping_criteria: StoppingCriteriaList,
    prompt_ids: torch.LongTensor,
    model_kwargs: dict,
    k: int,
    candidates_per_round: int,
) -> _Plan:
    """The call's fixed facts: special tokens, stopping, lengths and the prompts' text (padding removed)."""
    device = prompt_ids.device
    pad_token = getattr(generation_config, "_pad_token_tensor", None)
    if pad_token is None and generation_config.pad_token_id is not None:
        pad_token = torch.tensor(generation_config.pad_token_id, device=device)
    eos_tokens = getattr(generation_config, "_eos_token_tensor", None)
    if eos_tokens is None and generation_config.eos_token_id is not None:
        eos_tokens = torch.tensor(generation_config.eos_token_id, device=device)
    if pad_token is not None:
        pad_token = pad_token.to(device)
    max_new_tokens = _max_new_tokens(stopping_criteria, generation_config, prompt_ids.shape[1])
    cache = model_kwargs.get("cache")
    return _Plan(
        settings=settings,
        device=device,
        k=k,
        candidates_per_round=candidates_per_round,
        prompt_ids=prompt_ids,
        pad_token=pad_token,
        eos_set=set() if eos_tokens is None else set(eos_tokens.flatten().tolist()),
        pad_finished=pad_token is not None and any(hasattr(c, "eos_token_id") for c in stopping_criteria),
        stopping_criteria=StoppingCriteriaList(c for c in stopping_criteria if not isinstance(c, MaxLengthCriteria)),
        max_new_tokens=max_new_tokens,
        every=settings.rerank_every if settings.mode == "beam" else max_new_tokens,
        prompt_texts=_prompt_texts(settings.tokenizer, prompt_ids, model_kwargs.get("attention_mask")),
        fresh_cache=cache is None or cache.get_seq_length() == 0,
        use_cache=model_kwargs.get("use_cache", True),
    )


def _prompt_texts(tokenizer: Any, prompt_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> list[str]:
    """Each whole prompt's text for the scorer, padding removed."""
    id_rows = prompt_ids.tolist()
    mask_rows = None if attention_mask is None else attention_mask.tolist()
    texts = []
    for p in range(len(id_rows)):
        ids = id_rows[p] if mask_rows is None else [t for t, m in zip(id_rows[p], mask_rows[p]) if m]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _truncate_prompts(
    model: nn.Module, input_ids: torch.LongTensor, model_kwargs: dict, max_new_tokens: int, fresh_cache: bool
) -> torch.LongTensor:
    """Cut from the left what the model cannot attend to (``model_kwargs`` in place); the scorer and the returned
    sequences keep the whole prompt."""
    max_positions = getattr(_text_config(model), "max_position_embeddings", None)
    num_prompts, prompt_length = input_ids.shape
    if not (max_positions and fresh_cache and prompt_length + max_new_tokens > max_positions):
        return input_ids
    keep = max_positions - max_new_tokens
    if keep < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt within the model's "
            f"max_position_embeddings={max_positions}: lower max_new_tokens below {max_positions}."
        )
    logger.warning(
        f"RankGen decoding: the prompt ({prompt_length} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
        f"model's max_position_embeddings={max_positions}; the prompt is truncated from the left to {keep} "
        "tokens for the generator (the scorer still sees the whole prompt)."
    )
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask = attention_mask[:, -keep:]
    if "token_type_ids" in model_kwargs and model_kwargs["token_type_ids"] is not None:
        model_kwargs["token_type_ids"] = model_kwargs["token_type_ids"][:, -keep:]
    if model_kwargs.get("position_ids") is not None:
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        else:
            positions = torch.arange(keep, device=input_ids.device).unsqueeze(0).expand(num_prompts, -1)
        model_kwargs["position_ids"] = positions
    return input_ids[:, -keep:]


# --------------------------------------------------------------------------------------------------------------------
# 2. prefill


def _prefill(
    model: nn.Module, plan: _Plan, input_ids: torch.LongTensor, generation_config: Any, model_kwargs: dict
) -> tuple[_Rows, Any, bool]:
    """One forward per prompt, then the cache's layout for decoding and the first round's rows: ``B·N`` (beam) or
    ``N`` (rerank) per prompt, all continuing the prompt's last logits. Returns the rows, the cache and whether its
    layers share each prompt's keys/values."""
    attention_mask = model_kwargs.get("attention_mask")  # the prompts' own: the update below appends a column
    if hasattr(model, "_prefill"):
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
    else:  # older transformers
        outputs = model(**model.prepare_inputs_for_generation(input_ids, **model_kwargs), return_dict=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=plan.device)
    del outputs
    # each prompt's keys/values are kept once and attended to by all its rows together (see shared_prompt.py);
    # where that does not apply, every new token is at least written in place (see kv_cache.py)
    decode_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    # the decoding loop's attention masks are the prompt's followed by ones (`_update_model_kwargs_for_generation`
    # appends one per step), so the layers may skip masking the continuations (no mask to build or read per step)
    shared = (
        bool(plan.use_cache)
        and plan.fresh_cache
        and use_shared_prompt_layers(
            model, decode_cache, attention_mask, plan.max_new_tokens, continuation_unmasked=True
        )
    )
    if not shared:
        use_growing_layers(decode_cache, plan.max_new_tokens)
    row_prompt = torch.arange(plan.num_prompts, device=plan.device).repeat_interleave(plan.candidates_per_round)
    model_kwargs = _select_rows(model_kwargs, row_prompt, plan.num_prompts)
    unfinished = torch.ones(len(row_prompt), dtype=torch.long, device=plan.device)
    rows = _Rows(
        input_ids=input_ids[row_prompt],
        model_kwargs=model_kwargs,
        next_logits=next_logits[row_prompt],
        row_prompt=row_prompt,
        unfinished=unfinished,
        lengths=torch.zeros_like(unfinished),
    )
    return rows, decode_cache, shared


# --------------------------------------------------------------------------------------------------------------------
# 3. decode: sample / score / select, one forward per step


def _decode(
    model: nn.Module, plan: _Plan, rows: _Rows, sampler: TokenSampler, scorer: _RoundScorer
) -> list[list[_Candidate]]:
    """Decode until every prompt's candidates are final; returns each prompt's best ``num_return_sequences``.

    Device→host reads per decode step: ONE in the common case, the sampler's (sampling.py), which also carries the
    stopping check computed by :func:`_advance`; with shared-prompt attention nothing else in the step reads the
    device. A step whose nucleus outgrows the sampler's candidates reads more (the redo); so does a scoring round.
    With stopping criteria that may keep state, they are called once per step after the draw: a second read.
    """
    pool: list[list[_Candidate]] = [[] for _ in range(plan.num_prompts)]  # finished survivors, per prompt
    pure_stopping = all(type(c) in PURE_STOPPING_CRITERIA for c in plan.stopping_criteria)
    step = 0
    while True:
        any_unfinished = _sample(plan, rows, sampler, pure_stopping)
        step += 1
        last = step >= plan.max_new_tokens or not bool(any_unfinished)
        if step % plan.every == 0 or last:
            by_prompt = _score(plan, rows, scorer)
            results = _select(plan, rows, by_prompt, pool, last)
            if results is not None:
                return results
        _forward(model, plan, rows)


def _advance(
    plan: _Plan, rows: _Rows, tokens: torch.LongTensor
) -> tuple[tuple[torch.LongTensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The step's bookkeeping for drawn ``tokens``, on the device: (input_ids, lengths, unfinished) after the step,
    and whether any row is unfinished (read by the sampler together with its own checks). It leaves ``rows`` as they
    are: the sampler calls it again when it redoes a draw."""
    if plan.pad_finished:
        tokens = tokens * rows.unfinished + plan.pad_token * (1 - rows.unfinished)
    ids = torch.cat([rows.input_ids, tokens[:, None]], dim=-1)
    still = rows.unfinished & ~plan.stopping_criteria(ids, None).to(plan.device)
    return (ids, rows.lengths + rows.unfinished, still), still.any()


def _sample(plan: _Plan, rows: _Rows, sampler: TokenSampler, pure_stopping: bool) -> bool | torch.Tensor:
    """Append one token to every row; returns whether any row is unfinished (a device tensor where stopping
    criteria with state were called after the draw: the caller reads it only when it needs to)."""
    if pure_stopping:
        _, state, flags = sampler.sample(rows.input_ids, rows.next_logits, follow=partial(_advance, plan, rows))
        any_unfinished = bool(flags[0])
    else:
        state, any_unfinished = _advance(plan, rows, sampler(rows.input_ids, rows.next_logits))
    rows.input_ids, rows.lengths, rows.unfinished = state
    return any_unfinished


def _score(plan: _Plan, rows: _Rows, scorer: _RoundScorer) -> list[list[tuple[int, _Candidate]]]:
    """Every row's continuation so far as a scored candidate, grouped by prompt as ``(row, candidate)``."""
    candidates, row_prompt_list = _row_candidates(
        rows.input_ids,
        plan.model_length,
        rows.lengths,
        rows.unfinished,
        rows.row_prompt,
        plan.eos_set,
        plan.settings.tokenizer,
    )
    row_scores = scorer(row_prompt_list, [c.text for c in candidates])
    for candidate, score in zip(candidates, row_scores):
        candidate.score = score
    by_prompt: list[list[tuple[int, _Candidate]]] = [[] for _ in range(plan.num_prompts)]
    for r, (p, candidate) in enumerate(zip(row_prompt_list, candidates)):
        by_prompt[p].append((r, candidate))
    return by_prompt


def _row_candidates(
    input_ids, start, lengths, unfinished, row_prompt, eos_set, tokenizer
) -> tuple[list[_Candidate], list[int]]:
    """The continuation of every row as a candidate (tokens up to its end, text cut at the first EOS), and every row's
    prompt; all read from the device at once."""
    table = torch.cat(
        [input_ids, lengths[:, None], unfinished[:, None], row_prompt[:, None].to(input_ids.device)], dim=1
    ).tolist()
    tokens = [row[start : start + row[-3]] for row in table]
    for_text = []
    for ids in tokens:
        cut = next((i for i, t in enumerate(ids) if t in eos_set), len(ids))
        for_text.append(ids[:cut])
    texts = tokenizer.batch_decode(for_text, skip_special_tokens=True)
    candidates = [
        _Candidate(tokens=ids, text=text, score=-math.inf, finished=not row[-2])
        for ids, text, row in zip(tokens, texts, table)
    ]
    return candidates, [row[-1] for row in table]


def _select(
    plan: _Plan, rows: _Rows, by_prompt: list[list[tuple[int, _Candidate]]], pool: list[list[_Candidate]], last: bool
) -> list[list[_Candidate]] | None:
    """Keep each prompt's ``B`` best candidates: the finished ones go to ``pool``, the rest are continued by ``N``
    rows each. Returns each prompt's final ranking when decoding is over (the last step, or no unfinished survivor),
    else ``None``."""
    if last:
        return [_rank([c for _, c in by_prompt[p]] + pool[p], plan.k) for p in range(plan.num_prompts)]
    keep_rows = []
    for p in range(plan.num_prompts):
        row_of = {id(c): r for r, c in by_prompt[p]}
        survivors = _rank([c for _, c in by_prompt[p]] + pool[p], plan.settings.num_beams)
        pool[p] = [c for c in survivors if c.finished]
        keep_rows += [row_of[id(c)] for c in survivors if not c.finished]
    if not keep_rows:  # every prompt's survivors have finished
        return [_rank(pool[p], plan.k) for p in range(plan.num_prompts)]
    index = torch.tensor(keep_rows, device=plan.device).repeat_interleave(plan.settings.num_samples)
    rows.model_kwargs = _select_rows(rows.model_kwargs, index, len(rows.row_prompt))
    rows.input_ids, rows.row_prompt = rows.input_ids[index], rows.row_prompt[index]
    rows.unfinished = torch.ones(len(index), dtype=torch.long, device=plan.device)
    rows.lengths = rows.lengths[index]
    return None


def _forward(model: nn.Module, plan: _Plan, rows: _Rows) -> None:
    """One forward for every row; the cache holds everything but the last token."""
    model_inputs = model.prepare_inputs_for_generation(
        rows.input_ids, next_sequence_length=1 if plan.use_cache else None, **rows.model_kwargs
    )
    outputs = model(**model_inputs, return_dict=True)
    rows.model_kwargs = model._update_model_kwargs_for_generation(outputs, rows.model_kwargs, is_encoder_decoder=False)
    rows.next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=plan.device)


# --------------------------------------------------------------------------------------------------------------------
# 4. output


def _output(
    plan: _Plan, results: list[list[_Candidate]], generation_config: Any, streamer: Any
) -> torch.LongTensor | RankGenDecoderOnlyOutput:
    """Each prompt as given followed by its best continuation(s), right-padded to a common length."""
    chosen = []
    for ranked in results:
        chosen += [ranked[i] if i < len(ranked) else ranked[0] for i in range(plan.k)]  # too few: repeat the best
    width = max(len(c.tokens) for c in chosen)
    if plan.pad_token is None and any(len(c.tokens) < width for c in chosen):
        raise ValueError("Set `pad_token_id` (or `eos_token_id`) to pad continuations of different lengths.")
    fill = int(plan.pad_token) if plan.pad_token is not None else 0
    prompt_length = plan.prompt_ids.shape[1]
    sequences = torch.full((len(chosen), prompt_length + width), fill, dtype=torch.long, device=plan.device)
    sequences[:, :prompt_length] = plan.prompt_ids.repeat_interleave(plan.k, dim=0)
    for i, candidate in enumerate(chosen):
        sequences[i, prompt_length : prompt_length + len(candidate.tokens)] = torch.tensor(
            candidate.tokens, dtype=torch.long, device=plan.device
        )
    if streamer is not None:
        streamer.put(sequences[:, prompt_length:].cpu())
        streamer.end()
    if generation_config.return_dict_in_generate:
        return RankGenDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=torch.tensor([c.score for c in chosen], dtype=torch.float32, device=plan.device),
        )
    return sequences
