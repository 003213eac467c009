"""RankGen decoding (rankgen_logits.generation / rankgen_logits.patch) on tiny models with fake scorers.

Everything runs on CPU with a tiny randomly initialised Llama and a word-level tokenizer trained here; the scorers are
small classes implementing the protocol, so nothing is downloaded.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from helpers import PROMPTS, ROOT, STORY_WORDS, WordCount, batch, load_script, no_specials, rankgen, tiny_llama_for
from peft import get_peft_model
from transformers import (
    GenerationMixin,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    pipeline,
)
from transformers.testing_utils import CaptureLogger

import peft_ntk
import rankgen_logits
from rankgen_logits import (
    RankGenSettings,
    disable_rankgen_generate,
    enable_rankgen_generate,
    rankgen_generate,
)
from rankgen_logits.generation import logger as generation_logger
from rankgen_logits.generation import split_for_window
from rankgen_logits.patch import rankgen_generate_enabled

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends without the patch."""
    disable_rankgen_generate()
    yield
    disable_rankgen_generate()


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    return tiny_llama_for(tok)


class VectorWordCount(WordCount):
    """The same preference through the vector API: prefix · suffix."""

    def __init__(self, word: str = "cat"):
        super().__init__(word)
        self.prefix_texts: list[str] = []
        self.prefix_calls = 0
        self.suffix_calls = 0

    def encode_prefix(self, texts):
        self.prefix_calls += 1
        self.prefix_texts += list(texts)
        return torch.tensor([[1.0, 0.01 * len(t)] for t in texts])

    def encode_suffix(self, texts):
        self.suffix_calls += 1
        return torch.tensor([[float(t.split().count(self.word)), 0.0] for t in texts])


class ForwardCounter:
    """Records the input_ids shape of every forward call of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def continuations(tok, sequences, prompt_length):
    return tok.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------------------
# settings and argument errors


@pytest.mark.parametrize(
    "field, value",
    [("num_beams", 0), ("num_samples", 0), ("rerank_every", 0), ("mode", "x"), ("scorer_batch_size", 0)],
)
def test_bad_settings_raise_naming_the_value(tok, field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}"):
        RankGenSettings(WordCount(), tokenizer=tok, **{field: value})


def test_bad_scorer_raises(tok):
    with pytest.raises(ValueError, match="score"):
        RankGenSettings(object(), tokenizer=tok)


def test_missing_tokenizer_explains_how_to_pass_it(model, tok):
    with pytest.raises(ValueError, match=r"RankGenSettings\(scorer, tokenizer=tok\).*rankgen_tokenizer=tok"):
        model.generate(
            **batch(tok), custom_generate=rankgen_generate, rankgen=WordCount(), do_sample=True, max_new_tokens=4
        )
    with pytest.raises(ValueError, match="rankgen_tokenizer"):
        model.generate(
            **batch(tok),
            custom_generate=rankgen_generate,
            rankgen=RankGenSettings(WordCount()),
            do_sample=True,
            max_new_tokens=4,
        )


class NonFinite(WordCount):
    """Returns ``value`` for the second candidate of every round."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def score(self, prefixes, continuations):
        scores = super().score(prefixes, continuations)
        scores[1] = self.value
        return scores


class NonFiniteVectors(VectorWordCount):
    def encode_suffix(self, texts):
        vectors = super().encode_suffix(texts)
        vectors[0, 0] = float("nan")
        return vectors


