"""Shared-prompt attention for RankGen's decoding loop.

RankGen decodes B·N rows per prompt that all start from the same prompt. With a plain KV cache every row carries (and
attention re-reads) its own copy of the prompt's keys and values. Here the prompt's keys/values are kept ONCE per prompt
(:class:`SharedPromptLayer`), each row keeps only its continuation, and attention for a decode query is the exact merge
of two parts:

(a) attention over its prompt's keys, computed for all rows of a prompt together (they are extra query positions against
    that prompt's keys, with the prompt's padding mask), and
(b) attention over the row's own continuation keys,

merged with their log-sum-exps: ``O = (e^{L1} O1 + e^{L2} O2) / (e^{L1} + e^{L2})``, computed as
``w_i = e^{L_i - max(L1, L2)}``.

The cache layer's ``update`` returns only the continuation keys/values; the attention function registered as
``"rankgen_shared_prompt"`` (in ``AttentionInterface`` and, with ``sdpa``'s mask builder, ``AttentionMaskInterface``)
finds the prompt part of the layer it runs for through the cache made active by :func:`shared_prompt_attention`.
Only the plain case is handled (decoder-only, ``sdpa``/``eager`` attention, no sliding window, no adapter that replaces
attention); :func:`shared_prompt_supported` says when, and RankGen decoding otherwise keeps its usual cache.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_cache import GrowingKVLayer

IMPLEMENTATION = "rankgen_shared_prompt"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# model families whose attention is plain scaled dot-product attention over (rotary-embedded) keys: no softcap, no
# position bias, no attention sinks
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

CPU_FLASH = True  # on CPU, compute each part with the fused flash kernel (False: the plain computation used elsewhere)
_active_caches: list = []  # the cache(s) whose SharedPromptLayers the attention function reads, innermost last


class SharedPromptLayer(GrowingKVLayer):
    """A cache layer holding each prompt's keys/values once and each row's continuation in a growing buffer.

    ``prompt_keys`` / ``prompt_values``: ``(prompts, kv_heads, prompt_length, head_dim)``; ``prompt_mask``:
    ``(prompts, prompt_length)`` bool (False at padding); ``row_prompt``: ``(rows,)``, the prompt of every row.
    ``keys`` / ``values`` are views of the rows' continuations (the :class:`GrowingKVLayer` part, starting empty with
    one row per prompt), which is what ``update`` returns; ``get_seq_length`` counts the prompt too, so positions and
    masks are those of the full sequence.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompt_mask: torch.Tensor | None, capacity: int):
        super().__init__(keys[..., :0, :], values[..., :0, :], capacity)
        self.prompt_keys, self.prompt_values = keys, values
        prompts, _, self.prompt_length, _ = keys.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(prompts, self.prompt_length, dtype=torch.bool, device=keys.device)
        self.prompt_mask = prompt_mask.to(device=keys.device, dtype=torch.bool)
        self._set_rows(torch.arange(prompts, device=keys.device))

    # --- rows
    def _set_rows(self, row_prompt: torch.Tensor) -> None:
        """Remember every row's prompt and its slot in the padded (prompts, max rows per prompt) query layout."""
        self.row_prompt = row_prompt
        prompts = self.prompt_keys.shape[0]
        counts = torch.bincount(row_prompt, minlength=prompts)
        order = torch.argsort(row_prompt, stable=True)
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(row_prompt)
        slot[order] = torch.arange(len(row_prompt), device=row_prompt.device) - starts[row_prompt[order]]
        self.rows_per_prompt = max(int(counts.max()), 1) if len(row_prompt) else 1
        self.padded_index = row_prompt * self.rows_per_prompt + slot

    def _reallocate(self, rows: torch.Tensor | None = None, capacity: int | None = None) -> None:
        if rows is not None:
            rows = rows.to(self._key_buffer.device)
            self._set_rows(self.row_prompt[rows])
        super()._reallocate(rows=rows, capacity=capacity)

    def get_seq_length(self) -> int:
        return self.prompt_length + self._length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # the legacy form: the length to keep
            tokens_to_remove = max(self.get_seq_length() - tokens_to_remove, 0)
        if abs(tokens_to_remove) > self._length:
            raise NotImplementedError("SharedPromptLayer cannot crop into the shared prompt.")
        self._length -= abs(tokens_to_remove)
        self._refresh_views()

    def reset(self) -> None:
        raise NotImplementedError("SharedPromptLayer cannot be reset; it only lives during RankGen's decoding loop.")


def _attention_with_lse(query, key, value, allowed, scale):
    """Attention returning (out, lse): ``query`` (B, H, M, D), ``key``/``value`` (B, H, K, D), ``allowed``
    broadcastable to (B, H, M, K) bool or None. On CPU, one fused flash-attention call (it returns the log-sum-exp);
    elsewhere a plain computation."""
    if CPU_FLASH and query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64):
        bias = None
        if allowed is not None:
            bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    return torch.matmul(weights, value), lse


