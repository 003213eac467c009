"""Turn a PEFT prefix-tuning adapter into an NTK-Attention adapter.

Prefix tuning learns, per layer, ``m`` key and value rows that every query attends to. Collapsing them with the NTK
formula, ``Z = Σ_p phi(k_p) v_pᵀ`` and ``k = Σ_p phi(k_p)``, gives an NTK adapter whose attention equals prefix
attention with the prefix kernel ``exp(q·k_p/√d)`` replaced by ``phi(q)ᵀphi(k_p)``, exactly, for any ``phi``. How close
it is to the original (softmax) prefix model then depends only on how well ``phi(q)ᵀphi(k)`` approximates
``exp(q·k/√d)``: poorly for the paper's ``elu`` map; for ``favor`` the error falls as ``feature_dim`` grows, slowly when
``|q|·|k| / √d`` is large (the estimator's variance grows like ``exp(|q + k|² / √d)``).

Prefix keys sit in the KV cache as they are: transformers applies rotary embeddings to the *new* keys only, so the
prefix rows are used without rotation, and so are they here. One difference remains: a prefix-tuned model numbers the
real tokens from ``m`` (the cache already holds ``m`` rows) while the converted model numbers them from 0, which with
RoPE rotates the queries differently against the unrotated prefix keys (attention among real tokens is unaffected).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from peft import get_peft_model
from torch import nn

from ..ops import prefix_state_from_keys_values, repeat_kv_heads
from ..tuner.config import NTKAttentionConfig
from ..tuner.layer import NTKAttentionLayer


def prefix_keys_values(prefix_model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the prefix ``(keys, values)`` as (heads, m, head_dim) tensors from a PEFT prefix-tuning model."""
    config = getattr(prefix_model, "active_peft_config", None)
    if config is None or str(getattr(config, "peft_type", "")) not in ("PeftType.PREFIX_TUNING", "PREFIX_TUNING"):
        raise ValueError(
            "convert_prefix_tuning needs a PeftModel whose active adapter is prefix tuning (PrefixTuningConfig); got "
            f"{type(prefix_model).__name__} with peft_type {getattr(config, 'peft_type', None)!r}."
        )
    if getattr(config, "num_transformer_submodules", 1) != 1:
        raise ValueError("only decoder-only (or encoder-only) prefix-tuning models are supported, not encoder-decoders")
    with torch.no_grad():
        past = prefix_model.get_prompt(batch_size=1)
    if hasattr(past, "layers"):  # a transformers Cache
        pairs = [(layer.keys, layer.values) for layer in past.layers]
    elif hasattr(past, "key_cache"):  # older Cache classes
        pairs = list(zip(past.key_cache, past.value_cache))
    else:  # legacy tuple of (key, value) per layer, each (batch, heads, m, head_dim)
        pairs = [(layer[0], layer[1]) for layer in past]
    return [(keys[0].detach(), values[0].detach()) for keys, values in pairs]


def _layers_in_order(model: nn.Module) -> list[NTKAttentionLayer]:
    layers = [module for module in model.modules() if isinstance(module, NTKAttentionLayer)]
    indices = [getattr(layer.base_layer, "layer_idx", None) for layer in layers]
    if all(isinstance(i, int) for i in indices):
        layers = [layer for _, layer in sorted(zip(indices, layers), key=lambda pair: pair[0])]
    return layers


@torch.no_grad()
def convert_prefix_tuning(
    prefix_model: nn.Module,
    ntk_config: Optional[NTKAttentionConfig] = None,
    *,
    adapter_name: str = "default",
    copy_base: bool = True,
) -> nn.Module:
    """A new PeftModel with an NTK adapter equivalent to the prefix-tuning adapter of ``prefix_model``.

    Args:
        prefix_model: a PeftModel with an active prefix-tuning adapter (decoder-only or encoder-only model).
        ntk_config: the NTK adapter to create (its ``feature_map``/``feature_dim`` choose phi); default
            ``NTKAttentionConfig(task_type=<the prefix model's>)`` (the paper's elu map). Its ``init_weights`` is
            irrelevant: ``Z`` and ``k`` are overwritten.
        adapter_name: name of the new adapter.
        copy_base: deep-copy the base model first (default), so ``prefix_model`` keeps working; ``False`` adapts the
            shared base model in place (saves memory; then do not use ``prefix_model`` afterwards).

    Every adapted layer must have a prefix: all self-attention layers by default, matching prefix tuning's one prefix
    per layer. Key/value heads of grouped-query models are repeated to the query heads.

    Example::

        >>> from peft import PrefixTuningConfig, get_peft_model
        >>> config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
        >>> prefix_model = get_peft_model(base, config)  # doctest: +SKIP
        >>> ntk_model = peft_ntk.convert_prefix_tuning(prefix_model)  # doctest: +SKIP
    """
    pairs = prefix_keys_values(prefix_model)
    if ntk_config is None:
        ntk_config = NTKAttentionConfig(task_type=getattr(prefix_model.active_peft_config, "task_type", None))
    else:
        ntk_config = copy.deepcopy(ntk_config)
    base = prefix_model.get_base_model()
    if copy_base:
        base = copy.deepcopy(base)
    ntk_model = get_peft_model(base, ntk_config, adapter_name=adapter_name)
    layers = _layers_in_order(ntk_model)
    if len(layers) != len(pairs):
        raise ValueError(
            f"the prefix has {len(pairs)} layers but the NTK adapter adapts {len(layers)} attention modules; adapt "
            "every self-attention layer (leave target_modules and layers_to_transform unset)."
        )
    for layer, (keys, values) in zip(layers, pairs):
        if layer.num_heads % keys.shape[0] != 0 or keys.shape[-1] != layer.head_dim:
            raise ValueError(
                f"prefix keys of shape {tuple(keys.shape)} (heads, m, head_dim) do not fit an attention layer with "
                f"{layer.num_heads} heads of size {layer.head_dim}"
            )
        keys = repeat_kv_heads(keys[None], layer.num_heads)[0].to(torch.float64)
        values = repeat_kv_heads(values[None], layer.num_heads)[0].to(torch.float64)
        z, k = prefix_state_from_keys_values(keys, values, layer.adapter_feature_map(adapter_name))
        layer.ntk_z[adapter_name].data.copy_(z.to(layer.ntk_z[adapter_name].dtype))
        layer.ntk_k[adapter_name].data.copy_(k.to(layer.ntk_k[adapter_name].dtype))
    return ntk_model
