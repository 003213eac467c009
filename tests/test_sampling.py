"""TokenSampler (rankgen_logits/sampling.py) against transformers' own warpers + softmax, the reference op."""

import math

import pytest
import torch
from helpers import ROOT, load_script
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rankgen_logits.sampling import NucleusSettings, TokenSampler, draw, split_processors


def reference_probabilities(processors, logits, input_ids=None):
    """What transformers samples from: every processor, then softmax, in float64."""
    if input_ids is None:
        input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.softmax(LogitsProcessorList(processors)(input_ids, logits.clone()), dim=-1)


def boundary_margin(logits, top_p):
    """How far the nearest head mass of the sorted softmax lies from top_p (the only place float rounding can matter)."""
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    return float((probs.cumsum(-1) - top_p).abs().min())


def logits_of(rows, vocab, std, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * std).to(dtype)


# --- which processors are taken over


def test_split_takes_trailing_top_k_and_top_p_only():
    temp, top_k, top_p = TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9, min_tokens_to_keep=2)
    head, nucleus = split_processors(LogitsProcessorList([temp, top_k, top_p]))
    assert list(head) == [temp] and nucleus == NucleusSettings(top_k=50, top_p=0.9, min_tokens_to_keep=2)
    assert split_processors([top_p])[1] == NucleusSettings(top_p=0.9, min_tokens_to_keep=2)
    assert split_processors([top_k])[1] == NucleusSettings(top_k=50)
    # something after top-p, the other order, a custom filter value, a subclass: the list is kept whole
    min_p = MinPLogitsWarper(0.1)
    assert split_processors([top_k, top_p, min_p]) == (LogitsProcessorList([top_k, top_p, min_p]), None)
    head, nucleus = split_processors([top_p, top_k])
    assert list(head) == [top_p] and nucleus == NucleusSettings(top_k=50)
    assert split_processors([TopPLogitsWarper(0.9, filter_value=-1e4)])[1] is None

    class MyTopP(TopPLogitsWarper):
        pass

    assert split_processors([MyTopP(0.9)])[1] is None
    assert split_processors(None) == (LogitsProcessorList(), None)


# --- the distribution equals transformers', float64


CASES = [
    # (processors, vocab, std): flat and peaked rows, nuclei inside and far beyond the first 64 candidates
    ([TopPLogitsWarper(0.9)], 50, 1.0),
    ([TopPLogitsWarper(0.9)], 3000, 0.5),
    ([TopPLogitsWarper(0.9)], 3000, 4.0),
    ([TopPLogitsWarper(0.5, min_tokens_to_keep=3)], 400, 6.0),
    ([TopPLogitsWarper(0.0)], 300, 1.0),
    ([TopKLogitsWarper(50)], 3000, 1.0),
    ([TopKLogitsWarper(5000)], 3000, 1.0),
    ([TopKLogitsWarper(50), TopPLogitsWarper(0.9)], 3000, 0.5),
    ([TopKLogitsWarper(7), TopPLogitsWarper(0.95)], 40, 3.0),
    ([TemperatureLogitsWarper(0.7), TopKLogitsWarper(200), TopPLogitsWarper(0.8)], 3000, 2.0),
    ([TemperatureLogitsWarper(1.3)], 300, 1.0),
    ([TopKLogitsWarper(3), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)], 300, 1.0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_probabilities_equal_transformers_in_float64(case):
    processors, vocab, std = CASES[case]
    for seed in range(3):
        logits = logits_of(8, vocab, std, seed)
        top_p = next((p.top_p for p in processors if isinstance(p, TopPLogitsWarper)), None)
        if top_p is not None and top_p > 0:
            assert boundary_margin(logits, top_p) > 1e-9, "regenerate: a head mass lies on the boundary"
        sampler = TokenSampler(LogitsProcessorList(processors), initial_candidates=16)
        expected = reference_probabilities(processors, logits)
        ours = sampler.probabilities(logits)
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)


def test_suppressed_tokens_and_ties_at_the_top_k_boundary_match_transformers():
    logits = logits_of(4, 100, 1.0, 0)
    logits[:, :3] = 5.0  # three tokens tied for first place: top_k=2 keeps all three in transformers
    logits[1, 3:] = -math.inf  # only the three tied tokens left
    processors = [SuppressTokensLogitsProcessor([10, 11]), TopKLogitsWarper(2), TopPLogitsWarper(0.95)]
    ours = TokenSampler(LogitsProcessorList(processors)).probabilities(logits)
    expected = reference_probabilities(processors, logits)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
    assert bool((ours[:, :3] > 0).all()) and bool((ours[:, 10:12] == 0).all())