@pytest.mark.parametrize("mode", ["beam", "rerank"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise_naming_the_scorer(model, tok, mode, value):
    with pytest.raises(ValueError, match=r"NonFinite\.score\(\) returned non-finite scores"):
        rankgen(model, tok, NonFinite(value), batch(tok), mode=mode, num_samples=3, max_new_tokens=4, rerank_every=2)


def test_non_finite_vectors_raise_naming_the_scorer(model, tok):
    with pytest.raises(ValueError, match=r"NonFiniteVectors\.encode_prefix\(\)/encode_suffix\(\).*non-finite"):
        rankgen(model, tok, NonFiniteVectors(), batch(tok), num_samples=3, max_new_tokens=4, rerank_every=2)


def test_do_sample_false_is_an_error(model, tok):
    with pytest.raises(ValueError, match="do_sample=True"):
        model.generate(
            **batch(tok),
            custom_generate=rankgen_generate,
            rankgen=RankGenSettings(WordCount(), tokenizer=tok),
            do_sample=False,
            max_new_tokens=4,
        )


def test_transformers_num_beams_is_refused(model, tok):
    settings = RankGenSettings(WordCount(), tokenizer=tok)
    with pytest.raises(ValueError, match=r"RankGenSettings\(num_beams"):
        model.generate(
            **batch(tok),
            custom_generate=rankgen_generate,
            rankgen=settings,
            do_sample=True,
            num_beams=3,
            max_new_tokens=4,
        )


# --------------------------------------------------------------------------------------------------------------------
# the point of it: the scorer steers


@pytest.mark.parametrize("mode", ["beam", "rerank"])
def test_scorer_steers_output_more_than_plain_sampling(model, tok, mode):
    inputs = batch(tok)
    prompt_length = inputs["input_ids"].shape[1]
    common = {"max_new_tokens": 20, **no_specials(tok, tok.eos_token_id)}
    plain, steered = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        out = model.generate(**inputs, do_sample=True, **common)
        plain += [c.split().count("cat") for c in continuations(tok, out, prompt_length)]
        out = rankgen(model, tok, WordCount("cat"), inputs, seed=seed, mode=mode, num_samples=8, **common)
        steered += [c.split().count("cat") for c in continuations(tok, out, prompt_length)]
    plain_mean, steered_mean = sum(plain) / len(plain), sum(steered) / len(steered)
    print(f"{mode}: 'cat' per continuation, plain sampling {plain_mean:.2f}, RankGen {steered_mean:.2f}")
    assert steered_mean > plain_mean + 1.0, (mode, plain_mean, steered_mean)


# --------------------------------------------------------------------------------------------------------------------
# cost: one forward per new token, whatever the batch, beams and samples; the prompt is fed once


@pytest.mark.parametrize("prompts, num_samples", [(PROMPTS[:1], 2), (PROMPTS, 2), (PROMPTS[:1], 10), (PROMPTS, 10)])
def test_kv_cache_is_reused_and_forward_calls_do_not_grow_with_rows(model, tok, prompts, num_samples):
    inputs = batch(tok, prompts)
    new_tokens = 23
    with ForwardCounter(model) as counter:
        rankgen(
            model,
            tok,
            WordCount(),
            inputs,
            num_beams=2,
            num_samples=num_samples,
            rerank_every=5,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early EOS, so the count is exact
        )
    assert counter.shapes[0] == tuple(inputs["input_ids"].shape)  # prefill: one row per prompt
    assert all(length == 1 for _, length in counter.shapes[1:])  # never re-fed
    assert all(rows == len(prompts) * 2 * num_samples for rows, _ in counter.shapes[1:])
    assert len(counter.shapes) == new_tokens  # 1 prefill + (new tokens - 1) decoding steps


@pytest.mark.parametrize(
    "sampling, stock_top_p_calls",
    [({"top_p": 0.9}, 0), ({"top_k": 5, "top_p": 0.9}, 0), ({"top_p": 0.9, "min_p": 0.05}, 6)],
)
def test_top_p_runs_on_candidates_unless_a_processor_follows_it(model, tok, monkeypatch, sampling, stock_top_p_calls):
    """The loop's sampler takes trailing top-k/top-p off transformers' list (no vocabulary sort per step); a processor
    after them (here min_p) keeps transformers' own warpers."""
    from transformers.generation.logits_process import TopPLogitsWarper

    calls = []
    original = TopPLogitsWarper.__call__
    monkeypatch.setattr(
        TopPLogitsWarper, "__call__", lambda self, ids, scores: calls.append(1) or original(self, ids, scores)
    )
    settings = dict(num_samples=3, rerank_every=3, max_new_tokens=6, min_new_tokens=6)
    out = rankgen(model, tok, WordCount(), batch(tok), **settings, **sampling)
    assert out.shape[1] == batch(tok)["input_ids"].shape[1] + 6
    assert len(calls) == stock_top_p_calls


def test_sampling_distribution_of_the_loop_matches_plain_sampling(model, tok):
    """The first new token of RankGen's rerank rows and of plain top-p/top-k sampling follow the same distribution."""
    inputs = batch(tok, PROMPTS[:1])
    sampling = {"top_p": 0.8, "top_k": 10, "temperature": 0.7, **no_specials(tok, tok.eos_token_id)}
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    first = []

    class FirstToken:
        def score(self, prefixes, continuations):
            first.extend(continuations)
            return torch.zeros(len(continuations))

    for seed in range(6):
        rankgen(
            model, tok, FirstToken(), inputs, seed=seed, mode="rerank", num_samples=500, max_new_tokens=1, **sampling
        )
    processors = model._get_logits_processor(
        generation_config=model.generation_config.__class__(do_sample=True, **sampling),
        input_ids_seq_length=inputs["input_ids"].shape[1],
        encoder_input_ids=inputs["input_ids"],
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device="cpu",
    )
    expected = torch.softmax(processors(inputs["input_ids"], logits.double()), -1)[0]
    counts = torch.zeros_like(expected)
    for word in first:
        counts[tok.convert_tokens_to_ids(word.strip())] += 1
    n = len(first)
    sigma = (n * expected * (1 - expected)).sqrt()
    assert bool(((counts - n * expected).abs() <= 4 * sigma + 1e-9).all()), (counts, n * expected)
    assert int((expected > 0).sum()) > 2  # the test is about a real distribution


def test_rerank_mode_is_one_pass_of_n_rows(model, tok):
    inputs = batch(tok)
    scorer = WordCount()
    with ForwardCounter(model) as counter:
        rankgen(model, tok, scorer, inputs, mode="rerank", num_samples=5, max_new_tokens=9, min_new_tokens=9)
    assert len(counter.shapes) == 9 and all(shape == (len(PROMPTS) * 5, 1) for shape in counter.shapes[1:])
    assert len(scorer.calls) == 1 and len(scorer.calls[0][1]) == len(PROMPTS) * 5  # scored once, at the end


def test_vector_scorer_encodes_each_prompt_once(model, tok):
    scorer = VectorWordCount()
    rankgen(model, tok, scorer, batch(tok), rerank_every=4, num_samples=3, max_new_tokens=14, min_new_tokens=14)
    assert scorer.prefix_calls == 1 and sorted(scorer.prefix_texts) == sorted(PROMPTS)
    assert scorer.suffix_calls == 4  # rounds at 4, 8, 12 and the end (14)
    assert scorer.calls == []  # score() is not needed when the vector API is there


def test_max_new_tokens_not_a_multiple_of_rerank_every(model, tok):
    inputs = batch(tok)
    scorer = WordCount()
    out = rankgen(
        model,
        tok,
        scorer,
        inputs,
        rerank_every=5,
        num_samples=3,
        max_new_tokens=13,
        **no_specials(tok, tok.eos_token_id),
    )
    assert out.shape == (len(PROMPTS), inputs["input_ids"].shape[1] + 13)
    assert [len(c[1][0].split()) for c in scorer.calls] == [5, 10, 13]  # rounds after 5, 10 and 13 tokens


# --------------------------------------------------------------------------------------------------------------------
# batches, padding, EOS, outputs


def test_left_padded_batch_matches_each_prompt_alone(model, tok):
    """With top_k=1 sampling is deterministic, so batching must not change any prompt's result: padding, positions
    and the cache rows are right. It must also equal plain greedy decoding."""
    kwargs = {"top_k": 1, "max_new_tokens": 12, "num_samples": 3, "rerank_every": 4, **no_specials(tok)}
    inputs = batch(tok)
    together = rankgen(model, tok, WordCount(), inputs, **kwargs)
    greedy = model.generate(**inputs, do_sample=False, max_new_tokens=12, **no_specials(tok))
    for i, prompt in enumerate(PROMPTS):
        alone = rankgen(model, tok, WordCount(), batch(tok, [prompt]), **kwargs)
        text_together = tok.decode(together[i], skip_special_tokens=True)
        assert text_together == tok.decode(alone[0], skip_special_tokens=True)
        assert text_together == tok.decode(greedy[i], skip_special_tokens=True)


def test_padded_prompts_keep_their_own_prompt_and_scorer_sees_only_it(model, tok):
    inputs = batch(tok)
    scorer = WordCount()
    out = rankgen(model, tok, scorer, inputs, num_samples=4, rerank_every=3, max_new_tokens=10, **no_specials(tok))
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])  # the prompt as given, padding included
    for row in out[:, prompt_length:].tolist():  # no padding inside a continuation, only after its EOS
        end = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        assert tok.pad_token_id not in row[:end] and set(row[end + 1 :]) <= {tok.pad_token_id}
    for prefixes, _ in scorer.calls:
        assert set(prefixes) <= set(PROMPTS)
        # rows stay grouped by prompt: each prompt's candidates, in prompt order
        assert prefixes == sorted(prefixes, key=PROMPTS.index)


