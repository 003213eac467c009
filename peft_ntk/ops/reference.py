"""NTK-Attention math in plain torch.

This module is the reference every faster path is tested against (:func:`ntk_attention_reference`), together with
the paper's formula written literally (:func:`naive_ntk_attention`). It has no knowledge of transformers or PEFT;
:func:`peft_ntk.ops.ntk_attention` dispatches to the fastest exact path instead.

NTK-Attention adds a virtual, infinitely long prefix to softmax attention. With the prefix kernel replaced by
``phi(q)ᵀ phi(k_p)``, the prefix collapses to two per-head quantities ``Z = Σ_p phi(k_p) v_pᵀ`` and
``k = Σ_p phi(k_p)``, which are trained directly::

    out_i = (Σ_j e^{s_ij} v_j + phi(q_i)ᵀ Z) / (Σ_j e^{s_ij} + phi(q_i)ᵀ k)

It is evaluated in the stable (O, LSE) form, from the ordinary attention output ``O`` and the log-sum-exp ``LSE``
of the scores, so raw logits are never exponentiated (see :func:`ntk_combine`).

``prefix_mass="relative"`` measures the prefix's mass against the input's instead of adding it to ``Σ_j e^{s_ij}``
(:func:`relative_prefix_combine`)::

    out_i = (O_i + φ̂(q_i)ᵀ Z) / (1 + φ̂(q_i)ᵀ k),    φ̂ = phi / Σ_r phi_r

The prefix's share of a row is then ``φ̂ᵀk / (1 + φ̂ᵀk)`` whatever the row's ``e^LSE``, and Adam steps of size lr move
it and the prefix value by about lr from the start.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .common import causal_mask, check_feature_query, check_inputs, compute_dtype_for, repeat_kv_heads
from .feature_maps import FeatureMap, feature_map_and_log_scale, get_feature_map


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


PREFIX_MASSES = ("paper", "relative")


def relative_prefix_combine(
    attn_out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    feature_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix with ``prefix_mass="relative"``: ``(O + φ̂ᵀZ) / (1 + φ̂ᵀk)`` with ``φ̂ = phi(q) / Σ phi(q)``.

    The real keys count as mass 1 whatever their ``e^LSE``: a row with few or weakly matching keys gets no more of the
    prefix than any other. A row with no allowed key (``LSE = -inf``) attends to the prefix alone, as in
    :func:`ntk_combine`. ``phi`` normalised to sum 1 makes the result independent of the map's overall scale (a
    stabilised map's ``e^c`` cancels); a row whose ``phi`` is all zeros (possible with 'relu') gets no prefix.

    Args and returns as :func:`ntk_prefix_combine`; ``lse`` is only read for rows without keys.
    """
    phi, _ = feature_map_and_log_scale(feature_map, query.to(attn_out.dtype))
    if feature_dropout > 0.0:
        phi = F.dropout(phi, p=feature_dropout)
    total = phi.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(phi.dtype).tiny
    phi = phi / torch.where(total > tiny, total, torch.ones((), dtype=phi.dtype, device=phi.device))
    no_keys = torch.isneginf(lse.detach())
    relative_lse = torch.where(no_keys, lse.detach(), torch.zeros((), dtype=attn_out.dtype, device=attn_out.device))
    return ntk_combine(attn_out, relative_lse.to(attn_out.dtype), phi, z.to(attn_out.dtype), k.to(attn_out.dtype))


def prefix_combine_for(prefix_mass: str):
    """The combine of a ``prefix_mass``: :func:`ntk_prefix_combine` ("paper") or :func:`relative_prefix_combine`."""
    if prefix_mass == "paper":
        return ntk_prefix_combine
    if prefix_mass == "relative":
        return relative_prefix_combine
    raise ValueError(f"prefix_mass={prefix_mass!r} is not supported; use one of {PREFIX_MASSES}.")


def ntk_attention_reference(
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
    prefix_mass: str = "paper",
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
        prefix_mass: ``"paper"`` (the prefix's mass adds to the real keys' ``Σ e^s``) or ``"relative"`` (the real keys
            count as mass 1; see :func:`relative_prefix_combine`).

    Half-precision inputs are computed in float32 and the output is cast back to the query's dtype.

    Example::

        >>> import torch
        >>> from peft_ntk.ops import ntk_attention_reference
        >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> z, k = torch.zeros(4, 8, 8), torch.zeros(4, 8)
        >>> out = ntk_attention_reference(q, kv, kv, z, k, is_causal=True)  # Z = 0, k = 0: plain causal attention
        >>> out.shape
        torch.Size([1, 4, 3, 8])
    """
    check_inputs(query, key, value, z, k, attention_mask)
    check_feature_query(feature_query, query)
    combine = prefix_combine_for(prefix_mass)
    out_dtype = query.dtype
    dtype = compute_dtype_for(query.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)

    attn_out, lse, probs = softmax_attention_with_lse(
        query, key, value, attention_mask=attention_mask, is_causal=is_causal, scaling=scaling, dropout=dropout
    )
    if z is None:
        out, weights = attn_out, probs
    else:
        out, real_mass = combine(
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

    Only for tests and benchmarks: it materialises the scores, and its result differs from :func:`ntk_attention_reference` only
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
