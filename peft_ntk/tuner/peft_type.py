"""The ``NTK_ATTENTION`` member of PEFT's ``PeftType`` enum, added once when this module is imported.

PEFT only knows the methods named in its closed ``PeftType`` enum, so a plugin has to add the member itself (the
config needs it, so it is made here, below everything else). The member's *value*, ``"NTK_ATTENTION"``, is what
``adapter_config.json`` stores as ``peft_type``, as PEFT's own types store theirs. Adapters saved by versions that
stored a longer value (the instruction spelled out in the value) still load: that value is an alias of the member.
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
