"""The in-place growing KV-cache layer that RankGen decoding swaps in after the prefill (rankgen_logits/kv_cache.py)."""

from __future__ import annotations

import torch
from helpers import WordCount, batch, no_specials, rankgen, rankgen_and_greedy, record_cached_forwards, tiny_llama_for
from transformers.cache_utils import DynamicCache, DynamicLayer

import rankgen_logits.generation as generation
from rankgen_logits.kv_cache import GrowingKVLayer, use_growing_layers


def _filled_dynamic_layer(keys, values) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def _same(growing: GrowingKVLayer, plain: DynamicLayer) -> None:
    assert growing.get_seq_length() == plain.get_seq_length()
    assert growing.get_mask_sizes(1) == plain.get_mask_sizes(1)
    torch.testing.assert_close(growing.keys, plain.keys, rtol=0, atol=0)
    torch.testing.assert_close(growing.values, plain.values, rtol=0, atol=0)


def test_every_operation_matches_the_dynamic_layer():
    g = torch.Generator().manual_seed(0)
    keys, values = (
        torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64),
    )
    plain = _filled_dynamic_layer(keys, values)
    growing = GrowingKVLayer(keys, values, capacity=7)
    _same(growing, plain)

    for new in (1, 1, 3):  # the third write passes the capacity (7) and reallocates
        k, v = (
            torch.randn(3, 2, new, 4, generator=g, dtype=torch.float64),
            torch.randn(3, 2, new, 4, generator=g, dtype=torch.float64),
        )
        out_plain = plain.update(k, v)
        out_growing = growing.update(k, v)
        torch.testing.assert_close(out_growing[0], out_plain[0], rtol=0, atol=0)
        torch.testing.assert_close(out_growing[1], out_plain[1], rtol=0, atol=0)
    assert growing.capacity >= 10
    _same(growing, plain)

    index = torch.tensor([2, 0, 0, 1, 2])
    plain.reorder_cache(index)
    growing.reorder_cache(index)
    _same(growing, plain)
    plain.batch_select_indices(torch.tensor([4, 1]))
    growing.batch_select_indices(torch.tensor([4, 1]))
    _same(growing, plain)
    plain.batch_repeat_interleave(3)
    growing.batch_repeat_interleave(3)
    _same(growing, plain)
    plain.crop(-2)
    growing.crop(-2)
    _same(growing, plain)
    k, v = (
        torch.randn(6, 2, 1, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 2, 1, 4, generator=g, dtype=torch.float64),
    )
    plain.update(k, v)
    growing.update(k, v)
    _same(growing, plain)


def test_writes_go_into_the_buffer_without_copying_the_cache():
    keys = torch.randn(2, 1, 3, 4)
    growing = GrowingKVLayer(keys, keys.clone(), capacity=10)
    buffer = growing._key_buffer.data_ptr()
    for _ in range(7):
        growing.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
        assert growing.keys.data_ptr() == buffer  # a view of the one buffer, not a new tensor
    assert growing.get_seq_length() == 10 and growing.capacity == 10


def test_only_plain_filled_dynamic_layers_are_replaced():
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), layer_idx=0)
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), layer_idx=1)
    assert use_growing_layers(cache, extra_tokens=5) == 2
    assert all(isinstance(layer, GrowingKVLayer) and layer.capacity == 8 for layer in cache.layers)
    assert use_growing_layers(cache, extra_tokens=5) == 0  # already replaced
    assert use_growing_layers(None, extra_tokens=5) == 0


def test_rankgen_decoding_uses_it_and_gives_the_same_tokens(tok, monkeypatch):
    model = tiny_llama_for(tok)
    inputs = batch(tok)
    kwargs = {"num_beams": 2, "num_samples": 3, "rerank_every": 4, "max_new_tokens": 13, **no_specials(tok)}

    seen = record_cached_forwards(model, monkeypatch)
    # the growing layers are the fallback of shared-prompt attention (tests/test_shared_prompt_attention.py)
    monkeypatch.setattr(generation, "use_shared_prompt_layers", lambda *args, **kw: False)
    growing = rankgen(model, tok, WordCount(), inputs, **kwargs)
    assert seen and all(t is GrowingKVLayer for t, _ in seen)

    monkeypatch.setattr(generation, "use_growing_layers", lambda cache, extra_tokens: 0)
    seen.clear()
    plain = rankgen(model, tok, WordCount(), inputs, **kwargs)
    assert seen and all(t is DynamicLayer for t, _ in seen)
    assert torch.equal(growing, plain)


def test_growing_cache_matches_greedy_generate(tok, monkeypatch):
    """With top_k=1 the samples are greedy: RankGen's rows must then equal transformers' own cached greedy decoding."""
    monkeypatch.setattr(generation, "use_shared_prompt_layers", lambda *args, **kw: False)
    ours, greedy = rankgen_and_greedy(tiny_llama_for(tok), tok)
    assert torch.equal(ours, greedy)
