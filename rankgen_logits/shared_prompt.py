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

Per decode step nothing here reads the device on the host (on a GPU each such read waits for the queue to drain) when
the layers are made with ``continuation_unmasked=True`` (RankGen's loop: the attention mask past the prompt is all
ones): the registered mask function then builds no mask for one-token steps, so there is no mask to inspect. The rows'
layout is computed when the rows change (once per scoring round, shared by all layers, one read), and the forms of the
prompt's padding mask once per layer.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .kv_cache import GrowingKVLayer

IMPLEMENTATION = "rankgen_shared_prompt"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# model families whose attention is plain scaled dot-product attention over (rotary-embedded) keys: no softcap, no
# position bias, no attention sinks
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

CPU_FLASH = True  # on CPU, compute each part with the fused flash kernel (False: the plain computation used elsewhere)
_active_caches: list = []  # the cache(s) whose SharedPromptLayers the attention function reads, innermost last


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention is computed in: the query's when float32/float64, else float32 (for the log-sum-exps)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _RowLayout:
    """Every row's prompt and its slot in the padded ``(prompts, rows_per_prompt)`` query layout.

    ``in_order``: the rows are sorted by prompt, ``rows_per_prompt`` each, so the padded layout is the rows themselves
    (the usual case: RankGen keeps every prompt's survivors together, each repeated N times)."""

    def __init__(self, row_prompt: torch.Tensor, prompts: int):
        rows = len(row_prompt)
        device = row_prompt.device
        counts = torch.zeros(prompts, dtype=torch.long, device=device)
        counts.index_add_(0, row_prompt, torch.ones_like(row_prompt))  # bincount, without its read on a GPU
        order = torch.argsort(row_prompt, stable=True)
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(row_prompt)
        slot[order] = torch.arange(rows, device=device) - starts[row_prompt[order]]
        most = counts.max().clamp(min=1)
        padded_index = row_prompt * most + slot
        in_order = (counts == most).all() & (padded_index == torch.arange(rows, device=device)).all()
        # the one device→host read of a change of rows
        most, in_order = torch.stack([most, in_order.long()]).tolist()
        self.row_prompt, self.rows_per_prompt, self.padded_index = row_prompt, most, padded_index
        self.in_order = bool(in_order)


