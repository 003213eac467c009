"""Saving and sharing NTK-Attention adapters: atomic saves, model cards, ``push_to_hub`` and clear load errors.

The integrations patch PEFT's ``PeftModel`` methods through :class:`peft_ntk._patching.MethodPatch` and act only on
models whose adapters are NTK-Attention adapters; every other model reaches PEFT's own method unchanged.
"""

from .model_card import (
    NTKModelCardCallback,
    disable_ntk_model_cards,
    enable_ntk_model_cards,
    ntk_model_card_section,
    record_training_settings,
    update_ntk_model_card,
)
from .push import (
    disable_hub_integration,
    enable_hub_integration,
    explain_hub_error,
    hub_integration_enabled,
    push_adapter_to_hub,
)
from .saving import (
    atomic_save_pretrained,
    atomic_save_scope,
    disable_atomic_save,
    enable_atomic_save,
    recover_interrupted_save,
)

__all__ = [
    "NTKModelCardCallback",
    "atomic_save_pretrained",
    "atomic_save_scope",
    "disable_atomic_save",
    "disable_hub_integration",
    "disable_ntk_model_cards",
    "enable_atomic_save",
    "enable_hub_integration",
    "enable_ntk_model_cards",
    "explain_hub_error",
    "hub_integration_enabled",
    "ntk_model_card_section",
    "push_adapter_to_hub",
    "record_training_settings",
    "recover_interrupted_save",
    "update_ntk_model_card",
]
