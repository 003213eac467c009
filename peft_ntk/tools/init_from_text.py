"""Compress a text of any length into an NTK-Attention adapter: the paper's infinite prefix, taken literally.

The frozen base model reads the text chunk by chunk. In every adapted attention layer the post-RoPE key ``k_p`` and
value ``v_p`` of every token become one prefix row, and the adapter receives, per query head,

    Z = Σ_p phi(k_p) v_pᵀ        k = Σ_p phi(k_p)

exactly what NTK-Attention's virtual prefix is made of. Memory is O(1) in the text length (one (r × d) state per
head plus the current chunk), so the text may be far longer than the model's context window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..ops import PrefixStateAccumulator, feature_map_and_log_scale, repeat_kv_heads
from ..tuner.attention_hook import capture_attention_inputs
from ..tuner.layer import NTKAttentionLayer

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

CALIBRATION_CHOICES = (False, "mass", "perplexity")
#: factors tried by calibrate="perplexity": 10^-8 ... 10^1 in half decades
PERPLEXITY_SCALES = tuple(10.0 ** (e / 2) for e in range(-16, 3))


@dataclass
class TextInitReport:
    """What :func:`init_from_text` did."""

    adapter_name: str
    tokens: int = 0
    chunks: int = 0
    chunk_size: int = 0
    layers: int = 0
    #: per adapted layer (in model order), the per-head factor applied to Z and k by calibration (1.0 without it)
    calibration_scales: list[list[float]] = field(default_factory=list)
    #: per adapted layer, mean |log(true prefix mass / NTK prefix mass)| over the calibration queries, before/after
    calibration_log_mass_error: list[tuple[float, float]] = field(default_factory=list)
    #: calibrate="perplexity": (factor, perplexity of calibration_text) for every factor tried
    calibration_curve: list[tuple[float, float]] = field(default_factory=list)


def _ntk_layers(peft_model: nn.Module, adapter_name: str) -> dict[int, tuple[str, NTKAttentionLayer]]:
    """id(base attention module) -> (name, NTK layer), for the layers that carry ``adapter_name``."""
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, NTKAttentionLayer) and adapter_name in module.ntk_z:
            layers[id(module.base_layer)] = (name, module)
    if not layers:
        raise ValueError(
            f"the model has no NTK-Attention layers with an adapter named {adapter_name!r}; create one first with "
            "get_peft_model(base, NTKAttentionConfig(...)) or model.add_adapter(name, config)."
        )
    return layers


def _token_chunks(
    tokenizer, texts: Union[str, Iterable[str]], chunk_size: int
) -> tuple[Iterator[list[int]], Optional[int]]:
    """Chunks of at most ``chunk_size`` token ids, text after text; also the chunk count when it is known upfront."""
    if isinstance(texts, str):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the text is empty after tokenisation; pass a non-empty text")
        chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
        return iter(chunks), len(chunks)

    def generate() -> Iterator[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), chunk_size):
                yield ids[i : i + chunk_size]

    return generate(), None


def _batches(chunks: Iterator[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Batches of equally long chunks (a shorter chunk, the end of a text, goes alone: no padding is ever needed)."""
    batch: list[list[int]] = []
    for chunk in chunks:
        if batch and len(chunk) != len(batch[0]):
            yield batch
            batch = []
        batch.append(chunk)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _default_chunk_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 512


