"""A KV-cache layer that grows in place, for RankGen's decoding loop.

transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, which copies the whole cache of every row at
every step. RankGen decodes B·N rows per prompt, so that copy dominated the loop: 70 % of the CPU time of a beam
search over 8 prompts with 500-token prompts (``torch.profiler``, ``benchmarks/bench_rankgen_loop.py --prompt-words
160 --hidden 256 --layers 4``), and more per prompt at batch 8 than at batch 1, because the copies outgrow the CPU
caches. :class:`GrowingKVLayer` instead writes each token into a buffer allocated once for the prompt plus every new
token, and hands attention a view of the filled part. Attention kernels read such views without copying them (the last
two dimensions stay contiguous).

:func:`use_growing_layers` swaps the plain ``DynamicLayer`` s of a cache for growing ones after the prefill; other layer
types (sliding-window, quantised, offloaded, static) are left as they are.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GrowingKVLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a preallocated ``(batch, heads, capacity, head_dim)`` buffer.

    ``keys`` / ``values`` are always views of the filled part, so everything that reads a ``DynamicLayer`` (masks,
    ``get_seq_length``, attention) reads this layer unchanged. Writing past the capacity doubles it (one copy).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        length = keys.shape[-2]
        capacity = max(int(capacity), length, 1)
        self.device, self.dtype = keys.device, keys.dtype
        self._key_buffer = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._value_buffer = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._key_buffer[..., :length, :] = keys
        self._value_buffer[..., :length, :] = values
        self._length = length
        self.is_initialized = True
        self._refresh_views()

    @property
    def capacity(self) -> int:
        return self._key_buffer.shape[-2]

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]

    def _reallocate(self, rows: torch.Tensor | None = None, capacity: int | None = None) -> None:
        """New buffers holding the filled part (of batch ``rows`` when given) with ``capacity`` slots."""
        if rows is not None and capacity is None:  # one gather of the whole buffer: a single copy, no temporary
            self._key_buffer = self._key_buffer.index_select(0, rows.to(self._key_buffer.device))
            self._value_buffer = self._value_buffer.index_select(0, rows.to(self._value_buffer.device))
            self._refresh_views()
            return
        keys = self.keys if rows is None else self.keys.index_select(0, rows.to(self.keys.device))
        values = self.values if rows is None else self.values.index_select(0, rows.to(self.values.device))
        capacity = self.capacity if capacity is None else capacity
        self._key_buffer = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._value_buffer = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._key_buffer[..., : self._length, :] = keys
        self._value_buffer[..., : self._length, :] = values
        self._refresh_views()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("GrowingKVLayer is created from a filled layer; it is never lazily initialised.")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self._length + new > self.capacity:
            self._reallocate(capacity=max(2 * self.capacity, self._length + new))
        self._key_buffer[..., self._length : self._length + new, :] = key_states
        self._value_buffer[..., self._length : self._length + new, :] = value_states
        self._length += new
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reallocate(rows=beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._reallocate(rows=indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self._key_buffer.shape[0], device=self.device).repeat_interleave(repeats)
        self._reallocate(rows=rows)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # the legacy form: the length to keep
            tokens_to_remove = max(self._length - tokens_to_remove, 0)
        self._length = max(self._length - abs(tokens_to_remove), 0)
        self._refresh_views()

    def reset(self) -> None:
        self._length = 0
        self._refresh_views()

    def offload(self) -> None:
        self._key_buffer = self._key_buffer.to("cpu", non_blocking=True)
        self._value_buffer = self._value_buffer.to("cpu", non_blocking=True)
        self._refresh_views()

    def prefetch(self) -> None:
        if self._key_buffer.device != self.device:
            self._key_buffer = self._key_buffer.to(self.device, non_blocking=True)
            self._value_buffer = self._value_buffer.to(self.device, non_blocking=True)
            self._refresh_views()


def use_growing_layers(cache, extra_tokens: int) -> int:
    """Replace every plain, filled ``DynamicLayer`` of ``cache`` by a :class:`GrowingKVLayer` with room for
    ``extra_tokens`` more tokens. Returns how many layers were replaced (0 when the cache has no such layers)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return 0
    replaced = 0
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.get_seq_length() == 0:
            continue
        layers[i] = GrowingKVLayer(layer.keys, layer.values, layer.get_seq_length() + extra_tokens)
        replaced += 1
    return replaced