class ForceEOS(LogitsProcessor):
    """Forces EOS as the ``at``-th new token in the given rows (all rows when ``rows`` is None)."""

    def __init__(self, eos: int, prompt_length: int, at: int, rows=None):
        self.eos, self.length, self.rows = eos, prompt_length + at - 1, rows

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.length:
            rows = slice(None) if self.rows is None else self.rows
            forced = torch.full_like(scores[rows], -math.inf)
            forced[..., self.eos] = 0
            scores[rows] = forced
        return scores


def test_eos_mid_chunk_sets_the_beam_aside(model, tok):
    """Row 0 ends with EOS as its 7th token (inside the second round of 5). The scorer likes 6-word continuations,
    so that finished candidate survives every later round without occupying rows, and is returned."""

    class LikesSixWords(WordCount):
        def score(self, prefixes, conts):
            self.calls.append((list(prefixes), list(conts)))
            return torch.tensor([-abs(len(c.split()) - 6.0) for c in conts])

    inputs = batch(tok, PROMPTS[:1])
    prompt_length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([ForceEOS(tok.eos_token_id, prompt_length, at=7, rows=[0])])
    scorer = LikesSixWords()
    with ForwardCounter(model) as counter:
        out = rankgen(
            model,
            tok,
            scorer,
            inputs,
            num_beams=2,
            num_samples=4,
            rerank_every=5,
            max_new_tokens=20,
            logits_processor=processors,
            return_dict_in_generate=True,
            **no_specials(tok, tok.eos_token_id),  # EOS only where forced
        )
    sequence = out.sequences[0]
    assert len(sequence) == prompt_length + 7 and sequence[-1] == tok.eos_token_id
    assert out.sequences_scores.tolist() == [0.0]
    rows = [shape[0] for shape in counter.shapes]
    assert rows[1:10] == [8] * 9  # two beams × four samples until the round after token 10
    assert rows[10:] == [4] * 10  # then only the unfinished beam is sampled
    assert len(counter.shapes) == 20
    finished_text = continuations(tok, out.sequences, prompt_length)[0]
    assert scorer.calls[1][1].count(finished_text) == 1  # scored when it finished ...
    assert all(finished_text not in conts for _, conts in scorer.calls[2:])  # ... and not re-scored afterwards


