"""NTK-Attention math in plain torch.

This module is the reference every faster kernel is tested against. It has no knowledge of transformers or PEFT.

NTK-Attention adds a virtual, infinitely long prefix to softmax attention. With the prefix kernel replaced by
``phi(q)ᵀ phi(k_p)``, the prefix collapses to two per-head quantities ``Z = Σ_p phi(k_p) v_pᵀ`` and
``k = Σ_p phi(k_p)``, which are trained directly::

    out_i = (Σ_j e^{s_ij} v_j + phi(q_i)ᵀ Z) / (Σ_j e^{s_ij} + phi(q_i)ᵀ k)

It is evaluated in the stable (O, LSE) form, from the ordinary attention output ``O`` and the log-sum-exp ``LSE``
of the scores, so raw logits are never exponentiated (see :func:`ntk_combine`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .feature_maps import (  # noqa: F401  (re-exported: the feature maps used to live here)
    FEATURE_MAPS,
    RANDOM_FEATURE_MAPS,
    FeatureMap,
    PositiveRandomFeatures,
    elu_feature_map,
    feature_map_and_log_scale,
    get_feature_map,
    register_feature_map,
    relu_feature_map,
)


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


def _check_inputs(query, key, value, z, k, attention_mask) -> None:
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


def _check_feature_query(feature_query: Optional[torch.Tensor], query: torch.Tensor) -> None:
    if feature_query is not None and feature_query.shape != query.shape:
        raise ValueError(
            f"feature_query must have the query's shape {tuple(query.shape)}; got {tuple(feature_query.shape)}"
        )


def masked_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
) -> torch.Tensor:
    """Scaled scores (B, H, Lq, Lk) with the mask applied: disallowed keys are -inf, an additive mask is added."""
    key = repeat_kv_heads(key, query.shape[1])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.to(scores.dtype)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(query.shape[2], key.shape[2], query.device), float("-inf"))
    return scores


def softmax_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain materialised softmax attention that also returns the log-sum-exp of each row.

    Returns ``(out (B,H,Lq,dv), lse (B,H,Lq), probs (B,H,Lq,Lk))`` in the dtype of the inputs. A row with no allowed key
    has ``lse = -inf``, zero probabilities and a zero output (never NaN). Dropout acts on the probabilities only, so
    ``lse`` is unaffected by it.
    """
    value = repeat_kv_heads(value, query.shape[1])
    scores = masked_scores(query, key, attention_mask=attention_mask, is_causal=is_causal, scaling=scaling)

    # Rows with no allowed key would give NaN in logsumexp's backward; compute them on zeros and mask afterwards.
    has_key = (scores > float("-inf")).any(dim=-1, keepdim=True)
    safe_scores = torch.where(has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    lse = torch.logsumexp(safe_scores, dim=-1, keepdim=True)
    probs = torch.exp(safe_scores - lse)
    probs = torch.where(has_key, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    lse = torch.where(has_key, lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))

    dropped = F.dropout(probs, p=dropout) if dropout > 0.0 else probs
    out = torch.matmul(dropped, value)
    return out, lse.squeeze(-1), probs


def ntk_combine(
    attn_out: torch.Tensor,
    lse: torch.Tensor,
    phi_query: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the NTK prefix to an attention output given its log-sum-exp.

    With ``S = e^LSE``, ``a = phi(q)ᵀk`` and ``u = phi(q)ᵀZ`` the result is ``(S·O + u) / (S + a)``. Numerator and
    denominator are scaled by ``t = e^min(LSE,0)`` and ``q = e^-max(LSE,0)`` (``t/q = S``, both in ``[0, 1]``), so nothing
    overflows whatever the logit scale, ``a = 0`` gives exactly ``O``, and a row with no allowed key
    (``LSE = -inf``) attends to the prefix alone (``u / a``; 0 if ``a`` is 0 too).

    Args:
        attn_out: (B, H, L, dv) softmax attention output over the real keys.
        lse: (B, H, L) log-sum-exp of the (masked, scaled) scores; ``-inf`` for rows without keys.
        phi_query: (B, H, L, r) feature-mapped queries.
        z: (H, r, dv) and k: (H, r) the prefix state; ``k`` must be non-negative.

    Returns:
        ``(out (B,H,L,dv), real_mass (B,H,L))`` where ``real_mass = S / (S + a)`` is the share of attention on the real
        keys (the rest goes to the prefix).
    """
    a = torch.einsum("bhlr,hr->bhl", phi_query, k)
    u = torch.einsum("bhlr,hrd->bhld", phi_query, z)
    t = torch.exp(lse.clamp(max=0.0))
    q = torch.exp(-lse.clamp(min=0.0))
    denominator = t + q * a
    # Only a row with no keys *and* no prefix mass has a zero denominator; its numerator is q·u, so dividing by 1
    # returns the (finite) prefix value instead of NaN.
    denominator = torch.where(denominator > 0, denominator, torch.ones((), dtype=a.dtype, device=a.device))
    out = (t.unsqueeze(-1) * attn_out + q.unsqueeze(-1) * u) / denominator.unsqueeze(-1)
    return out, t / denominator


def ntk_prefix_combine(
    attn_out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    feature_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the feature map to ``query`` and add the prefix ``(z, k)`` to ``(attn_out, lse)`` with :func:`ntk_combine`.

    This is the one place where phi meets Z and k, for every attention kernel that yields (O, LSE). A map with a
    ``stabilized`` form returns ``phi(q) = e^c · phi_tilde(q)``; the factor ``e^c`` multiplies the whole prefix term,
    which is the same as dividing ``S = e^LSE`` by it, so the combine runs on ``phi_tilde`` and ``LSE − c`` and never
    forms ``e^c`` (exponential features of large queries would overflow or vanish).

    Args:
        attn_out: (B, H, L, dv), lse: (B, H, L) as for :func:`ntk_combine`; query: (B, H, L, d) post-RoPE queries.
        z, k: (H, r, dv), (H, r) prefix state (``k`` non-negative).

    Returns:
        ``(out, real_mass)`` as :func:`ntk_combine`, in the dtype of ``attn_out``.
    """
    phi, log_scale = feature_map_and_log_scale(feature_map, query.to(attn_out.dtype))
    if feature_dropout > 0.0:
        phi = F.dropout(phi, p=feature_dropout)
    if log_scale is not None:
        lse = lse - log_scale.to(lse.dtype)
    return ntk_combine(attn_out, lse, phi, z.to(attn_out.dtype), k.to(attn_out.dtype))


def ntk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
    feature_map: Union[str, FeatureMap] = "elu",
    dropout: float = 0.0,
    feature_dropout: float = 0.0,
    return_weights: bool = False,
    feature_query: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """NTK-Attention: softmax attention plus a trained, infinitely long virtual prefix (reference implementation).

    Args:
        query: (B, H, Lq, d), after rotary embeddings if the model uses them.
        key, value: (B, Hkv, Lk, d) and (B, Hkv, Lk, dv); ``H % Hkv == 0`` (grouped-query heads are repeated).
        z: (H, r, dv) prefix values per query head; ``None`` (with ``k=None``) gives plain attention.
        k: (H, r) prefix normaliser per query head, the effective non-negative vector.
        attention_mask: boolean (True = attend) or additive float, broadcastable to (B, H, Lq, Lk).
        is_causal: apply a causal mask aligned to the end (query i is key position ``Lk - Lq + i``), as with a KV cache.
        scaling: score scale; default ``d ** -0.5``.
        feature_map: a registered name (``"elu"``, the paper's) or a callable ``(..., d) -> (..., r)``.
        dropout: dropout on the attention probabilities over the real keys (pass 0 in eval mode).
        feature_dropout: dropout on ``phi(query)`` (pass 0 in eval mode).
        return_weights: also return (B, H, Lq, Lk) attention weights over the real keys; each row sums to the share of
            attention that is *not* on the virtual prefix.
        feature_query: (B, H, Lq, d) what phi is applied to, when not ``query`` itself (e.g. the query before its
            rotary embedding, so that the prefix term does not depend on absolute positions).

    Half-precision inputs are computed in float32 and the output is cast back to the query's dtype.

    Example::

        >>> import torch
        >>> from peft_ntk import ntk_attention
        >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> z, k = torch.zeros(4, 8, 8), torch.zeros(4, 8)
        >>> out = ntk_attention(q, kv, kv, z, k, is_causal=True)  # Z = 0, k = 0: plain causal attention
        >>> out.shape
        torch.Size([1, 4, 3, 8])
    """
    _check_inputs(query, key, value, z, k, attention_mask)
    _check_feature_query(feature_query, query)
    out_dtype = query.dtype
    dtype = compute_dtype_for(query.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)

    attn_out, lse, probs = softmax_attention_with_lse(
        query, key, value, attention_mask=attention_mask, is_causal=is_causal, scaling=scaling, dropout=dropout
    )
    if z is None:
        out, weights = attn_out, probs
    else:
        out, real_mass = ntk_prefix_combine(
            attn_out,
            lse,
            query if feature_query is None else feature_query.to(dtype),
            z,
            k,
            feature_map=feature_map,
            feature_dropout=feature_dropout,
        )
        weights = probs * real_mass.unsqueeze(-1)
    out = out.to(out_dtype)
    if return_weights:
        return out, weights.to(out_dtype)
    return out


def naive_ntk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scaling: Optional[float] = None,
    feature_map: Union[str, FeatureMap] = "elu",
) -> torch.Tensor:
    """The paper's formula written literally, ``(E v + phi(q)Z) / (ΣE + phi(q)k)`` with ``E = exp(s - max)``.

    Only for tests and benchmarks: it materialises the scores, and its result differs from :func:`ntk_attention` only
    by rounding where neither overflows. It shares the official code's weakness that rows without keys divide by
    ``phi(q)ᵀk`` alone.
    """
    value = repeat_kv_heads(value, query.shape[1])
    scores = masked_scores(query, key, attention_mask=attention_mask, is_causal=is_causal, scaling=scaling)
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=-1e30)
    e = torch.exp(scores - row_max)
    scale = torch.exp(-row_max)
    phi = get_feature_map(feature_map)(query)
    numerator = e @ value + torch.einsum("bhlr,hrd->bhld", phi, z) * scale
    denominator = e.sum(-1, keepdim=True) + torch.einsum("bhlr,hr->bhl", phi, k).unsqueeze(-1) * scale
    return numerator / denominator


