"""Shared-prompt attention (rankgen_logits/shared_prompt.py): each prompt's keys once, merged with each row's own."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import WordCount, batch, no_specials, rankgen, rankgen_and_greedy, record_cached_forwards, tiny_llama_for
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

import rankgen_logits.generation as generation
import rankgen_logits.shared_prompt as shared_prompt
from rankgen_logits.shared_prompt import (
    IMPLEMENTATION,
    SharedPromptLayer,
    merged_attention,
    shared_prompt_supported,
    use_shared_prompt_layers,
)

# transformers 5.24 names the forward's cache argument `cache`; 5.17 calls it `past_key_values`
_CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _reference(query, prompt_keys, prompt_values, prompt_mask, row_prompt, keys, values, scale):
    """Plain attention of every row's query over [its prompt (padding masked); its continuation (causal)]."""
    rows, heads, q, _ = query.shape
    groups = heads // prompt_keys.shape[1]
    full_k = torch.cat([prompt_keys[row_prompt], keys], dim=-2).repeat_interleave(groups, dim=1)
    full_v = torch.cat([prompt_values[row_prompt], values], dim=-2).repeat_interleave(groups, dim=1)
    lp, c = prompt_keys.shape[-2], keys.shape[-2]
    causal = torch.arange(c)[None, :] <= (c - q + torch.arange(q))[:, None]
    allowed = torch.cat([prompt_mask[row_prompt][:, None, :].expand(rows, q, lp), causal.expand(rows, q, c)], dim=-1)
    scores = (query @ full_k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ full_v


@pytest.mark.parametrize("cpu_flash", [True, False])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("row_prompt", [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 2, 2, 0, 2, 2, 2, 0], [1, 1, 1, 1]])
def test_merge_equals_plain_attention_in_float64(row_prompt, q, cpu_flash, monkeypatch):
    """Padding masks, grouped-query heads (4 query / 2 key-value), unequal and unordered rows per prompt (a prompt
    with no rows included); with the fused CPU kernel and with the plain computation used on other devices."""
    monkeypatch.setattr(shared_prompt, "CPU_FLASH", cpu_flash)
    g = torch.Generator().manual_seed(0)
    prompts, kv_heads, heads, lp, c, dim = 3, 2, 4, 7, 5, 8
    row_prompt = torch.tensor(row_prompt)
    rows = len(row_prompt)
    pk = torch.randn(prompts, kv_heads, lp, dim, generator=g, dtype=torch.float64)
    pv = torch.randn(prompts, kv_heads, lp, dim, generator=g, dtype=torch.float64)
    mask = torch.ones(prompts, lp, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[2, :6] = False
    k = torch.randn(rows, kv_heads, c, dim, generator=g, dtype=torch.float64)
    v = torch.randn(rows, kv_heads, c, dim, generator=g, dtype=torch.float64)
    query = torch.randn(rows, heads, q, dim, generator=g, dtype=torch.float64)

    layer = SharedPromptLayer(pk, pv, mask, capacity=2)
    layer.reorder_cache(row_prompt)
    layer.update(k, v)  # past the capacity: reallocates
    assert layer.get_seq_length() == lp + c
    torch.testing.assert_close(layer.keys, k, rtol=0, atol=0)

    out = merged_attention(
        query, pk, pv, mask, layer.padded_index, layer.rows_per_prompt, layer.keys, layer.values, None, 0.3
    )
    expected = _reference(query, pk, pv, mask, row_prompt, k, v, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    # the same with an explicit (sdpa-style, rows × 1 × q × c) continuation mask
    causal = torch.arange(c)[None, :] <= (c - q + torch.arange(q))[:, None]
    out = merged_attention(
        query, pk, pv, mask, layer.padded_index, layer.rows_per_prompt, k, v, causal.expand(rows, 1, q, c), 0.3
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out = merged_attention(  # and a per-head one (rows × heads × q × c)
        query, pk, pv, mask, layer.padded_index, layer.rows_per_prompt, k, v, causal.expand(rows, heads, q, c), 0.3
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cpu_flash", [True, False])
def test_merge_when_a_row_sees_none_of_its_continuation(cpu_flash, monkeypatch):
    """A row whose continuation keys are all masked gets attention over its prompt alone, exactly (its continuation
    part has lse -inf, so the merge gives it no share); the other rows are unchanged."""
    monkeypatch.setattr(shared_prompt, "CPU_FLASH", cpu_flash)
    g = torch.Generator().manual_seed(1)
    prompts, kv_heads, heads, lp, c, dim, q = 2, 2, 4, 6, 4, 8, 1
    row_prompt = torch.tensor([0, 0, 1, 1])
    rows = len(row_prompt)
    pk, pv = (torch.randn(prompts, kv_heads, lp, dim, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(prompts, lp, dtype=torch.bool)
    mask[1, :2] = False
    k, v = (torch.randn(rows, kv_heads, c, dim, generator=g, dtype=torch.float64) for _ in range(2))
    query = torch.randn(rows, heads, q, dim, generator=g, dtype=torch.float64)
    layer = SharedPromptLayer(pk, pv, mask, capacity=c)
    layer.reorder_cache(row_prompt)
    layer.update(k, v)

    allowed = torch.ones(rows, 1, q, c, dtype=torch.bool)
    allowed[2] = False  # row 2 sees only its prompt
    out = merged_attention(query, pk, pv, mask, layer.padded_index, layer.rows_per_prompt, k, v, allowed, 0.4)
    prompt_only = _reference(query, pk, pv, mask, row_prompt, k[:, :, :0], v[:, :, :0], 0.4)
    full = _reference(query, pk, pv, mask, row_prompt, k, v, 0.4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], prompt_only[2], rtol=1e-12, atol=1e-12)
    keep = [0, 1, 3]
    torch.testing.assert_close(out[keep], full[keep], rtol=1e-12, atol=1e-12)

    # and with no continuation keys at all
    empty = k[:, :, :0]
    out = merged_attention(query, pk, pv, mask, layer.padded_index, layer.rows_per_prompt, empty, empty, None, 0.4)
    torch.testing.assert_close(out, prompt_only, rtol=1e-12, atol=1e-12)


def test_model_forward_matches_the_plain_cache(tok):
    """One decode step of a real model through the shared layers equals the step through a repeated plain cache."""
    from rankgen_logits.shared_prompt import shared_prompt_attention

    model = tiny_llama_for(tok).to(torch.float64)
    inputs = batch(tok)
    index = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    outs = []
    for shared in (False, True):
        cache = DynamicCache()
        out = model(**inputs, **{_CACHE: cache}, use_cache=True)
        if shared:
            assert use_shared_prompt_layers(model, cache, inputs["attention_mask"], 4)
        cache.reorder_cache(index)
        mask = inputs["attention_mask"][index]
        tokens = out.logits[:, -1].argmax(-1)[index][:, None]
        with shared_prompt_attention(model, cache, enabled=shared):
            for _ in range(3):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                step = model(input_ids=tokens, attention_mask=mask, **{_CACHE: cache}, use_cache=True)
                tokens = step.logits[:, -1].argmax(-1)[:, None]
        assert model.config._attn_implementation != IMPLEMENTATION
        outs.append(step.logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)


def test_rankgen_uses_it_and_gives_the_same_tokens(tok, monkeypatch):
    model = tiny_llama_for(tok)
    inputs = batch(tok)
    kwargs = {"num_beams": 2, "num_samples": 3, "rerank_every": 4, "max_new_tokens": 13, **no_specials(tok)}

    seen = record_cached_forwards(model, monkeypatch)
    for seed in range(3):
        seen.clear()
        shared = rankgen(model, tok, WordCount(), inputs, seed=seed, **kwargs)
        assert seen and all(t is SharedPromptLayer for t, _ in seen)
        assert {implementation for _, implementation in seen} == {IMPLEMENTATION}
        assert model.config._attn_implementation == "sdpa"  # restored

        with monkeypatch.context() as m:
            m.setattr(generation, "use_shared_prompt_layers", lambda *args, **kw: False)
            seen.clear()
            plain = rankgen(model, tok, WordCount(), inputs, seed=seed, **kwargs)
            assert seen and all(t is not SharedPromptLayer for t, _ in seen)
        assert torch.equal(shared, plain)


def test_unequal_rows_per_prompt_when_survivors_finish(tok, monkeypatch):
    """EOS allowed: finished survivors leave some prompts with fewer rows; the tokens still match the plain path."""
    model = tiny_llama_for(tok, seed=3)
    inputs = batch(tok)
    kwargs = {"num_beams": 2, "num_samples": 3, "rerank_every": 3, "max_new_tokens": 20, "top_k": 4}
    kwargs.update(suppress_tokens=[tok.pad_token_id, tok.unk_token_id])

    unequal = []
    original = SharedPromptLayer._set_rows

    def recording(self, row_prompt):
        original(self, row_prompt)
        counts = torch.bincount(row_prompt)
        unequal.append(bool((counts != counts.max()).any()) or len(counts) < self.prompt_keys.shape[0])

    monkeypatch.setattr(SharedPromptLayer, "_set_rows", recording)
    for seed in range(6):
        shared = rankgen(model, tok, WordCount(), inputs, seed=seed, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(generation, "use_shared_prompt_layers", lambda *args, **kw: False)
            plain = rankgen(model, tok, WordCount(), inputs, seed=seed, **kwargs)
        assert torch.equal(shared, plain)
    assert any(unequal), "no round had unequal rows per prompt; pick other seeds"


def test_matches_greedy_generate(tok):
    """With top_k=1 the samples are greedy: the shared-prompt rows must equal transformers' cached greedy decoding."""
    ours, greedy = rankgen_and_greedy(tiny_llama_for(tok), tok)
    assert torch.equal(ours, greedy)


def test_falls_back_outside_the_plain_case(tok):
    model = tiny_llama_for(tok)
    cache = DynamicCache()
    model(**batch(tok), **{_CACHE: cache}, use_cache=True)
    assert shared_prompt_supported(model, cache)
    model.config._attn_implementation_internal = "flex_attention"
    try:
        assert not shared_prompt_supported(model, cache)
    finally:
        model.config._attn_implementation_internal = "sdpa"
    model.config.sliding_window = 4
    assert not shared_prompt_supported(model, cache)
    model.config.sliding_window = None
    assert not shared_prompt_supported(model, DynamicCache())
