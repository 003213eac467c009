"""Shapes, masks and dtypes shared by every NTK-Attention path (reference and fused)."""

from __future__ import annotations

from typing import Optional

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 and cast back; float32/float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def repeat_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, L, d) -> (B, num_heads, L, d); query head h reads key/value head h // (num_heads // Hkv)."""
    kv_heads = x.shape[1]
    if kv_heads == num_heads:
        return x
    return x.repeat_interleave(num_heads // kv_heads, dim=1)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True = attend, aligned to the end: query i sits at key position k_len - q_len + i."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return rows >= torch.arange(k_len, device=device)[None, :]


def check_inputs(query, key, value, z, k, attention_mask) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be 4-D (batch, heads, length, head_dim); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, heads, _, dim = query.shape
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2] or key.shape[0] != value.shape[0]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length")
    if key.shape[0] != batch or key.shape[-1] != dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in batch or head_dim")
    if heads % key.shape[1] != 0:
        raise ValueError(
            f"query has {heads} heads, which is not a multiple of the {key.shape[1]} key/value heads (grouped-query "
            "attention needs num_heads % num_key_value_heads == 0)"
        )
    if z is not None or k is not None:
        if z is None or k is None:
            raise ValueError("pass both z and k, or neither (plain attention)")
        if z.dim() != 3 or z.shape[0] != heads or z.shape[2] != value.shape[-1]:
            raise ValueError(
                f"z must have shape (num_heads={heads}, feature_dim, value_dim={value.shape[-1]}); got {tuple(z.shape)}"
            )
        if k.shape != z.shape[:2]:
            raise ValueError(f"k must have shape {tuple(z.shape[:2])} to match z; got {tuple(k.shape)}")
    if attention_mask is not None:
        target = (batch, heads, query.shape[2], key.shape[2])
        try:
            fits = attention_mask.dim() <= 4 and torch.broadcast_shapes(attention_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to "
                f"(batch, heads, q_len, k_len) = {target}"
            )


def check_feature_query(feature_query: Optional[torch.Tensor], query: torch.Tensor) -> None:
    if feature_query is not None and feature_query.shape != query.shape:
        raise ValueError(
            f"feature_query must have the query's shape {tuple(query.shape)}; got {tuple(feature_query.shape)}"
        )