def test_float32_logits_keep_the_same_tokens_as_transformers():
    for processors in ([TopPLogitsWarper(0.9)], [TopKLogitsWarper(100), TopPLogitsWarper(0.9)]):
        logits = logits_of(64, 5000, 3.0, 1, torch.float32)
        ours = TokenSampler(LogitsProcessorList(processors)).probabilities(logits)
        expected = reference_probabilities(processors, logits)
        assert torch.equal(ours > 0, expected > 0)
        torch.testing.assert_close(ours, expected.double(), rtol=1e-5, atol=1e-7)


def test_candidates_grow_and_shrink_with_the_nucleus():
    sampler = TokenSampler(LogitsProcessorList([TopPLogitsWarper(0.9)]), initial_candidates=8)
    flat = logits_of(2, 2000, 0.1, 0)  # a nucleus of ~1,800 tokens
    expected = reference_probabilities([TopPLogitsWarper(0.9)], flat)
    torch.testing.assert_close(sampler.probabilities(flat), expected, rtol=1e-12, atol=1e-15)
    assert sampler.candidates >= 2000
    peaked = logits_of(2, 2000, 8.0, 1)
    sampler.probabilities(peaked)
    assert sampler.candidates <= 64


def test_rows_whose_nucleus_does_not_fit_are_redone_alone():
    sampler = TokenSampler(LogitsProcessorList([TopPLogitsWarper(0.9)]), initial_candidates=8)
    logits = logits_of(6, 2000, 8.0, 2)
    logits[4] = logits_of(1, 2000, 0.1, 3)[0]  # one flat row among peaked ones
    groups = sampler.candidates_and_probabilities(torch.zeros(6, 1, dtype=torch.long), logits)
    assert [rows.tolist() for rows, _, _ in groups] == [[0, 1, 2, 3, 5], [4]]
    assert groups[0][1].shape[1] == 8 and groups[1][1].shape[1] == 2000
    expected = reference_probabilities([TopPLogitsWarper(0.9)], logits)
    torch.testing.assert_close(sampler.probabilities(logits), expected, rtol=1e-12, atol=1e-15)
    torch.manual_seed(0)
    tokens = sampler(torch.zeros(6, 1, dtype=torch.long), logits)
    assert bool((expected.gather(1, tokens[:, None]) > 0).all())


def test_inputs_are_not_modified():
    logits = logits_of(3, 500, 2.0, 0, torch.float32)
    before = logits.clone()
    ids = torch.zeros(3, 4, dtype=torch.long)
    TokenSampler(LogitsProcessorList([TemperatureLogitsWarper(0.5), TopPLogitsWarper(0.9)]))(ids, logits)
    assert torch.equal(logits, before) and torch.equal(ids, torch.zeros(3, 4, dtype=torch.long))


# --- drawing


def test_draw_frequencies_match_the_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.manual_seed(0)
    n = 40_000
    draws = torch.stack([draw(probs) for _ in range(n)])
    counts = torch.stack([torch.bincount(draws[:, r], minlength=5) for r in range(2)]).double()
    expected = probs * n
    sigma = (n * probs * (1 - probs)).sqrt()
    assert bool(((counts - expected).abs() <= 4 * sigma + 1e-9).all()), counts
    assert counts[0, 1] == 0 and counts[0, 4] == 0 and counts[1, 3] == n


def test_draw_never_returns_a_zero_probability_token_at_the_ends(monkeypatch):
    for total in (1.0, 1.5, 3.0, 0.3, 1e-30):  # unnormalised rows too
        probs = torch.tensor([[0.0, 0.25, 0.75, 0.0, 0.0]], dtype=torch.float64) * total
        for u in (0.0, 1.0 - 2**-53):
            monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full(a[0], u, dtype=torch.float64))
            assert draw(probs).item() == (1 if u == 0.0 else 2)


def test_samples_follow_the_distribution_end_to_end():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20_000, 1)
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.9)])
    expected = reference_probabilities(list(processors), logits[:1].double())[0]
    torch.manual_seed(1)
    tokens = TokenSampler(processors)(torch.zeros(len(logits), 1, dtype=torch.long), logits)
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert bool(((freq - expected).abs() <= 4 * (expected * (1 - expected) / len(tokens)).sqrt() + 1e-9).all())
    assert freq[expected == 0].sum() == 0


