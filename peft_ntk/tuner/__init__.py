"""NTK-Attention as a PEFT tuner, read bottom-up: the PEFT type (:mod:`.peft_type`), the config (:mod:`.config`), the
layer holding Z and k around one attention module (:mod:`.layer`), the attention function transformers calls
(:mod:`.attention_hook`, which runs :func:`peft_ntk.ops.ntk_attention`), the tuner that wraps a model
(:mod:`.model`), and the tables PEFT looks the type up in (:mod:`.registration`)."""

from .attention_hook import capture_attention_inputs, ntk_attention_forward, register_attention_functions
from .config import (
    RECOMMENDED_LEARNING_RATE,
    RECOMMENDED_LEARNING_RATES,
    NTKAttentionConfig,
    recommended_learning_rate,
)
from .layer import NTKAttentionLayer
from .model import NTKAttentionModel, find_attention_modules
from .peft_type import NTK_PEFT_TYPE
from .registration import register_with_peft

__all__ = [
    "NTK_PEFT_TYPE",
    "NTKAttentionConfig",
    "NTKAttentionLayer",
    "NTKAttentionModel",
    "RECOMMENDED_LEARNING_RATE",
    "RECOMMENDED_LEARNING_RATES",
    "capture_attention_inputs",
    "find_attention_modules",
    "ntk_attention_forward",
    "recommended_learning_rate",
    "register_attention_functions",
    "register_with_peft",
]
