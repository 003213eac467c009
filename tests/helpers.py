"""Small stand-ins shared by the tests: tiny models of each family, word-level tokenizers, random attention inputs,
the generation tests' prompts and scorer, and a RankGen checkpoint in the official layout with a tokenizer for it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from peft_ntk import NTKAttentionConfig
from rankgen_logits import RankGenConfig, RankGenScorer, RankGenSettings, rankgen_generate

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


# -------------------------------------------------------------------------------------------------- RankGen scorers

TINY_T5 = dict(vocab_size=200, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="gated-gelu")
TINY_T5 |= dict(tie_word_embeddings=False, dropout_rate=0.1)  # untied, as in the T5 v1.1 configs


def pydoc_words() -> list[str]:
    text = " ".join(topics[key] for key in sorted(topics))
    return re.findall(r"[a-z]+", text.lower())


def train_word_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained on pydoc's topics, appending ``</s>`` like T5's."""
    corpus = pydoc_words()
    lines = [" ".join(corpus[i : i + 64]) for i in range(0, len(corpus), 64)]
    lines += ["pre suffi"] * 2000  # the RankGen prompts are whole words here
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=TINY_T5["vocab_size"], special_tokens=["<pad>", "</s>", "<unk>"])
    backend.train_from_iterator(lines, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and len(tok) <= TINY_T5["vocab_size"]
    assert tok.unk_token_id not in tok("pre suffi the")["input_ids"]
    return tok


def write_official_rankgen_checkpoint(
    directory, seed: int = 0, *, with_embed_tokens: bool = False
) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like ``kalpeshk2011/rankgen-t5-*``: remote-code config, ``pytorch_model.bin``."""
    os.makedirs(directory, exist_ok=True)
    config = T5Config(**TINY_T5)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(config)
    state_dict = {f"t5_encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()}
    if not with_embed_tokens:
        del state_dict["t5_encoder.encoder.embed_tokens.weight"]
    state_dict["projection.weight"] = torch.randn(TINY_T5["d_model"], TINY_T5["d_model"]) * 0.2
    # Shaped like the 2022 remote-code configs (a T5 v1.1 config written by transformers 4.x).
    config_dict = {
        "_name_or_path": "google/t5-v1_1-base",
        "architectures": ["T5EncoderWithProjection"],
        "auto_map": {"AutoModel": "modeling_t5.T5EncoderWithProjection"},
        "model_type": "t5",
        **TINY_T5,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "eos_token_id": 1,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "num_decoder_layers": TINY_T5["num_layers"],
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "torch_dtype": "float32",
        "transformers_version": "4.21.1",
        "use_cache": True,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    torch.save(state_dict, os.path.join(directory, "pytorch_model.bin"))
    return state_dict


def tiny_rankgen_scorer(tokenizer, seed: int = 0, **config) -> RankGenScorer:
    """An untrained RankGen scorer built from ``RankGenConfig(**config)``, in training mode."""
    torch.manual_seed(seed)
    return RankGenScorer(RankGenConfig(**config), tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------------ tiny models

VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS, NUM_LABELS = 64, 32, 4, 8, 2, 3
TASK_TYPES = {"bert": "SEQ_CLS", "vit": None, "t5": "SEQ_2_SEQ_LM"}

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=2 * HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
)
_ENCODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN)
TINY_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, _DECODER),
    "mistral": (MistralForCausalLM, MistralConfig, _DECODER),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, _DECODER),
    "gpt2": (
        GPT2LMHeadModel,
        GPT2Config,
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64),
    ),
    "bert": (
        BertForSequenceClassification,
        BertConfig,
        dict(vocab_size=VOCAB, max_position_embeddings=64, num_labels=NUM_LABELS, **_ENCODER),
    ),
    "vit": (ViTForImageClassification, ViTConfig, dict(image_size=16, patch_size=4, num_labels=NUM_LABELS, **_ENCODER)),
    "t5": (
        T5ForConditionalGeneration,
        T5Config,
        dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=HEAD_DIM,
            d_ff=2 * HIDDEN,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
        ),
    ),
    # an architecture that computes attention itself, without an AttentionInterface to route through
    "bloom": (BloomForCausalLM, BloomConfig, dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=1, n_head=HEADS)),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialised tiny model of ``family`` (2 layers of 4 heads of 8) in eval mode, with transformers' own
    initialisation; ``overrides`` go into its config."""
    model_cls, config_cls, settings = TINY_MODELS[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**(settings | overrides))).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """The tiny Llama with weights large enough that an adapter's effect (or a padding bug) shows, in eval mode."""
    return tiny_model("llama", seed, **({"initializer_range": 0.2, "pad_token_id": 0} | overrides)).to(dtype)


