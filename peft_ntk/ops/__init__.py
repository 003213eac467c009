"""NTK-Attention as tensor ops, with no knowledge of transformers models or PEFT.

- :mod:`.reference`: the plain-torch reference (:func:`ntk_attention_reference`, the stable (O, LSE) form) and the
  paper's formula written literally (:func:`naive_ntk_attention`); every other path is tested against them.
- :mod:`.feature_maps`: ``phi`` (elu, relu, FAVOR+ random features, your own).
- :mod:`.prefix_state`: ``(Z, k)`` from an explicit prefix of keys and values.
- Fused backends: :mod:`.kernels` (torch's fused attention kernels behind one interface), :mod:`.fused_attention`
  (their (O, LSE) with exact LSE gradients), :mod:`.torch_combine` and :mod:`.triton_combine` (the prefix combine).
- :mod:`.dispatch`: the one place that picks the path of a call; :func:`ntk_attention` is it.
"""

from .common import causal_mask, compute_dtype_for, repeat_kv_heads
from .dispatch import AttentionPlan, fused_ntk_attention, ntk_attention, plan_ntk_attention
from .feature_maps import (
    FEATURE_MAPS,
    RANDOM_FEATURE_MAPS,
    FeatureMap,
    PositiveRandomFeatures,
    draw_random_projection,
    elu_feature_map,
    feature_map_and_log_scale,
    get_feature_map,
    register_feature_map,
    relu_feature_map,
)
from .fused_attention import fused_attention_with_lse
from .prefix_state import PrefixStateAccumulator, prefix_state_from_keys_values
from .reference import (
    masked_scores,
    naive_ntk_attention,
    ntk_attention_reference,
    ntk_combine,
    ntk_prefix_combine,
    relative_prefix_combine,
    softmax_attention_with_lse,
)

__all__ = [
    "FEATURE_MAPS",
    "RANDOM_FEATURE_MAPS",
    "AttentionPlan",
    "FeatureMap",
    "PositiveRandomFeatures",
    "PrefixStateAccumulator",
    "causal_mask",
    "compute_dtype_for",
    "draw_random_projection",
    "elu_feature_map",
    "feature_map_and_log_scale",
    "fused_attention_with_lse",
    "fused_ntk_attention",
    "get_feature_map",
    "masked_scores",
    "naive_ntk_attention",
    "ntk_attention",
    "ntk_attention_reference",
    "ntk_combine",
    "ntk_prefix_combine",
    "plan_ntk_attention",
    "prefix_state_from_keys_values",
    "register_feature_map",
    "relative_prefix_combine",
    "relu_feature_map",
    "repeat_kv_heads",
    "softmax_attention_with_lse",
]