def test_all_beams_finished_stops_early_and_pads_after_eos(model, tok):
    inputs = batch(tok, PROMPTS[:2])
    prompt_length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([ForceEOS(tok.eos_token_id, prompt_length, at=3, rows=None)])
    with ForwardCounter(model) as counter:
        out = rankgen(
            model,
            tok,
            WordCount(),
            inputs,
            num_samples=3,
            rerank_every=5,
            max_new_tokens=20,
            logits_processor=processors,
        )
    assert out.shape[1] <= prompt_length + 3
    for row in out[:, prompt_length:].tolist():
        if tok.eos_token_id in row:
            assert set(row[row.index(tok.eos_token_id) + 1 :]) <= {tok.pad_token_id}
    assert len(counter.shapes) == 3  # stopped once every row had ended


def test_return_dict_scores_are_the_scorers_scores_of_the_returned_text(model, tok):
    inputs = batch(tok)
    out = rankgen(model, tok, VectorWordCount(), inputs, num_samples=4, max_new_tokens=10, return_dict_in_generate=True)
    texts = continuations(tok, out.sequences, inputs["input_ids"].shape[1])
    expected = torch.tensor([float(t.split().count("cat")) + 0.0 for t in texts])
    assert out.sequences_scores.shape == (len(PROMPTS),)
    torch.testing.assert_close(out.sequences_scores, expected)
    fresh = VectorWordCount()
    direct = (fresh.encode_prefix(PROMPTS) * fresh.encode_suffix(texts)).sum(-1)
    torch.testing.assert_close(out.sequences_scores, direct)