class _LayerState:
    """Per layer: the streaming prefix state and, for calibration, held queries with their running true log-mass."""

    def __init__(self, layer: NTKAttentionLayer, adapter_name: str) -> None:
        self.layer = layer
        self.feature_map = layer.adapter_feature_map(adapter_name)
        self.accumulator = PrefixStateAccumulator(self.feature_map)
        self.calibration_queries: Optional[torch.Tensor] = None  # (H, Nc, d) float64
        self.true_log_mass: Optional[torch.Tensor] = None  # (H, Nc): logsumexp_p scaling·q·k_p over all prefix keys
        self.scaling: Optional[float] = None

    def add(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: Optional[float]) -> None:
        heads = self.layer.num_heads
        key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)  # GQA: Z, k are per query head
        self.accumulator.add(key, value)
        self.scaling = key.shape[-1] ** -0.5 if scaling is None else scaling
        if self.calibration_queries is not None:
            keys = key.transpose(0, 1).flatten(1, 2).to(torch.float64)  # (H, B·L, d)
            scores = torch.einsum("hnd,hmd->hnm", self.calibration_queries, keys) * self.scaling
            chunk_mass = torch.logsumexp(scores, dim=-1)
            self.true_log_mass = (
                chunk_mass if self.true_log_mass is None else torch.logaddexp(self.true_log_mass, chunk_mass)
            )

    def hold_queries(self, query: torch.Tensor, count: int, generator: torch.Generator) -> None:
        """Keep ``count`` query rows (per head), drawn uniformly from this call's tokens, for calibration."""
        rows = query.transpose(0, 1).flatten(1, 2).to(torch.float64)  # (H, B·L, d)
        pick = torch.randperm(rows.shape[1], generator=generator)[:count]
        self.calibration_queries = rows[:, pick]