def sdpa_llama(seed: int = 0) -> LlamaForCausalLM:
    """``tiny_llama`` without a pad token, on the SDPA attention path named in its config."""
    return tiny_llama(seed, pad_token_id=None, attn_implementation="sdpa")


def tiny_llama_for(tok, seed: int = 0, max_positions: int = 128, **overrides) -> LlamaForCausalLM:
    """``tiny_llama`` with ``tok``'s vocabulary, pad and EOS tokens (and no BOS), ``max_positions`` long."""
    settings = dict(
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    return tiny_llama(seed, **(settings | overrides))


def tiny_base() -> LlamaForCausalLM:
    """The saving and Hub tests' base model: ``tiny_model("llama")`` left in training mode."""
    return tiny_model("llama").train()


def tiny_bert_encoder(vocab_size: int, seed: int = 0, **overrides) -> BertModel:
    """A bare BERT encoder (no task head) of the tiny shape, 64 positions long, in training mode."""
    torch.manual_seed(seed)
    return BertModel(BertConfig(**({"vocab_size": vocab_size, "max_position_embeddings": 64} | _ENCODER | overrides)))


def ntk_config(family: str = "llama", **kwargs) -> NTKAttentionConfig:
    return NTKAttentionConfig(task_type=TASK_TYPES.get(family, "CAUSAL_LM"), **kwargs)


def tiny_llama_ntk(**config):
    """A random NTK adapter (``config``, plus ``attention_dropout`` for the base) on ``tiny_model("llama")``, in
    training mode."""
    base = tiny_model("llama", attention_dropout=config.pop("attention_dropout", 0.0)).train()
    return get_peft_model(base, NTKAttentionConfig(init_weights=False, **config))


def save_llama_adapter(path) -> None:
    """A random (visible) NTK adapter of ``tiny_model("llama")``, saved to ``path``."""
    get_peft_model(tiny_model("llama"), ntk_config(init_weights=False)).save_pretrained(path)


# --------------------------------------------------------------------------------------------- saving and training


def make_different(model) -> None:
    """Other weights *and* another config of the same shapes: any mix of the two saves would load as a third adapter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ntk_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    for config in model.peft_config.values():
        config.feature_map = "relu"


def snapshot(root) -> dict:
    """Every file under ``root`` (and its staging leftovers, if any) with its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Deterministic single-process CPU training arguments at an adapter's learning rate: a log line per step, no
    checkpoints."""
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ------------------------------------------------------------------------------------------------------ tokenizers


def word_level_tokenizer(texts, specials=("[PAD]", "[UNK]", "[EOS]"), **tokens) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of ``texts``, after ``specials`` (ids 0, 1, ...); decoding joins the
    words with spaces. ``tokens`` name the special tokens besides ``[UNK]`` (and may set the padding side)."""
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    raw.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=list(specials)))
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", **tokens)


def generator_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A generator's tokenizer: ``[PAD]``, ``[UNK]``, ``[EOS]``, then one token per word of ``words``; left padding."""
    return word_level_tokenizer([" ".join(words)], pad_token="[PAD]", eos_token="[EOS]", padding_side="left")


# ------------------------------------------------------------------------------------------------------ generation

STORY_WORDS = (
    "the cat sat on a mat dog ran in park with ball bird sang song tree apple banana red blue green house "
    "road car train river hill sun moon star"
).split()
PROMPTS = ["the dog ran in", "a bird sang", "red car on the road", "sun"]


def batch(tok, prompts=PROMPTS):
    return tok(list(prompts), return_tensors="pt", padding=True)


def no_specials(tok, *extra) -> dict:
    """Generation kwargs that keep [PAD]/[UNK] (and EOS unless allowed) out of the samples."""
    return {"suppress_tokens": [tok.pad_token_id, tok.unk_token_id, *extra]}