def test_same_seed_same_output(model, tok):
    inputs = batch(tok)
    first = rankgen(model, tok, WordCount(), inputs, seed=3, num_samples=4, rerank_every=4, max_new_tokens=10)
    second = rankgen(model, tok, WordCount(), inputs, seed=3, num_samples=4, rerank_every=4, max_new_tokens=10)
    other = rankgen(model, tok, WordCount(), inputs, seed=4, num_samples=4, rerank_every=4, max_new_tokens=10)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_num_return_sequences_returns_the_best_candidates(model, tok):
    inputs = batch(tok, PROMPTS[:2])
    out = rankgen(
        model,
        tok,
        WordCount(),
        inputs,
        num_samples=4,
        max_new_tokens=8,
        num_return_sequences=3,
        return_dict_in_generate=True,
        **no_specials(tok, tok.eos_token_id),
    )
    assert out.sequences.shape[0] == 6
    scores = out.sequences_scores.view(2, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    texts = continuations(tok, out.sequences, inputs["input_ids"].shape[1])
    assert len(set(texts[:3])) == 3 and len(set(texts[3:])) == 3


def test_long_prompt_is_truncated_from_the_left_with_a_warning(tok):
    small = tiny_llama_for(tok, max_positions=32)
    prompt = " ".join(STORY_WORDS[:28])
    inputs = batch(tok, [prompt])
    scorer = WordCount()
    with CaptureLogger(generation_logger) as captured, ForwardCounter(small) as counter:
        out = rankgen(small, tok, scorer, inputs, num_samples=2, max_new_tokens=8, **no_specials(tok, tok.eos_token_id))
    assert "truncated from the left to 24 tokens" in captured.out
    assert counter.shapes[0] == (1, 24)
    assert out.shape == (1, 28 + 8) and torch.equal(out[0, :28], inputs["input_ids"][0])
    assert {p for prefixes, _ in scorer.calls for p in prefixes} == {prompt}  # the scorer sees the whole prompt


# --------------------------------------------------------------------------------------------------------------------
# sliding window for scorers with max_suffix_tokens


def test_split_for_window_by_characters_and_by_tokens(tok):
    text = " one two three four five six"
    assert split_for_window(text, 100) == ("", text)
    earlier, window = split_for_window(text, 3)  # 12 characters, moved to a word boundary
    assert earlier + window == text and window == " five six"
    earlier, window = split_for_window("the cat sat on a mat", 2, tok)
    assert (earlier, window) == ("the cat sat on ", "a mat")
    assert split_for_window("the cat", 2, tok) == ("", "the cat")


def test_long_continuations_are_scored_by_their_last_window(model, tok):
    class Windowed(WordCount):
        max_suffix_tokens = 4
        tokenizer = tok

    scorer = Windowed()
    inputs = batch(tok, PROMPTS[:2])
    kwargs = {"num_samples": 2, "rerank_every": 5, "max_new_tokens": 10, **no_specials(tok, tok.eos_token_id)}
    rankgen(model, tok, scorer, inputs, **kwargs)
    first_round, second_round = scorer.calls
    for (prefixes, suffixes), moved in ((first_round, 1), (second_round, 6)):
        # 5 and then 10 new tokens: the last 4 are scored, the rest goes to the prefix
        assert all(len(suffix.split()) == 4 for suffix in suffixes)
        for prefix in prefixes:
            prompt = next(p for p in PROMPTS if prefix.startswith(p))
            assert len(prefix[len(prompt) :].split()) == moved


# --------------------------------------------------------------------------------------------------------------------
# integration: no patch, the patch, PEFT, pipeline


def test_custom_generate_works_without_the_patch(model, tok):
    assert not rankgen_generate_enabled()
    torch.manual_seed(0)
    out = model.generate(
        **batch(tok),
        custom_generate=rankgen_generate,
        rankgen=WordCount(),
        rankgen_tokenizer=tok,
        do_sample=True,
        max_new_tokens=6,
    )
    assert out.shape[0] == len(PROMPTS)


def test_import_patches_in_a_fresh_process():
    code = (
        "import transformers; plain = transformers.GenerationMixin.generate; import rankgen_logits; "
        "assert rankgen_logits.rankgen_generate_enabled() and transformers.GenerationMixin.generate is not plain"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_is_idempotent_and_reversible(model, tok):
    disable_rankgen_generate()
    original = GenerationMixin.generate
    assert not rankgen_generate_enabled() and not getattr(original, "_rankgen_logits_wrapper", False)
    with pytest.raises(ValueError, match="model_kwargs"):
        model.generate(**batch(tok), rankgen=WordCount(), max_new_tokens=4)

    enable_rankgen_generate()
    patched = GenerationMixin.generate
    enable_rankgen_generate()
    assert GenerationMixin.generate is patched and rankgen_generate_enabled()

    inputs = batch(tok)
    torch.manual_seed(0)
    via_patch = model.generate(**inputs, rankgen=WordCount(), tokenizer=tok, max_new_tokens=6)  # do_sample implied
    direct = rankgen(model, tok, WordCount(), inputs, seed=0, max_new_tokens=6)
    assert torch.equal(via_patch, direct)
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)  # calls without rankgen= are untouched
    assert plain.shape == (len(PROMPTS), inputs["input_ids"].shape[1] + 3)
    with pytest.raises(ValueError, match="do_sample=True"):
        model.generate(**inputs, rankgen=WordCount(), tokenizer=tok, do_sample=False, max_new_tokens=3)

    disable_rankgen_generate()
    disable_rankgen_generate()
    assert GenerationMixin.generate is original and not rankgen_generate_enabled()
    with pytest.raises(ValueError, match="model_kwargs"):
        model.generate(**inputs, rankgen=WordCount(), tokenizer=tok, max_new_tokens=4)
    enable_rankgen_generate()  # back to the state `import rankgen_logits` leaves


def test_peft_model_with_ntk_adapter(tok):
    base = tiny_llama_for(tok)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False))
    inputs = batch(tok)
    settings = RankGenSettings(WordCount(), tokenizer=tok, num_samples=3, rerank_every=4)
    kwargs = {"max_new_tokens": 10, "top_k": 1, **no_specials(tok)}

    enable_rankgen_generate()
    torch.manual_seed(0)
    out = peft_model.generate(**inputs, rankgen=settings, **kwargs)
    # top_k=1 makes the samples deterministic: the result is the adapted model's greedy continuation, so the adapter
    # was active in our decoding loop (and the cache handling agrees with transformers')
    greedy = peft_model.generate(**inputs, do_sample=False, max_new_tokens=10, **no_specials(tok))
    assert torch.equal(out, greedy)
    with peft_model.disable_adapter():
        base_greedy = peft_model.generate(**inputs, do_sample=False, max_new_tokens=10, **no_specials(tok))
    assert not torch.equal(out, base_greedy)
    disable_rankgen_generate()

    torch.manual_seed(0)
    no_patch = peft_model.generate(
        **inputs, custom_generate=rankgen_generate, rankgen=settings, do_sample=True, **kwargs
    )
    assert torch.equal(no_patch, out)