class PrefixStateAccumulator:
    """Streaming ``Z = Σ_p phi(k_p) v_pᵀ`` and ``k = Σ_p phi(k_p)`` over chunks of prefix keys and values.

    Adding the chunks of a prefix one by one gives the same ``(Z, k)`` as one pass over the whole prefix (up to float64
    rounding), with memory independent of the prefix length. Sums are kept in float64. For maps with a ``stabilized``
    form (exponential features) each head keeps one running log-scale ``c_h`` shared by *all* its keys, so
    ``Z_h = e^{c_h} Σ_p phi_tilde(k_p) v_pᵀ`` stays exact: a per-key scale would not cancel in the sum. When a chunk
    raises ``c_h`` the sums so far are rescaled, as in online softmax.

    Example::

        >>> import torch
        >>> from peft_ntk.ops import PrefixStateAccumulator, prefix_state_from_keys_values
        >>> keys, values = torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 10, 4, dtype=torch.float64)
        >>> acc = PrefixStateAccumulator("elu")
        >>> acc.add(keys[:, :6], values[:, :6]); acc.add(keys[:, 6:], values[:, 6:])
        >>> z, k = acc.state()
        >>> torch.allclose(z, prefix_state_from_keys_values(keys, values)[0])
        True
    """

    def __init__(self, feature_map: Union[str, FeatureMap] = "elu") -> None:
        self.feature_map = feature_map
        self.z: Optional[torch.Tensor] = None  # (H, r, dv) float64, in units of e^{log_scale}
        self.k: Optional[torch.Tensor] = None  # (H, r)
        self.log_scale: Optional[torch.Tensor] = None  # (H,) or None for plain maps
        self.count = 0

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add prefix rows: ``keys`` (H, m, d) and ``values`` (H, m, dv); a leading batch dim is summed over too."""
        if keys.dim() == 4:
            keys, values = keys.transpose(0, 1).flatten(1, 2), values.transpose(0, 1).flatten(1, 2)
        if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != values.shape[:2]:
            raise ValueError(
                f"prefix keys (H, m, d) and values (H, m, dv) must agree in heads and length; got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}"
            )
        keys, values = keys.to(torch.float64), values.to(torch.float64)
        phi, log_scale = feature_map_and_log_scale(self.feature_map, keys)
        if log_scale is not None:
            chunk_scale = log_scale.amax(dim=1)  # (H,): one scale for all keys of a head
            phi = phi * torch.exp(log_scale - chunk_scale[:, None])[..., None]
        z = torch.einsum("hmr,hmd->hrd", phi, values)
        k = phi.sum(dim=1)
        self.count += keys.shape[1]
        if self.z is None:
            self.z, self.k, self.log_scale = z, k, (chunk_scale if log_scale is not None else None)
            return
        if (self.log_scale is None) != (log_scale is None) or self.z.shape != z.shape:
            raise ValueError(
                f"this chunk gives a prefix state of shape {tuple(z.shape)}, earlier chunks {tuple(self.z.shape)}"
            )
        if log_scale is not None:
            new_scale = torch.maximum(self.log_scale, chunk_scale)
            old_factor, new_factor = torch.exp(self.log_scale - new_scale), torch.exp(chunk_scale - new_scale)
            self.z = self.z * old_factor[:, None, None] + z * new_factor[:, None, None]
            self.k = self.k * old_factor[:, None] + k * new_factor[:, None]
            self.log_scale = new_scale
        else:
            self.z, self.k = self.z + z, self.k + k

    def state(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z (H, r, dv), k (H, r))`` at their true scale, as float64 unless ``dtype`` is given."""
        if self.z is None:
            raise ValueError("no prefix rows were added")
        z, k = self.z, self.k
        if self.log_scale is not None:
            factor = torch.exp(self.log_scale)
            z, k = z * factor[:, None, None], k * factor[:, None]
        if dtype is not None:
            z, k = z.to(dtype), k.to(dtype)
        if not (torch.isfinite(z).all() and torch.isfinite(k).all()):
            raise ValueError(
                "the prefix state overflows (Z or k is not finite): the features of these keys are too large for "
                f"{dtype or torch.float64}. Use fewer or smaller keys, or a bounded feature map such as 'elu'."
            )
        return z, k


def prefix_state_from_keys_values(
    prefix_keys: torch.Tensor, prefix_values: torch.Tensor, feature_map: Union[str, FeatureMap] = "elu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse an explicit prefix (H, m, d) / (H, m, dv) to ``Z = Σ phi(k_p) v_pᵀ`` (H, r, dv) and ``k = Σ phi(k_p)``.

    Differentiable for plain maps (computed in the keys' dtype, as before). Maps with a ``stabilized`` form are
    accumulated in float64 with a shared per-head scale (:class:`PrefixStateAccumulator`) and cast back.
    """
    fn = get_feature_map(feature_map)
    if getattr(fn, "stabilized", None) is None:
        phi = fn(prefix_keys)
        return torch.einsum("hmr,hmd->hrd", phi, prefix_values), phi.sum(dim=1)
    accumulator = PrefixStateAccumulator(fn)
    accumulator.add(prefix_keys, prefix_values)
    return accumulator.state(dtype=prefix_keys.dtype)