def merged_attention(
    query: torch.Tensor,
    prompt_keys: torch.Tensor,
    prompt_values: torch.Tensor,
    prompt_mask: torch.Tensor,
    padded_index: torch.Tensor,
    rows_per_prompt: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    continuation_allowed: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` (rows, heads, q, D) over [its prompt's keys; its own continuation ``keys``].

    ``prompt_keys``/``prompt_values`` (prompts, kv_heads, Lp, D) with ``prompt_mask`` (prompts, Lp) bool;
    ``padded_index`` (rows,) = prompt · ``rows_per_prompt`` + slot; ``keys``/``values`` (rows, kv_heads, c, D) with
    ``continuation_allowed`` (rows, 1 or heads, q, c) bool or None (then causal: the q queries are the last q keys).
    Returns (rows, heads, q, D).
    """
    rows, heads, q, dim = query.shape
    prompts, kv_heads, prompt_length, _ = prompt_keys.shape
    groups = heads // kv_heads
    work = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    qg = query.to(work).reshape(rows, kv_heads, groups * q, dim)

    # (a) every prompt's rows together against that prompt's keys
    padded = qg.new_zeros(prompts * rows_per_prompt, kv_heads, groups * q, dim)
    padded[padded_index] = qg
    padded = padded.view(prompts, rows_per_prompt, kv_heads, groups * q, dim).transpose(1, 2)
    padded = padded.reshape(prompts, kv_heads, rows_per_prompt * groups * q, dim)
    out1, lse1 = _attention_with_lse(
        padded, prompt_keys.to(work), prompt_values.to(work), prompt_mask[:, None, None, :], scale
    )
    out1 = out1.view(prompts, kv_heads, rows_per_prompt, groups * q, dim).transpose(1, 2)
    out1 = out1.reshape(prompts * rows_per_prompt, kv_heads, groups * q, dim)[padded_index]
    lse1 = lse1.view(prompts, kv_heads, rows_per_prompt, groups * q).transpose(1, 2)
    lse1 = lse1.reshape(prompts * rows_per_prompt, kv_heads, groups * q)[padded_index]

    # (b) every row against its own continuation: (rows, kv_heads, groups · q) queries
    c = keys.shape[-2]
    if continuation_allowed is None:
        positions = torch.arange(c, device=query.device)
        allowed = positions[None, :] <= (c - q + torch.arange(q, device=query.device))[:, None]  # (q, c)
        allowed = None if q == 1 else allowed.repeat(groups, 1)[None, None]
    elif continuation_allowed.shape[1] == 1:  # (rows, 1, q, c): the same for every head
        allowed = continuation_allowed if q == 1 else continuation_allowed.repeat(1, 1, groups, 1)
    else:  # (rows, heads, q, c)
        allowed = continuation_allowed.reshape(rows, kv_heads, groups * q, c)
    if allowed is not None and bool(allowed.all()):
        allowed = None
    out2, lse2 = _attention_with_lse(qg, keys.to(work), values.to(work), allowed, scale)

    # merge exactly
    top = torch.maximum(lse1, lse2)
    top = top.masked_fill(torch.isinf(top), 0.0)
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    out = (w1.unsqueeze(-1) * out1 + w2.unsqueeze(-1) * out2) / (w1 + w2).unsqueeze(-1)
    return out.reshape(rows, heads, q, dim).to(query.dtype)


def _active_layer(module):
    layer_idx = getattr(module, "layer_idx", None)
    if not _active_caches or layer_idx is None:
        return None
    layers = getattr(_active_caches[-1], "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, SharedPromptLayer) else None


def shared_prompt_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An ``AttentionInterface`` function: the shared-prompt merge when the module's cache layer is a
    :class:`SharedPromptLayer` of the active cache, plain ``sdpa`` otherwise."""
    layer = _active_layer(module)
    if layer is None or key.shape[-2] != layer._length or key.data_ptr() != layer.keys.data_ptr():
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("Shared-prompt attention handles plain attention only (no softcap/sliding window).")
    if dropout and module.training:
        raise NotImplementedError("Shared-prompt attention does not apply attention dropout.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    allowed = None
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[-2] :]
        allowed = mask if mask.dtype == torch.bool else mask == 0
    out = merged_attention(
        query,
        layer.prompt_keys,
        layer.prompt_values,
        layer.prompt_mask,
        layer.padded_index,
        layer.rows_per_prompt,
        key,
        value,
        allowed,
        scale,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, shared_prompt_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def shared_prompt_supported(model, cache) -> bool:
    """Whether the plain case holds: a decoder-only model of a supported family with ``sdpa``/``eager`` attention, no
    sliding window, and a cache of filled plain ``DynamicLayer`` s of equal length."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    get_text = getattr(config, "get_text_config", None)
    if get_text is not None and get_text() is not config:
        return False
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in BASE_IMPLEMENTATIONS:
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return False
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return False
    if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    lengths = {layer.get_seq_length() for layer in layers}
    return len(lengths) == 1 and lengths.pop() > 0


def use_shared_prompt_layers(model, cache, attention_mask: torch.Tensor | None, extra_tokens: int) -> bool:
    """Replace the layers of a freshly prefilled ``cache`` (one row per prompt) by :class:`SharedPromptLayer` s when
    :func:`shared_prompt_supported`; returns whether it did. Use it together with :func:`shared_prompt_attention`."""
    if not shared_prompt_supported(model, cache):
        return False
    length = cache.layers[0].get_seq_length()
    prompt_mask = None
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (cache.layers[0].keys.shape[0], length):
            return False
        prompt_mask = attention_mask.bool()
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = SharedPromptLayer(layer.keys, layer.values, prompt_mask, extra_tokens)
    return True


@contextlib.contextmanager
def shared_prompt_attention(model, cache, enabled: bool = True):
    """Switch ``model`` to shared-prompt attention over ``cache`` for the duration of the block (nothing when not
    ``enabled``); the model's attention implementation is restored afterwards."""
    if not enabled:
        yield
        return
    config = model.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = IMPLEMENTATION
    _active_caches.append(cache)
    try:
        yield
    finally:
        _active_caches.pop()
        config._attn_implementation_internal = previous