@torch.no_grad()
def _ntk_log_mass(feature_map, queries: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log(phi(q)ᵀk) per head and query, via the stabilised features where the map has them."""
    phi, log_scale = feature_map_and_log_scale(feature_map, queries)
    mass = torch.einsum("hnr,hr->hn", phi, k)
    log_mass = torch.log(mass)
    return log_mass if log_scale is None else log_mass + log_scale


def _run_chunks(model, batches, device, on_batch=None, progress=None) -> tuple[int, int]:
    tokens = chunks = 0
    for batch in batches:
        input_ids = torch.tensor(batch, dtype=torch.long, device=device)
        if on_batch is not None:
            on_batch(input_ids)
        model(input_ids=input_ids, use_cache=False)
        tokens += input_ids.numel()
        chunks += input_ids.shape[0]
        if progress is not None:
            progress.update(input_ids.shape[0])
    return tokens, chunks


@torch.no_grad()
def init_from_text(
    peft_model: nn.Module,
    tokenizer,
    text: Union[str, Iterable[str]],
    *,
    adapter_name: Optional[str] = None,
    chunk_size: Optional[int] = None,
    batch_size: int = 8,
    calibrate: Union[bool, str] = False,
    calibration_text: Optional[str] = None,
    calibration_queries: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> TextInitReport:
    """Set an NTK adapter's ``Z`` and ``k`` to the virtual prefix made of every token of ``text``.

    The base model (adapters disabled) reads the text in chunks of ``chunk_size`` tokens (default: the model's context
    window, ``max_position_embeddings``). **Each chunk is an independent sequence starting at position 0**: RoPE
    keys are rotated by their position inside their chunk, and a token's key depends only on the text of its own
    chunk. So the text may be any length, and the result is the sum over chunks, one chunk's keys and values per
    prefix row: streaming over chunks gives the same ``Z, k`` as one pass over all rows (float64 sums). The text is
    tokenised without special tokens. Key/value heads of grouped-query attention are repeated to the query heads.

    The adapter's existing ``Z`` and ``k`` are overwritten (not added to); its feature map (``elu``, ``favor``, ...) is
    the one in its config. With ``elu`` the prefix mass ``phi(q)ᵀk`` grows with the number of tokens while the true
    prefix mass ``Σ_p exp(q·k_p/√d)`` may be orders of magnitude off (elu+1 is a poor stand-in for exp), so the model
    may attend almost only to the prefix or almost never. ``calibrate="mass"`` corrects that scale.

    Scale calibration (``calibrate="mass"`` or ``True``): ``calibration_queries`` query rows per head are taken from
    the first chunk of ``calibration_text`` (default: the first chunk of ``text``); while the text streams by, their
    true prefix log-mass ``m_i = log Σ_p exp(scaling·q_i·k_p)`` over *all* tokens is accumulated. Afterwards each
    layer and head gets the single factor ``α = exp(mean_i(m_i − log phi(q_i)ᵀk))`` (the geometric mean of true over
    NTK prefix mass) and ``Z, k ← α·Z, α·k``. This fixes *how much* attention goes to the prefix, not *where inside it*:
    ``phi(q)ᵀZ / phi(q)ᵀk``, the prefix's value for a query, is unchanged, and with ``elu`` it stays close to the plain
    mean of the values. With ``favor`` and large ``feature_dim`` ``α`` is near 1 already.

    Perplexity calibration (``calibrate="perplexity"``, needs a causal LM and ``calibration_text``, which should be
    held-out text of the same kind, *not* part of ``text``): one factor ``α`` for all layers and heads,
    ``Z, k ← α·Z, α·k``, chosen from 10^-8 … 10 (half decades) as the one with the lowest perplexity of
    ``calibration_text`` (read in chunks, with the adapter on). It sets how many tokens' worth of attention the whole
    text receives; ``α → 0`` is the base model, so the result is never worse than no adapter on that text. In
    ``benchmarks/ntk_long_context.py`` this is the setting under which init-from-text helps (mass calibration does not).

    Args:
        peft_model: a PeftModel (or model) with NTK-Attention layers carrying ``adapter_name``.
        tokenizer: its tokenizer (a callable returning ``input_ids``).
        text: a string, or an iterable of strings read one after another (chunks never span two texts).
        adapter_name: which adapter to fill (default: the active one).
        chunk_size: tokens per chunk; at most the context window.
        batch_size: chunks per forward pass (only equally long chunks are batched; nothing is padded).
        calibrate: ``False`` (default), ``"mass"``/``True`` or ``"perplexity"``, see above.
        calibration_text: where the calibration queries come from (default: ``text``'s first chunk).
        calibration_queries: query rows per head kept for calibration.
        seed: seed for choosing the calibration queries.
        progress: show a tqdm bar over the chunks.

    Returns:
        A :class:`TextInitReport` (token and chunk counts, calibration factors).

    Example::

        >>> import peft_ntk
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ntk.NTKAttentionConfig(init_weights=True))  # doctest: +SKIP
        >>> book = open("book.txt").read()  # doctest: +SKIP
        >>> report = peft_ntk.init_from_text(model, tokenizer, book, calibrate=True)  # doctest: +SKIP
        >>> report.tokens, report.chunks  # doctest: +SKIP
    """
    calibrate, adapter_name, chunk_size = _checked_arguments(
        peft_model, calibrate, calibration_text, batch_size, calibration_queries, adapter_name, chunk_size
    )
    layers = _ntk_layers(peft_model, adapter_name)
    states = {key: _LayerState(layer, adapter_name) for key, (_, layer) in layers.items()}
    report = TextInitReport(adapter_name=adapter_name, chunk_size=chunk_size, layers=len(states))
    # 1. read the text with the adapters off, recording keys and values (and calibration queries)
    _read_text(
        peft_model,
        tokenizer,
        text,
        states,
        report,
        calibrate=calibrate,
        calibration_text=calibration_text,
        calibration_queries=calibration_queries,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    # 2. collapse each layer's keys and values into Z and k, scaled by the mass calibration if asked for
    for state in states.values():
        _write_prefix_state(state, adapter_name, calibrate, report)
    # 3. one scale for the whole text, by the perplexity of held-out text
    if calibrate == "perplexity":
        _calibrate_by_perplexity(peft_model, tokenizer, states, adapter_name, calibration_text, chunk_size, report)
    logger.info(
        f"init_from_text: {report.tokens} tokens in {report.chunks} chunks of up to {chunk_size} written into "
        f"adapter {adapter_name!r} of {report.layers} layers"
    )
    return report


def _checked_arguments(
    peft_model, calibrate, calibration_text, batch_size, calibration_queries, adapter_name, chunk_size
) -> tuple[Union[bool, str], str, int]:
    """``(calibrate, adapter_name, chunk_size)`` with the defaults filled in; a ValueError for every bad argument."""
    if calibrate is True:
        calibrate = "mass"
    if calibrate not in CALIBRATION_CHOICES:
        raise ValueError(
            f"calibrate={calibrate!r} is not supported; use False, True (= 'mass'), 'mass' or 'perplexity'."
        )
    if calibrate == "perplexity" and not isinstance(calibration_text, str):
        raise ValueError(
            "calibrate='perplexity' chooses the scale by the perplexity of calibration_text: pass calibration_text=... "
            "(held-out text of the same kind, not part of text)."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(calibration_queries, int) or calibration_queries < 1:
        raise ValueError(f"calibration_queries must be a positive integer, got {calibration_queries!r}")
    if adapter_name is None:
        active = getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")]
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    window = _default_chunk_size(peft_model)
    if chunk_size is None:
        chunk_size = window
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size > window:
        raise ValueError(
            f"chunk_size={chunk_size} exceeds the model's context window ({window} positions); every chunk starts at "
            "position 0, so pass chunk_size <= the context window."
        )
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if getattr(config, "prefix_mass", "paper") != "paper":
        raise ValueError(
            f"init_from_text writes the prefix made of the text's own tokens, whose mass adds to the input's keys: "
            f"that is prefix_mass='paper', and adapter {adapter_name!r} has prefix_mass={config.prefix_mass!r}. "
            "Create the adapter with NTKAttentionConfig(prefix_mass='paper') to initialise it from text."
        )
    return calibrate, adapter_name, chunk_size


def _read_text(
    peft_model,
    tokenizer,
    text,
    states,
    report,
    *,
    calibrate,
    calibration_text,
    calibration_queries,
    batch_size,
    seed,
    progress,
) -> None:
    """Run the base model over ``text`` chunk by chunk, adding each layer's keys and values to its state."""
    chunk_size = report.chunk_size
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.eval()
    generator = torch.Generator().manual_seed(seed)
    holding = {"active": False}

    def capture(module, query, key, value, scaling) -> None:
        state = states.get(id(module))
        if state is None:
            return
        if holding["active"]:
            state.hold_queries(query, calibration_queries, generator)
            return
        state.add(query, key, value, scaling)

    disable = getattr(peft_model, "disable_adapter", None)
    try:
        with disable() if disable is not None else _all_layers_disabled(states), capture_attention_inputs(capture):
            if calibrate == "mass":
                source = calibration_text if calibration_text is not None else text
                if not isinstance(source, str):
                    raise ValueError(
                        "calibration needs a string to take its queries from: pass calibration_text=... when text is "
                        "an iterable of strings."
                    )
                first, _ = _token_chunks(tokenizer, source, chunk_size)
                holding["active"] = True
                _run_chunks(peft_model, [[next(first)]], device)
                holding["active"] = False
            chunks, total = _token_chunks(tokenizer, text, chunk_size)
            bar = tqdm(total=total, desc="init_from_text", unit="chunk", disable=not progress)
            try:
                report.tokens, report.chunks = _run_chunks(peft_model, _batches(chunks, batch_size), device, None, bar)
            finally:
                bar.close()
    finally:
        peft_model.train(was_training)
    if report.tokens == 0:
        raise ValueError("the text is empty after tokenisation; pass a non-empty text")


def _write_prefix_state(state, adapter_name: str, calibrate, report) -> None:
    """Write one layer's accumulated ``(Z, k)`` into its adapter, scaled per head by the mass calibration."""
    if state.accumulator.z is None:
        raise RuntimeError(
            f"{type(state.layer.base_layer).__name__} never reached the NTK attention function while reading the "
            "text, so no keys were recorded for it"
        )
    z, k = state.accumulator.state()
    scales = torch.ones(z.shape[0], dtype=torch.float64)
    errors = (float("nan"), float("nan"))
    if calibrate == "mass":
        before = state.true_log_mass - _ntk_log_mass(state.feature_map, state.calibration_queries, k)
        finite = torch.isfinite(before)
        log_alpha = torch.where(finite, before, torch.zeros_like(before)).sum(1) / finite.sum(1).clamp(min=1)
        scales = torch.exp(log_alpha)
        z, k = z * scales[:, None, None], k * scales[:, None]
        after = before - log_alpha[:, None]
        errors = (before[finite].abs().mean().item(), after[finite].abs().mean().item())
    if not (torch.isfinite(z).all() and torch.isfinite(k).all()) or z.abs().max() > torch.finfo(torch.float32).max:
        raise ValueError("the prefix state of this text does not fit in float32; use calibrate=True or a shorter text")
    layer = state.layer
    layer.ntk_z[adapter_name].data.copy_(z.to(layer.ntk_z[adapter_name].dtype))
    layer.ntk_k[adapter_name].data.copy_(k.to(layer.ntk_k[adapter_name].dtype))  # k >= 0, so |k| = k
    report.calibration_scales.append([round(float(s), 6) for s in scales])
    report.calibration_log_mass_error.append(errors)


@torch.no_grad()
def _calibrate_by_perplexity(peft_model, tokenizer, states, adapter_name, text, chunk_size, report) -> None:
    """Scale every layer's Z and k by the factor with the lowest perplexity of ``text`` (see init_from_text)."""
    layers = [state.layer for state in states.values()]
    if any(adapter_name not in layer.active_adapters or layer.disable_adapters for layer in layers):
        raise ValueError(
            f"calibrate='perplexity' evaluates the model with adapter {adapter_name!r}, but it is not active; call "
            f"model.set_adapter({adapter_name!r}) first."
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    chunks = [chunk for chunk in chunks if len(chunk) > 1]
    if not chunks:
        raise ValueError("calibration_text is too short: it needs at least 2 tokens")
    start = [
        (layer.ntk_z[adapter_name].detach().clone(), layer.ntk_k[adapter_name].detach().clone()) for layer in layers
    ]
    device = next(peft_model.parameters()).device

    def apply(scale: float) -> None:
        for layer, (z, k) in zip(layers, start):
            layer.ntk_z[adapter_name].data.copy_(z * scale)
            layer.ntk_k[adapter_name].data.copy_(k * scale)

    def perplexity() -> float:
        nll, count = 0.0, 0
        for chunk in chunks:
            input_ids = torch.tensor([chunk], device=device)
            logits = getattr(peft_model(input_ids=input_ids, use_cache=False), "logits", None)
            if logits is None:
                raise ValueError("calibrate='perplexity' needs a causal language model (an output with logits)")
            nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:], reduction="sum").item()
            count += len(chunk) - 1
        return math.exp(nll / count)

    was_training = peft_model.training
    peft_model.eval()
    try:
        for scale in PERPLEXITY_SCALES:
            apply(scale)
            report.calibration_curve.append((scale, perplexity()))
    finally:
        peft_model.train(was_training)
    best = min(report.calibration_curve, key=lambda point: point[1])[0]
    apply(best)
    report.calibration_scales = [[best] * layer.num_heads for layer in layers]


class _all_layers_disabled:
    """For plain models (no PeftModel.disable_adapter): switch the NTK layers off while reading."""

    def __init__(self, states: dict) -> None:
        self.layers = [state.layer for state in states.values()]

    def __enter__(self) -> None:
        self.previous = [layer.disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc) -> None:
        for layer, previous in zip(self.layers, self.previous):
            layer.enable_adapters(not previous)
