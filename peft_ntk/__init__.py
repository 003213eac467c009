"""NTK-Attention ("Toward Infinite-Long Prefix in Transformer") as a PEFT tuner type.

Importing this package registers the ``NTK_ATTENTION`` adapter type with PEFT and the ``ntk_sdpa`` / ``ntk_eager``
attention implementations with transformers. Both registrations are idempotent.

    >>> import peft_ntk
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_ntk.NTKAttentionConfig())  # doctest: +SKIP
"""

from .attention import ntk_attention_forward, register_attention_functions
from .config import NTKAttentionConfig
from .layer import NTKAttentionLayer
from .model import NTKAttentionModel, find_attention_modules
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

register_with_peft()
register_attention_functions()

__all__ = [
    "FEATURE_MAPS",
    "NTK_PEFT_TYPE",
    "NTKAttentionConfig",
    "NTKAttentionLayer",
    "NTKAttentionModel",
    "atomic_save_pretrained",
    "atomic_save_scope",
    "disable_atomic_save",
    "elu_feature_map",
    "enable_atomic_save",
    "find_attention_modules",
    "naive_ntk_attention",
    "ntk_attention",
    "ntk_attention_forward",
    "ntk_combine",
    "prefix_state_from_keys_values",
    "recover_interrupted_save",
    "register_feature_map",
    "softmax_attention_with_lse",
]
