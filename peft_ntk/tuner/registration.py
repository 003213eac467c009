"""Register NTK-Attention with PEFT: its type, config, tuner and prefix tables.

Idempotent: importing ``peft_ntk`` twice, or reloading it, changes nothing. Where ``peft_ntk`` was not imported PEFT
stops with ``KeyError: 'NTK_ATTENTION'``; the adapter's model card says to import it.
"""

from __future__ import annotations

from .config import NTKAttentionConfig
from .model import NTKAttentionModel
from .peft_type import LEGACY_PEFT_TYPE_VALUES, NTK_PEFT_TYPE, NTK_PEFT_TYPE_NAME, NTK_PREFIX


def register_with_peft() -> None:
    """Add NTK-Attention to PEFT's type, config, tuner and prefix tables (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

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
