"""NTK-Attention ("Toward Infinite-Long Prefix in Transformer") as a PEFT tuner type.

Importing this package registers the ``NTK_ATTENTION`` adapter type with PEFT and the ``ntk_sdpa`` / ``ntk_eager``
attention implementations with transformers. Both registrations are idempotent.

    >>> import peft_ntk
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_ntk.NTKAttentionConfig())  # doctest: +SKIP
"""

from .attention import ntk_attention_forward, register_attention_functions
from .config import NTKAttentionConfig
from .convert import convert_prefix_tuning
from .diagnostics import NTKDiagnosticsCallback, prefix_attention_share
from .feature_maps import PositiveRandomFeatures
from .hub import disable_hub_integration, enable_hub_integration, push_adapter_to_hub
from .init_from_text import init_from_text
from .layer import NTKAttentionLayer
from .model import NTKAttentionModel, find_attention_modules
from .model_card import NTKModelCardCallback, record_training_settings
from .ops import (
    FEATURE_MAPS,
    elu_feature_map,
    naive_ntk_attention,
    ntk_attention,
    ntk_combine,
    prefix_state_from_keys_values,
    register_feature_map,
    softmax_attention_with_lse,
)
from .registration import NTK_PEFT_TYPE, register_with_peft
from .saving import (
    atomic_save_pretrained,
    atomic_save_scope,
    disable_atomic_save,
    enable_atomic_save,
    recover_interrupted_save,
)

__version__ = "0.1.0"

# AdamW learning rate for Z and k with the default config (zeros init, elu features), with a cosine or linear decay
# and ~10 % warm-up: the best of 1e-3 / 3e-3 / 1e-2 on SmolLM2-135M (docs/results.md).
RECOMMENDED_LEARNING_RATE = 1e-3

register_with_peft()
register_attention_functions()
enable_hub_integration()  # push_to_hub with an NTK model card, NTK cards on every save, clearer Hub load errors

__all__ = [
    "FEATURE_MAPS",
    "NTK_PEFT_TYPE",
    "NTKAttentionConfig",
    "NTKAttentionLayer",
    "NTKAttentionModel",
    "PositiveRandomFeatures",
    "NTKDiagnosticsCallback",
    "NTKModelCardCallback",
    "RECOMMENDED_LEARNING_RATE",
    "atomic_save_pretrained",
    "atomic_save_scope",
    "convert_prefix_tuning",
    "disable_atomic_save",
    "disable_hub_integration",
    "elu_feature_map",
    "enable_atomic_save",
    "enable_hub_integration",
    "find_attention_modules",
    "init_from_text",
    "naive_ntk_attention",
    "ntk_attention",
    "ntk_attention_forward",
    "ntk_combine",
    "prefix_attention_share",
    "prefix_state_from_keys_values",
    "push_adapter_to_hub",
    "record_training_settings",
    "recover_interrupted_save",
    "register_feature_map",
    "softmax_attention_with_lse",
]
