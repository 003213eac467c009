"""Small stand-ins shared by the tests: a RankGen checkpoint in the official layout and a tokenizer for it."""

from __future__ import annotations

import json
import os
import re
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5EncoderModel

TINY_T5 = dict(
    vocab_size=200,
    d_model=32,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    d_kv=8,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,  # as in the T5 v1.1 configs
    dropout_rate=0.1,
)


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


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query heads (4 query / 2 key-value heads of 8), weights large enough that an
    adapter's effect shows, in eval mode."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**(settings | overrides))).to(dtype).eval()
