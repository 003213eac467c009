"""The attention function that transformers calls for every NTK-adapted model.

The tuner switches a model's ``attn_implementation`` from ``sdpa`` to ``ntk_sdpa`` (or ``eager`` to ``ntk_eager``). Both
names are registered with ``AttentionInterface`` and, with the matching mask builder, with ``AttentionMaskInterface``:
without a registered mask builder transformers silently drops the padding mask for unknown implementations.

For a module wrapped by an active NTK layer the function runs :func:`peft_ntk.ops.ntk_attention` (its dispatcher picks
the path, and the hook says once why a model's calls fall back to the reference); for every other
attention call (cross-attention, layers left out, adapters disabled) it calls the original implementation with the
mask that implementation expects, so those calls are bit-for-bit what the base model computes.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from ..ops import ntk_attention_reference, plan_ntk_attention
from .layer import running_layer_for, running_position_embeddings_for

try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers: attentions are only requested through output_attentions
    _active_collector = None

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

# base implementation -> our implementation name
NTK_IMPLEMENTATIONS = {"sdpa": "ntk_sdpa", "eager": "ntk_eager"}
BASE_IMPLEMENTATIONS = {ntk: base for base, ntk in NTK_IMPLEMENTATIONS.items()}
_MASK_BUILDERS = {"ntk_sdpa": sdpa_mask, "ntk_eager": eager_mask}


# Called as fn(module, query, key, value, scaling) for every attention call that reaches ntk_attention_forward while set
# (peft_ntk.init_from_text records post-RoPE keys and values this way).
_ATTENTION_CAPTURE: contextvars.ContextVar[Optional[Callable[..., None]]] = contextvars.ContextVar(
    "peft_ntk_attention_capture", default=None
)


@contextlib.contextmanager
def capture_attention_inputs(callback: Callable[..., None]) -> Iterator[None]:
    """Call ``callback(module, query, key, value, scaling)`` for every attention call of NTK-routed models inside.

    ``module`` is the base attention module (wrap it with :func:`peft_ntk.layer.running_layer_for` to get its NTK
    layer, if any); query (B, H, Lq, d) and key/value (B, Hkv, Lk, d) are what transformers hands the attention
    function: after rotary embeddings, keys including any cache. ``scaling`` is the score scale (None: ``d ** -0.5``).
    """
    token = _ATTENTION_CAPTURE.set(callback)
    try:
        yield
    finally:
        _ATTENTION_CAPTURE.reset(token)


def _module_eager_attention(module: nn.Module) -> Callable[..., Any]:
    """The eager attention function of the module's own modeling file (each model family has its own)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _generic_eager_attention


def _generic_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out, weights = ntk_attention_reference(
        query,
        key,
        value,
        None,
        None,
        attention_mask=_with_position_bias(attention_mask, kwargs.get("position_bias")),
        scaling=scaling,
        dropout=dropout,
        return_weights=True,
    )
    return out.transpose(1, 2).contiguous(), weights


def base_attention_function(implementation: str, module: nn.Module) -> Callable[..., Any]:
    base = BASE_IMPLEMENTATIONS[implementation]
    return ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _module_eager_attention(module)


def _with_position_bias(attention_mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor]):
    """Fold an additive position bias (T5) into the mask, as one additive float mask."""
    if position_bias is None:
        return attention_mask
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def _attention_weights_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if _active_collector is None:
        return False
    try:  # transformers records attentions through hooks; its collector says whether they were asked for.
        collected = _active_collector.get()
    except LookupError:
        return False
    return isinstance(collected, dict) and "attentions" in collected


def _unsupported_kwargs(kwargs: dict) -> Optional[str]:
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    return None