def test_text_generation_pipeline(model, tok):
    enable_rankgen_generate()
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    scorer = WordCount()
    settings = RankGenSettings(scorer, tokenizer=tok, num_samples=4, rerank_every=4)
    torch.manual_seed(0)
    result = generator(PROMPTS[0], rankgen=settings, max_new_tokens=8, return_dict_in_generate=True)
    assert len(result) == 1 and result[0]["generated_text"].startswith(PROMPTS[0])
    assert scorer.calls and {p for prefixes, _ in scorer.calls for p in prefixes} == {PROMPTS[0]}
    new_text = result[0]["generated_text"][len(PROMPTS[0]) :]
    assert "scores" not in result[0]  # per-step logits: none, as for any method that does not return them
    score = result[0]["sequences_scores"]
    score = score[0] if isinstance(score, list) else score  # transformers < 5.2x pipelines wrap it in a list
    assert score == float(new_text.split().count("cat"))
    several = generator(PROMPTS[1], rankgen=settings, max_new_tokens=6, num_return_sequences=2)
    assert len(several) == 2


def test_exports():
    for name in ("RankGenSettings", "rankgen_generate", "enable_rankgen_generate", "disable_rankgen_generate"):
        assert hasattr(rankgen_logits, name)


# --------------------------------------------------------------------------------------------------------------------
# device→host synchronisations: on a GPU each one drains the queue of kernels, so the loop must not add any per step