class _RowMemo:
    """What all layers of a cache compute alike when the rows change (``reorder_cache`` calls every layer with the same
    index): the first layer computes, the others reuse it."""

    def __init__(self):
        self._selected = None  # (row_prompt, rows, row_prompt[rows])
        self._layout = None  # (row_prompt, prompts, _RowLayout)

    def select(self, row_prompt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        memo = self._selected
        if memo is not None and memo[0] is row_prompt and memo[1] is rows:
            return memo[2]
        selected = row_prompt[rows]
        self._selected = (row_prompt, rows, selected)
        return selected

    def layout(self, row_prompt: torch.Tensor, prompts: int) -> _RowLayout:
        memo = self._layout
        if memo is not None and memo[0] is row_prompt and memo[1] == prompts:
            return memo[2]
        layout = _RowLayout(row_prompt, prompts)
        self._layout = (row_prompt, prompts, layout)
        return layout


class SharedPromptLayer(GrowingKVLayer):
    """A cache layer holding each prompt's keys/values once and each row's continuation in a growing buffer.

    ``prompt_keys`` / ``prompt_values``: ``(prompts, kv_heads, prompt_length, head_dim)``; ``prompt_mask``:
    ``(prompts, prompt_length)`` bool (False at padding); ``row_prompt``: ``(rows,)``, the prompt of every row.
    ``keys`` / ``values`` are views of the rows' continuations (the :class:`GrowingKVLayer` part, starting empty with
    one row per prompt), which is what ``update`` returns; ``get_seq_length`` counts the prompt too, so positions and
    masks are those of the full sequence.

    ``continuation_unmasked``: the caller promises that every forward over this layer passes an attention mask that is
    all ones past the prompt (padding only in the prompt, as in ``generate``'s loop); one-token steps then need no
    mask at all (see :func:`shared_prompt_mask`). ``memo``: shared by the layers of one cache (see
    :func:`use_shared_prompt_layers`), so that a change of rows is worked out once for all of them.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        capacity: int,
        continuation_unmasked: bool = False,
        memo: _RowMemo | None = None,
        row_prompt: torch.Tensor | None = None,
    ):
        super().__init__(keys[..., :0, :], values[..., :0, :], capacity)
        self.prompt_keys, self.prompt_values = keys, values
        prompts, _, self.prompt_length, _ = keys.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(prompts, self.prompt_length, dtype=torch.bool, device=keys.device)
        self.prompt_mask = prompt_mask.to(device=keys.device, dtype=torch.bool)
        self.continuation_unmasked = continuation_unmasked
        self._memo = memo if memo is not None else _RowMemo()
        self._prompt_forms: dict = {}
        self._set_rows(torch.arange(prompts, device=keys.device) if row_prompt is None else row_prompt)

    # --- rows
    def _set_rows(self, row_prompt: torch.Tensor) -> None:
        """Remember every row's prompt and its slot in the padded (prompts, max rows per prompt) query layout."""
        layout = self._memo.layout(row_prompt, self.prompt_keys.shape[0])
        self.row_prompt = row_prompt
        self.rows_per_prompt, self.padded_index, self.rows_in_order = (
            layout.rows_per_prompt,
            layout.padded_index,
            layout.in_order,
        )

    def _reallocate(self, rows: torch.Tensor | None = None, capacity: int | None = None) -> None:
        if rows is not None:
            rows = rows.to(self._key_buffer.device)
            self._set_rows(self._memo.select(self.row_prompt, rows))
        super()._reallocate(rows=rows, capacity=capacity)

    def prompt_forms(self, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt's keys and values in the ``work`` dtype, and its padding mask as ``blocked`` (``~mask``, (prompts,
        1, 1, prompt_length)) and as an additive ``bias`` (0 / -inf): computed once, not at every step."""
        forms = self._prompt_forms.get(work)
        if forms is None:
            blocked = ~self.prompt_mask[:, None, None, :]
            bias = torch.zeros(blocked.shape, dtype=work, device=blocked.device).masked_fill_(blocked, -math.inf)
            forms = (self.prompt_keys.to(work), self.prompt_values.to(work), blocked, bias)
            self._prompt_forms = {work: forms}
        return forms

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


def _attention_with_lse(query, key, value, allowed, scale, blocked=None, bias=None):
    """Attention returning (out, lse): ``query`` (B, H, M, D), ``key``/``value`` (B, H, K, D), ``allowed``
    broadcastable to (B, H, M, K) bool or None; ``blocked`` (``~allowed``) and ``bias`` (0 where allowed, -inf
    elsewhere) may be given precomputed, when every query has a key (a prompt's). On CPU, one fused flash-attention
    call (it returns the log-sum-exp); elsewhere a plain computation. A query with no key gets lse -inf."""
    if CPU_FLASH and query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64):
        mask_here = bias is None and allowed is not None
        if mask_here:
            bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=bias, scale=scale
        )
        if mask_here:  # the kernel gives a query with no key lse 0 (and out 0), not -inf
            lse = lse.masked_fill(~allowed.any(-1), -math.inf)
        return out, lse
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if allowed is None and blocked is None:
        # every query sees every key, so a row's lse is finite (no fully masked row to guard; with no keys at all
        # there is nothing to weigh)
        lse = torch.logsumexp(scores, dim=-1)
        return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), value), lse
    scores = scores.masked_fill(~allowed if blocked is None else blocked, -math.inf)
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
    *,
    rows_in_order: bool = False,
    prompt_blocked: torch.Tensor | None = None,
    prompt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (rows, heads, q, D) over [its prompt's keys; its own continuation ``keys``].

    ``prompt_keys``/``prompt_values`` (prompts, kv_heads, Lp, D) with ``prompt_mask`` (prompts, Lp) bool;
    ``padded_index`` (rows,) = prompt · ``rows_per_prompt`` + slot; ``keys``/``values`` (rows, kv_heads, c, D) with
    ``continuation_allowed`` (rows, 1 or heads, q, c) bool or None (then causal: the q queries are the last q keys).
    ``rows_in_order``: ``padded_index`` is ``arange(rows)`` and fills every slot (the scatter/gather is skipped);
    ``prompt_blocked``/``prompt_bias``: the prompt mask's precomputed forms (:meth:`SharedPromptLayer.prompt_forms`).
    Returns (rows, heads, q, D).
    """
    rows, heads, q, dim = query.shape
    prompts, kv_heads, prompt_length, _ = prompt_keys.shape
    groups = heads // kv_heads
    work = _work_dtype(query.dtype)
    qg = query.to(work).reshape(rows, kv_heads, groups * q, dim)

    # (a) every prompt's rows together against that prompt's keys
    if rows_in_order:
        padded = qg
    else:
        padded = qg.new_zeros(prompts * rows_per_prompt, kv_heads, groups * q, dim)
        padded[padded_index] = qg
    padded = padded.view(prompts, rows_per_prompt, kv_heads, groups * q, dim).transpose(1, 2)
    padded = padded.reshape(prompts, kv_heads, rows_per_prompt * groups * q, dim)
    out1, lse1 = _attention_with_lse(
        padded,
        prompt_keys.to(work),
        prompt_values.to(work),
        prompt_mask[:, None, None, :],
        scale,
        blocked=prompt_blocked,
        bias=prompt_bias,
    )
    out1 = out1.view(prompts, kv_heads, rows_per_prompt, groups * q, dim).transpose(1, 2)
    out1 = out1.reshape(prompts * rows_per_prompt, kv_heads, groups * q, dim)
    lse1 = lse1.view(prompts, kv_heads, rows_per_prompt, groups * q).transpose(1, 2)
    lse1 = lse1.reshape(prompts * rows_per_prompt, kv_heads, groups * q)
    if not rows_in_order:
        out1, lse1 = out1[padded_index], lse1[padded_index]

    # (b) every row against its own continuation: (rows, kv_heads, groups · q) queries
    c = keys.shape[-2]
    if c == 0:  # nothing of its own to see (the CPU kernel would give lse 0, not -inf, for no keys)
        return out1.reshape(rows, heads, q, dim).to(query.dtype)
    if continuation_allowed is None:  # causal; a single query (a decode step) sees every continuation key
        allowed = None
        if q > 1:
            positions = torch.arange(c, device=query.device)
            allowed = positions[None, :] <= (c - q + torch.arange(q, device=query.device))[:, None]  # (q, c)
            allowed = allowed.repeat(groups, 1)[None, None]
    elif continuation_allowed.shape[1] == 1:  # (rows, 1, q, c): the same for every head
        allowed = continuation_allowed if q == 1 else continuation_allowed.repeat(1, 1, groups, 1)
    else:  # (rows, heads, q, c)
        allowed = continuation_allowed.reshape(rows, kv_heads, groups * q, c)
    # a device→host read: only when a mask is given (never in RankGen's decode steps, see shared_prompt_mask)
    if allowed is not None and bool(allowed.all()):
        allowed = None
    out2, lse2 = _attention_with_lse(qg, keys.to(work), values.to(work), allowed, scale)

    # merge exactly: the continuation's share of the softmax mass is e^lse2 / (e^lse1 + e^lse2) = sigmoid(lse2 - lse1),
    # and lerp blends with it in one op (three ops a layer where weights, sums and a division took ten: a decode
    # step is bound by launches on a GPU). The share is exactly 0 or 1 when one part sees no key (lse -inf); a row
    # that sees no key at all has no attention to give (NaN, as before).
    share = torch.sigmoid(lse2 - lse1).unsqueeze(-1)
    out = torch.lerp(out1, out2, share)
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
    prompt_keys, prompt_values, blocked, bias = layer.prompt_forms(_work_dtype(query.dtype))
    out = merged_attention(
        query,
        prompt_keys,
        prompt_values,
        layer.prompt_mask,
        layer.padded_index,
        layer.rows_per_prompt,
        key,
        value,
        allowed,
        scale,
        rows_in_order=layer.rows_in_order,
        prompt_blocked=blocked,
        prompt_bias=bias,
    )
    return out.transpose(1, 2).contiguous(), None


def _continuations_unmasked() -> bool:
    """Whether the active cache's layers are all shared-prompt layers promising unmasked continuations."""
    layers = getattr(_active_caches[-1], "layers", None) if _active_caches else None
    return bool(layers) and all(getattr(layer, "continuation_unmasked", False) for layer in layers)


def shared_prompt_mask(*args, **kwargs):
    """The mask function registered for ``"rankgen_shared_prompt"``: ``sdpa_mask``, except that a one-token step over
    layers with unmasked continuations gets no mask (``None``). There the query sees every continuation key, and the
    prompt's padding is the layer's own ``prompt_mask``; so the mask is neither built nor inspected (``sdpa_mask``
    reads the padding mask on the host to decide whether it can skip it: a synchronisation on a GPU)."""
    q_length = kwargs.get("q_length")
    if q_length is None and isinstance(kwargs.get("cache_position"), torch.Tensor):  # older transformers
        q_length = kwargs["cache_position"].shape[0]
    if (
        not args
        and q_length == 1
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and _continuations_unmasked()
    ):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, shared_prompt_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, shared_prompt_mask)


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


def use_shared_prompt_layers(
    model, cache, attention_mask: torch.Tensor | None, extra_tokens: int, continuation_unmasked: bool = False
) -> bool:
    """Replace the layers of a freshly prefilled ``cache`` (one row per prompt) by :class:`SharedPromptLayer` s when
    :func:`shared_prompt_supported`; returns whether it did. Use it together with :func:`shared_prompt_attention`.
    ``continuation_unmasked``: see :class:`SharedPromptLayer` (True only when every later forward's attention mask is
    all ones past the prompt)."""
    if not shared_prompt_supported(model, cache):
        return False
    first = cache.layers[0]
    length = first.get_seq_length()
    prompts, device = first.keys.shape[0], first.keys.device
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (prompts, length):
            return False
        prompt_mask = attention_mask.to(device=device, dtype=torch.bool)
    else:
        prompt_mask = torch.ones(prompts, length, dtype=torch.bool, device=device)
    memo, row_prompt = _RowMemo(), torch.arange(prompts, device=device)  # shared by every layer
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = SharedPromptLayer(
            layer.keys,
            layer.values,
            prompt_mask,
            extra_tokens,
            continuation_unmasked=continuation_unmasked,
            memo=memo,
            row_prompt=row_prompt,
        )
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