def ntk_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention interface: (B,H,Lq,d) query and (B,Hkv,Lk,d) key/value in, (B,Lq,H,dv) out."""
    capture = _ATTENTION_CAPTURE.get()
    if capture is not None:
        capture(module, query, key, value, scaling)
    layer = running_layer_for(module)
    state = layer.prefix_state() if layer is not None else None
    if state is None:
        base = base_attention_function(module.config._attn_implementation, module)
        if is_causal is not None:
            kwargs["is_causal"] = is_causal
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    unsupported = _unsupported_kwargs(kwargs)
    if unsupported is not None:
        raise ValueError(
            f"{type(module).__name__} passes `{unsupported}` to its attention function, which NTK-Attention does not "
            "implement; leave this module out of target_modules."
        )
    if query.shape[1] != layer.num_heads or query.shape[-1] != layer.head_dim:
        raise ValueError(
            f"{type(module).__name__} produced queries with {query.shape[1]} heads of size {query.shape[-1]}, but its "
            f"NTK adapter was built for {layer.num_heads} heads of size {layer.head_dim}. The adapter does not fit this "
            "model; load it on the base model it was trained for."
        )
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    # As in SDPA: a given mask already encodes causality, and a single query attends to every cached key.
    is_causal = is_causal and attention_mask is None and query.shape[2] > 1
    if is_causal and key.shape[2] > query.shape[2]:
        # transformers only skips the mask with more keys than queries when the extra keys are the empty future slots
        # of a static cache (prefill); like its SDPA path, drop them rather than aligning the causal mask to the end.
        q_len = query.shape[2]
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = position_bias[..., :q_len] if position_bias is not None else None
    mask = _with_position_bias(attention_mask, position_bias)
    want_weights = _attention_weights_requested(kwargs)
    training = module.training
    dropout = dropout if training else 0.0
    feature_dropout = state.feature_dropout if training else 0.0
    plan = plan_ntk_attention(
        query,
        key,
        value,
        state.z,
        state.k,
        attention_mask=mask,
        is_causal=is_causal,
        scaling=scaling,
        feature_map=state.feature_map,
        dropout=dropout,
        feature_dropout=feature_dropout,
        return_weights=want_weights,
        feature_query=query_before_rotary(module, query) if state.query_features == "pre_rope" else None,
        backend=state.attention_backend,
        prefix_mass=state.prefix_mass,
    )
    if plan.fallback_reason is not None:
        logger.warning_once(
            f"NTK-Attention uses its reference path (scores materialised) for some calls: {plan.fallback_reason}."
        )
    result = plan.run()
    out, weights = result if want_weights else (result, None)
    return out.transpose(1, 2).contiguous(), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_ROTARY_CHECKED: dict[type, bool] = {}


def query_before_rotary(module: nn.Module, query: torch.Tensor) -> torch.Tensor:
    """The query before its rotary embedding: the rotation undone with the (cos, sin) the module was called with.

    RoPE rotates pairs of dimensions by position-dependent angles (``q·cos + rotate_half(q)·sin``); the inverse
    rotation is ``q·cos − rotate_half(q)·sin``. Checked once per module class against the modeling file's own
    ``apply_rotary_pos_emb``; a model without rotary embeddings passes its query through.
    """
    modeling = sys.modules.get(type(module).__module__)
    apply_rotary = getattr(modeling, "apply_rotary_pos_emb", None)
    position_embeddings = running_position_embeddings_for(module)
    if position_embeddings is None:
        if apply_rotary is None:
            return query  # no rotary embedding: the query has no absolute position to remove
        raise ValueError(
            f"query_features='pre_rope' needs the rotary (cos, sin) that {type(module).__name__} is called with as "
            "`position_embeddings`, and this call has none. Use query_features='post_rope' for this model."
        )
    cos, sin = (t.unsqueeze(1).to(query.dtype) for t in position_embeddings)  # (B, 1, L, rot) like the queries
    rot = cos.shape[-1]
    rotated, passed = query[..., :rot], query[..., rot:]
    unrotated = torch.cat((rotated * cos - _rotate_half(rotated) * sin, passed), dim=-1)
    if not _ROTARY_CHECKED.get(type(module)):
        redone = None
        if apply_rotary is not None and rot == query.shape[-1]:
            with torch.no_grad():
                redone, _ = apply_rotary(unrotated, unrotated, cos.squeeze(1), sin.squeeze(1))
        if redone is None or not torch.allclose(redone, query, atol=1e-3, rtol=1e-3):
            raise ValueError(
                f"query_features='pre_rope' cannot undo the rotary embedding of {type(module).__name__}: it is not "
                "the rotate-half RoPE of Llama, Mistral or Qwen (or is applied to part of the head only). Use "
                "query_features='post_rope' for this model."
            )
        _ROTARY_CHECKED[type(module)] = True
    return unrotated


def register_attention_functions() -> None:
    """Register ``ntk_sdpa`` / ``ntk_eager`` with transformers (idempotent)."""
    for name, mask_builder in _MASK_BUILDERS.items():
        ALL_ATTENTION_FUNCTIONS.register(name, ntk_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_builder)