class WordCount:
    """Prefers continuations with many occurrences of ``word``; records what it is asked."""

    def __init__(self, word: str = "cat"):
        self.word = word
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prefixes, continuations):
        self.calls.append((list(prefixes), list(continuations)))
        return torch.tensor([float(c.split().count(self.word)) for c in continuations])


def rankgen(model, tok, scorer, inputs, seed=0, **kwargs):
    """``model.generate`` with RankGen decoding, sampling unless ``do_sample`` says otherwise, seeded."""
    settings = {k: kwargs.pop(k) for k in ("mode", "num_beams", "num_samples", "rerank_every") if k in kwargs}
    torch.manual_seed(seed)
    return model.generate(
        **inputs,
        custom_generate=rankgen_generate,
        rankgen=RankGenSettings(scorer, tokenizer=tok, **settings),
        **{"do_sample": True, **kwargs},
    )


def rankgen_and_greedy(model, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """RankGen decoding with ``top_k=1`` (every sample greedy) and transformers' own cached greedy decoding."""
    inputs = batch(tok)
    ours = rankgen(
        model, tok, WordCount(), inputs, top_k=1, max_new_tokens=15, num_samples=2, rerank_every=6, **no_specials(tok)
    )
    return ours, model.generate(**inputs, do_sample=False, max_new_tokens=15, **no_specials(tok))


def record_cached_forwards(model, monkeypatch) -> list[tuple[type, str]]:
    """Wraps ``model.forward`` to note, for every call on a filled cache, the type of the cache's first layer and the
    attention implementation in use."""
    seen: list[tuple[type, str]] = []
    original_forward = model.forward

    def recording_forward(*args, **kw):
        cache = kw.get("past_key_values", kw.get("cache"))
        if cache is not None and cache.get_seq_length() > 0:
            seen.append((type(cache.layers[0]), model.config._attn_implementation))
        return original_forward(*args, **kw)

    monkeypatch.setattr(model, "forward", recording_forward)
    return seen


# ------------------------------------------------------------------------------------------------ attention inputs


def make_inputs(b=2, h=4, hkv=2, lq=5, lk=7, d=8, scale=1.0, seed=0, dtype=F64, requires_grad=False):
    """q, k, v, Z (scaled by d^-1/2) and the k-vector of one NTK attention call, as a list."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype) * scale
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=dtype)
    z = torch.randn(h, d, d, generator=g, dtype=dtype) / d**0.5
    kvec = torch.rand(h, d, generator=g, dtype=dtype)
    tensors = [q, k, v, z, kvec]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def padding_mask(b, lq, lk, lengths):
    """Boolean (B,1,Lq,Lk) mask hiding keys past each sequence's length (right padding)."""
    keep = torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :].expand(b, 1, lq, lk)


CASES = {
    "no-mask": dict(),
    "causal-square": dict(lq=7, lk=7, is_causal=True),
    "causal-cache": dict(lq=3, lk=9, is_causal=True),
    "decode": dict(lq=1, lk=9, is_causal=True),
    "padding": dict(mask="padding"),
    "padding+causal": dict(lq=7, lk=7, mask="padding", is_causal=True),
    "mha": dict(hkv=4),
    "mqa": dict(hkv=1),
}


def case_inputs(case, requires_grad=False):
    """(q, k, v, Z, k-vector) and the mask keywords of one of ``CASES``."""
    opts = dict(CASES[case])
    is_causal = opts.pop("is_causal", False)
    mask_kind = opts.pop("mask", None)
    q, k, v, z, kvec = make_inputs(requires_grad=requires_grad, **opts)
    mask = padding_mask(q.shape[0], q.shape[2], k.shape[2], [k.shape[2], k.shape[2] - 3]) if mask_kind else None
    return (q, k, v, z, kvec), dict(attention_mask=mask, is_causal=is_causal)


# --------------------------------------------------------------------------------------------------------- scripts


def load_script(path, name: str | None = None, *, keep: bool = False):
    """The module in the file ``path`` (a script, not an importable module), run afresh; with ``keep`` it is run once
    and registered in ``sys.modules``, where dataclasses look their module up by name."""
    path = Path(path)
    name = name or path.stem
    if keep and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if keep:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py *args`` in a child process on one thread, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
