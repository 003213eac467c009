"""Register NTK-Attention with PEFT and its attention functions with transformers.

PEFT only registers methods named in its closed ``PeftType`` enum, so a plugin has to add the member itself. Both
steps are idempotent: importing ``peft_ntk`` twice, or reloading it, changes nothing.

The member's *value*, ``"NTK_ATTENTION"``, is what ``adapter_config.json`` stores as ``peft_type``, as PEFT's own
types store theirs. Where ``peft_ntk`` was not imported PEFT stops with ``KeyError: 'NTK_ATTENTION'``; the adapter's
model card says to import it. Adapters saved by versions that stored a longer value (the instruction spelled out in
the value) still load: that value is registered as an alias of the member.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

NTK_PEFT_TYPE_NAME = "NTK_ATTENTION"
NTK_PEFT_TYPE_VALUE = NTK_PEFT_TYPE_NAME
# what 0.1.0 stored as peft_type; still accepted when loading
LEGACY_PEFT_TYPE_VALUES = (
    "NTK_ATTENTION (adapter type from the peft-ntk-rankgen package: run `import peft_ntk` first)",
)
NTK_PREFIX = "ntk_"


def _add_peft_type_member() -> PeftType:
    existing = PeftType._member_map_.get(NTK_PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, NTK_PEFT_TYPE_VALUE)
    member._name_ = NTK_PEFT_TYPE_NAME
    member._value_ = NTK_PEFT_TYPE_VALUE
    member.__objclass__ = PeftType
    if hasattr(enum.Enum, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NTK_PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[NTK_PEFT_TYPE_VALUE] = member
    for legacy in LEGACY_PEFT_TYPE_VALUES:
        PeftType._value2member_map_[legacy] = member
    PeftType._member_names_.append(NTK_PEFT_TYPE_NAME)
    # EnumType.__setattr__ refuses new members; the plain type setter makes `PeftType.NTK_ATTENTION` resolve.
    type.__setattr__(PeftType, NTK_PEFT_TYPE_NAME, member)
    return member


NTK_PEFT_TYPE: PeftType = _add_peft_type_member()


def register_with_peft() -> None:
    """Add NTK-Attention to PEFT's type, config, tuner and prefix tables (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from .config import NTKAttentionConfig
    from .model import NTKAttentionModel

    for table, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, NTKAttentionConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, NTKAttentionModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, NTK_PREFIX),
    ):
        current = table.get(NTK_PEFT_TYPE)
        # A reload of peft_ntk brings new class objects with the same names: replace ours, never someone else's.
        ours = getattr(current, "__module__", "").split(".")[0] == "peft_ntk"
        if current is not None and current != value and not ours:
            raise RuntimeError(f"PEFT already has a different {NTK_PEFT_TYPE_NAME} registration: {current!r}")
        table[NTK_PEFT_TYPE] = value
        for legacy in LEGACY_PEFT_TYPE_VALUES:  # PEFT looks the stored string up in these tables
            table[legacy] = value