def _syncs_per_forward(model, run) -> tuple[dict, set]:
    """Run ``run()`` counting device→host reads (benchmarks/host_reads.py's SyncCounter) per window between model
    forwards: window ``f`` holds forward ``f`` and whatever runs before forward ``f + 1`` (for RankGen's loop: the
    sampling of token ``f``, the stopping check and, every L tokens, a scoring round). Also returns the windows in
    which the sampler redid a draw (a nucleus outgrew its candidates)."""
    import rankgen_logits.sampling as sampling

    counter, redone = load_script(ROOT / "benchmarks" / "host_reads.py").SyncCounter(), set()
    counter.mark = 0
    handle = model.register_forward_pre_hook(lambda *_: setattr(counter, "mark", counter.mark + 1))
    restore = sampling._set_rng_state
    sampling._set_rng_state = lambda *args: (redone.add(counter.mark), restore(*args))[1]
    try:
        with counter:
            run()
    finally:
        handle.remove()
        sampling._set_rng_state = restore
    return {f: counter.count(f) for f in range(1, counter.mark + 1)}, redone


@pytest.mark.parametrize("shared", [True, False])
def test_one_device_to_host_sync_per_decode_step(model, tok, monkeypatch, shared):
    """The bound, derived: a decode step reads the device ONCE, the sampler's combined read (are the rows' logits
    finite, which rows' nucleus fit the candidates, the next candidate count, and the loop's "any row unfinished?").
    With shared-prompt attention nothing else in the step reads (no mask is built for the step: the continuation is
    unmasked by construction). With the plain per-row cache, transformers' own mask builder reads the padding mask
    once per forward, as in its own sampling loop, which this is compared with. A scoring round adds one read for the
    candidates (tokens, lengths, finished, prompt), one for the scores (``.tolist()``; their finiteness is checked on
    the host) and, with shared-prompt attention, one for the new rows' layout (for all layers at once). A redone draw (a nucleus
    outgrew its candidates) adds one read per further round of candidates and one for the loop's flags on the final
    tokens. Before this was bounded the loop read 7 times per step (shared) and 5 (plain): the sampler 3, the stopping
    check 1, the mask builder 1, and once per layer to test the mask."""
    import functools

    import rankgen_logits.generation as generation
    from rankgen_logits.sampling import TokenSampler

    if not shared:
        monkeypatch.setattr(generation, "use_shared_prompt_layers", lambda *args, **kw: False)
    # few first candidates, so that the nucleus-fits check is live (the vocabulary is tiny): top-p 0.5 then keeps 16
    monkeypatch.setattr(generation, "TokenSampler", functools.partial(TokenSampler, initial_candidates=2))
    forwards, flatten_at = [0], 7

    def flatten_one_row(module, args, output):  # a near-uniform row at forward 7: its nucleus outgrows 16 candidates
        forwards[0] += 1
        if forwards[0] == flatten_at:
            output.logits[0] /= 1000

    inputs = batch(tok)  # left padding
    new_tokens, every = 16, 5
    kwargs = {"max_new_tokens": new_tokens, "top_p": 0.5, **no_specials(tok)}
    handle = model.register_forward_hook(flatten_one_row)
    try:
        ours, redone = _syncs_per_forward(
            model, lambda: rankgen(model, tok, WordCount(), inputs, num_samples=3, rerank_every=every, **kwargs)
        )
    finally:
        handle.remove()
    assert len(ours) == new_tokens  # prefill + one forward per later token
    decode = range(2, new_tokens)  # window 1 is the prefill; the last one ends with the final round
    rounds = {f for f in decode if f % every == 0}
    common = [f for f in decode if f not in rounds and f not in redone]

    def transformers_sampling():
        torch.manual_seed(0)
        model.generate(**inputs, do_sample=True, num_return_sequences=6, min_new_tokens=new_tokens, **kwargs)

    theirs, _ = _syncs_per_forward(model, transformers_sampling)
    per_step_theirs = max(theirs[f] for f in decode)
    # transformers' loop: its stopping check, and (5.17, 5.24 with padding) the mask builder's padding check
    assert per_step_theirs >= 1
    bound = 1 if shared else per_step_theirs
    assert all(ours[f] <= bound for f in common), (ours, bound)
    assert all(ours[f] <= bound + 2 + shared for f in rounds - redone), (ours, bound)
    assert ours[flatten_at] <= bound + 2, (ours, bound)  # one more round of candidates (16 -> all 33)
    assert len(common) == 10 and flatten_at in redone, (common, redone)  # both cases were exercised


