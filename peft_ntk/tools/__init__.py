"""Tools on top of the tuner: a prefix from text (:func:`init_from_text`), prefix tuning converted to NTK-Attention
(:func:`convert_prefix_tuning`), and the prefix's share of attention while training (:mod:`.diagnostics`)."""

from .convert import convert_prefix_tuning
from .diagnostics import NTKDiagnosticsCallback, prefix_attention_share
from .init_from_text import init_from_text

__all__ = ["NTKDiagnosticsCallback", "convert_prefix_tuning", "init_from_text", "prefix_attention_share"]
