"""NTK-Attention ("Toward Infinite-Long Prefix in Transformer") as a PEFT tuner type.

Importing this package registers the ``NTK_ATTENTION`` adapter type with PEFT and the ``ntk_sdpa`` / ``ntk_eager``
attention implementations with transformers, and installs the save and Hub integrations for NTK-Attention adapters
(atomic saves, model cards, ``push_to_hub``; other adapter types keep PEFT's behaviour, and
``disable_atomic_save()`` / ``disable_hub_integration()`` take them out). Every step is idempotent.

    >>> import peft_ntk
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_ntk.NTKAttentionConfig())  # doctest: +SKIP

Layout, along the data path: :mod:`peft_ntk.ops` (the op: reference, fused backends, one dispatcher) →
:mod:`peft_ntk.tuner` (attention hook → layer → tuner → registration) → :mod:`peft_ntk.hub` (saving, model cards,
Hub) and :mod:`peft_ntk.tools` (init from text, prefix-tuning conversion, diagnostics).
"""

import importlib as _importlib
from typing import Any as _Any

from ._deprecated import MOVED_MODULES as _MOVED_MODULES
from ._deprecated import install_moved_module_finder as _install_moved_module_finder
from ._version import __version__
from .hub import (
    NTKModelCardCallback,
    atomic_save_pretrained,
    atomic_save_scope,
    disable_atomic_save,
    disable_hub_integration,
    enable_atomic_save,
    enable_hub_integration,
    push_adapter_to_hub,
    record_training_settings,
    recover_interrupted_save,
)
from .ops import (
    FEATURE_MAPS,
    PositiveRandomFeatures,
    elu_feature_map,
    naive_ntk_attention,
    ntk_attention,
    ntk_attention_reference,
    ntk_combine,
    plan_ntk_attention,
    prefix_state_from_keys_values,
    register_feature_map,
    softmax_attention_with_lse,
)
from .tools import NTKDiagnosticsCallback, convert_prefix_tuning, init_from_text, prefix_attention_share
from .tuner import (
    NTK_PEFT_TYPE,
    RECOMMENDED_LEARNING_RATE,
    RECOMMENDED_LEARNING_RATES,
    NTKAttentionConfig,
    NTKAttentionLayer,
    NTKAttentionModel,
    find_attention_modules,
    ntk_attention_forward,
    recommended_learning_rate,
    register_attention_functions,
    register_with_peft,
)

register_with_peft()
register_attention_functions()
enable_atomic_save()  # NTK-Attention adapters only
enable_hub_integration()  # NTK-Attention adapters only: their model cards and push_to_hub
_install_moved_module_finder()


def __getattr__(name: str) -> _Any:
    if f"{__name__}.{name}" in _MOVED_MODULES:  # `peft_ntk.kernels` and the like, without importing them first
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "RECOMMENDED_LEARNING_RATES",
    "__version__",
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
    "ntk_attention_reference",
    "ntk_combine",
    "plan_ntk_attention",
    "prefix_attention_share",
    "prefix_state_from_keys_values",
    "push_adapter_to_hub",
    "recommended_learning_rate",
    "record_training_settings",
    "recover_interrupted_save",
    "register_feature_map",
    "softmax_attention_with_lse",
]