def test_rankgen_scores_are_sequences_scores_and_scores_is_deprecated(model, tok):
    out = rankgen(
        model,
        tok,
        WordCount(),
        batch(tok),
        num_samples=3,
        max_new_tokens=4,
        rerank_every=2,
        return_dict_in_generate=True,
    )
    assert out.sequences_scores.shape == (len(PROMPTS),) and "scores" not in out.keys()
    with pytest.warns(FutureWarning, match="sequences_scores"):
        old = out.scores
    assert torch.equal(old, out.sequences_scores)


CUSTOM_GENERATE_CHILD = """
import json, sys
sys.modules["rankgen_logits"] = None  # a user who cannot install the package: only torch and transformers
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

class WordCount:
    def score(self, prefixes, continuations):
        return torch.tensor([float(c.split().count("cat")) for c in continuations])

folder, model_dir, out = sys.argv[1:]
tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
inputs = tok(["the cat", "a dog and the"], return_tensors="pt", padding=True)
torch.manual_seed(0)
result = model.generate(**inputs, custom_generate=folder, trust_remote_code=True, rankgen={"scorer": WordCount(),
                        "num_samples": 3, "rerank_every": 4}, rankgen_tokenizer=tok, top_p=0.9, max_new_tokens=8,
                        suppress_tokens=[tok.pad_token_id, tok.unk_token_id])
assert "rankgen_logits" not in [m for m in sys.modules if sys.modules[m] is not None]
json.dump(result.tolist(), open(out, "w"))
"""


def test_exported_custom_generate_folder_decodes_like_the_package_without_it(model, tok, tmp_path):
    import json
    import os

    from rankgen_logits.custom_generate import export_custom_generate

    folder = export_custom_generate(tmp_path / "rankgen-decoding")
    assert (folder / "custom_generate" / "generate.py").is_file() and (folder / "README.md").is_file()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CUSTOM_GENERATE_CHILD, str(folder), str(tmp_path / "model"), str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    inputs = tok(["the cat", "a dog and the"], return_tensors="pt", padding=True)
    expected = rankgen(
        model,
        tok,
        WordCount(),
        inputs,
        num_samples=3,
        rerank_every=4,
        top_p=0.9,
        max_new_tokens=8,
        suppress_tokens=[tok.pad_token_id, tok.unk_token_id],
    )
    assert json.loads((tmp_path / "o.json").read_text()) == expected.tolist()