# --- errors


def test_rows_with_nothing_left_raise_a_clear_error():
    logits = logits_of(3, 50, 1.0, 0, torch.float32)
    logits[1] = -math.inf
    for processors in ([TopPLogitsWarper(0.9)], [TopKLogitsWarper(5), TopPLogitsWarper(0.9)], []):
        with pytest.raises(ValueError, match=r"row\(s\) \[1\].*suppress_tokens"):
            TokenSampler(LogitsProcessorList(processors))(torch.zeros(3, 1, dtype=torch.long), logits)


def test_nan_logits_raise_a_clear_error():
    logits = logits_of(2, 50, 1.0, 0, torch.float32)
    logits[0, 7] = math.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] are NaN"):
        TokenSampler(LogitsProcessorList([TopPLogitsWarper(0.9)]))(torch.zeros(2, 1, dtype=torch.long), logits)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_initial_candidates(value):
    with pytest.raises(ValueError, match="initial_candidates"):
        TokenSampler(initial_candidates=value)


# --- device→host synchronisations (each one drains a GPU's queue; counted here on CPU)


# the counter benchmarks/profile_rankgen_loop.py reports too
SyncCounter = load_script(ROOT / "benchmarks" / "host_reads.py").SyncCounter


@pytest.mark.parametrize(
    "processors, redone_when_mixed",
    [
        ([TopPLogitsWarper(0.9)], True),  # candidates, the nucleus-fits check and the next candidate count
        ([TopKLogitsWarper(50), TopPLogitsWarper(0.9)], False),  # the top-k ties check
        ([TemperatureLogitsWarper(0.7)], False),  # the whole vocabulary
    ],
)
def test_one_device_read_per_call_and_redone_draws_equal_the_sequential_algorithm(processors, redone_when_mixed):
    """Common case: every nucleus fits the first candidates, ONE read (finite rows, ties, fits, next candidate count
    and the caller's flags together). When one row's nucleus does not fit, the draw is redone from the saved random
    state and gives exactly the tokens of the group-by-group algorithm (``candidates_and_probabilities``)."""
    ids = torch.zeros(6, 1, dtype=torch.long)
    peaked = logits_of(6, 2000, 8.0, 2, torch.float32)
    mixed = peaked.clone()
    mixed[4] = logits_of(1, 2000, 0.1, 3, torch.float32)[0]  # a nucleus of ~1,800 tokens
    flat_nucleus = int((TokenSampler(LogitsProcessorList(processors)).probabilities(mixed)[4] > 0).sum())
    width, redo_rounds = 8, 0
    while width < 2000 and width <= flat_nucleus:  # the flat row's candidates grow 4x until its nucleus ends inside
        width, redo_rounds = min(4 * width, 2000), redo_rounds + 1
    for logits, common in ((peaked, True), (mixed, False)):
        redone = not common and redone_when_mixed
        with SyncCounter() as counter:
            TokenSampler(LogitsProcessorList(processors), initial_candidates=8)(ids, logits)
        # one read, plus one per further round of candidates when a nucleus did not fit
        assert counter.count() == 1 + (redo_rounds if redone else 0), counter.events

        sampler = TokenSampler(LogitsProcessorList(processors), initial_candidates=8)
        reference = TokenSampler(LogitsProcessorList(processors), initial_candidates=8)
        torch.manual_seed(0)
        with SyncCounter() as counter:
            tokens, (doubled,), flags = sampler.sample(ids, logits, follow=lambda t: ((2 * t,), (t == t[0]).sum()))
        after = torch.rand(1)
        assert torch.equal(doubled, 2 * tokens) and flags == [float((tokens == tokens[0]).sum())]
        # a redo reads the caller's flags again, for the final tokens
        assert counter.count() == 1 + (redo_rounds + 1 if redone else 0), counter.events
        torch.manual_seed(0)
        expected = torch.empty(6, dtype=torch.long)
        for rows, cand, probs in reference.candidates_and_probabilities(ids, logits):
            choice = draw(probs)
            expected[rows] = choice if cand is None else cand.gather(1, choice[:, None]).squeeze(1)
        assert torch.equal(tokens, expected) and torch.equal(torch.rand(1), after)
        assert sampler.candidates == reference.candidates
