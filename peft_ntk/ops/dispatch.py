"""The one place that decides how an NTK-Attention call runs.

:func:`plan_ntk_attention` looks at the call once (device, dtype, mask, dropout, weights, feature map, the caller's
``backend``) and returns an :class:`AttentionPlan`: the path, and why the fused path was not taken where it was not.
``plan.run()`` computes the result. :func:`ntk_attention` is both in one call; the attention hook keeps the plan to
say once why a model's calls fall back.

Paths, fastest first; all compute the same function as :func:`peft_ntk.ops.reference.ntk_attention_reference`, the
reference every path is tested against, and differ from it only by rounding:

=========================  ===========================================================================================
``"fused-triton"``         CUDA, no mask, built-in elu/relu map: the fused kernel and the Triton combine in one
                           autograd Function (the LSE gradient reaches the kernel's backward with no extra pass)
``"fused+triton-combine"`` CUDA, built-in map: (O, LSE) from a fused kernel, then the two Triton combine kernels
``"fused+torch-combine"``  (O, LSE) from a fused kernel (CPU flash or CUDA), then one torch autograd Function
``"fused+autograd-combine"`` as above with the combine left to autograd: feature dropout, or a learned feature map
``"fused+relative-combine"`` ``prefix_mass="relative"``: O from a fused kernel, the relative combine left to autograd
``"fused"``                no prefix state (plain attention) from a fused kernel
``"reference"``            scores materialised: attention dropout, attention weights, devices without a fused kernel
=========================  ===========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers.utils import logging

from .common import check_feature_query, check_inputs, compute_dtype_for, repeat_kv_heads
from .feature_maps import FeatureMap, feature_map_has_trainable_state
from .fused_attention import fused_attention_with_lse
from .kernels import FusedKernel, cuda_kernel_for, device_unavailable_reason, select_kernel
from .reference import ntk_attention_reference, ntk_prefix_combine, prefix_combine_for, relative_prefix_combine
from .torch_combine import fused_prefix_combine
from .triton_combine import triton_combine_unavailable_reason, triton_ntk_attention, triton_prefix_combine

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

#: Whether ``backend="auto"`` uses the fused CUDA path. Set once ``benchmarks/run_gpu.sh tests`` passed on a GPU (an
#: H200, torch 2.11 / CUDA 13.0); a fork that changes the CUDA adapters can set it back to False, so that "auto" keeps
#: the reference on CUDA until its own GPU run, while ``backend="fused"`` still opts in.
CUDA_FUSED_PATH_VALIDATED = True

BACKENDS = ("auto", "fused", "reference")
PATHS = (
    "fused-triton",
    "fused+triton-combine",
    "fused+torch-combine",
    "fused+autograd-combine",
    "fused+relative-combine",
    "fused",
    "reference",
)


def fused_path_unavailable_reason(
    query: torch.Tensor,
    dropout: float,
    return_weights: bool,
    attention_mask: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """Why no fused kernel can serve this call (None when one can)."""
    reason = device_unavailable_reason(query)
    if reason is not None:
        return reason
    if dropout > 0.0:
        return "attention dropout needs the probabilities, which the fused kernel does not expose"
    if return_weights:
        return "output_attentions needs the attention weights, which the fused kernel does not materialise"
    if attention_mask is not None and attention_mask.requires_grad and torch.is_grad_enabled():
        return "the attention bias requires grad, and the fused kernels return no gradient for it"
    has_mask = attention_mask is not None
    if (
        query.device.type == "cuda"
        and cuda_kernel_for(query, query.shape[-1], has_mask, room_for_channel=False) is None
    ):
        return (
            f"no fused CUDA attention kernel (cuDNN, flash, memory-efficient) accepts {query.dtype} queries of head size "
            f"{query.shape[-1]}" + (" with a mask" if has_mask else "") + " on this GPU"
        )
    return None


def auto_uses_fused_path(query: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` takes an available fused path on this device.

    CPU: yes. CUDA: only while :data:`CUDA_FUSED_PATH_VALIDATED` is set; otherwise "auto" keeps the reference and says
    once that ``backend="fused"`` opts in.
    """
    if query.device.type != "cuda" or CUDA_FUSED_PATH_VALIDATED:
        return True
    logger.info_once(
        "NTK-Attention: attention_backend='auto' uses the reference path on CUDA. A fused CUDA path (flash / "
        "memory-efficient kernels, exact LSE gradients, memory linear in the sequence length) is available as an "
        "opt-in, attention_backend='fused', pending validation on a GPU (benchmarks/run_gpu.sh)."
    )
    return False


@dataclass
class AttentionPlan:
    """One NTK-Attention call with its path decided; :meth:`run` computes it.

    ``fallback_reason`` says why the call takes the reference path although ``backend="auto"`` prefers a fused one
    (None when a fused path serves it, or the reference was asked for).
    """

    path: str
    fallback_reason: Optional[str]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    z: Optional[torch.Tensor]
    k: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]
    is_causal: bool
    scaling: Optional[float]
    feature_map: Union[str, FeatureMap]
    dropout: float
    feature_dropout: float
    return_weights: bool
    feature_query: Optional[torch.Tensor]
    kernel: Optional[FusedKernel] = None
    prefix_mass: str = "paper"

    def run(self) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.path == "reference":
            return ntk_attention_reference(
                self.query,
                self.key,
                self.value,
                self.z,
                self.k,
                attention_mask=self.attention_mask,
                is_causal=self.is_causal,
                scaling=self.scaling,
                feature_map=self.feature_map,
                dropout=self.dropout,
                feature_dropout=self.feature_dropout,
                return_weights=self.return_weights,
                feature_query=self.feature_query,
                prefix_mass=self.prefix_mass,
            )
        if self.path == "fused-triton":
            return self._run_one_function()
        return self._run_fused_then_combine()

    def _run_one_function(self) -> torch.Tensor:
        query, key, value = self.query, self.key, self.value
        kernel = self.kernel or select_kernel(query, value, False, room_for_channel=False)
        key, value = key.to(query.dtype), value.to(query.dtype)
        if not kernel.native_gqa:
            key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
        return triton_ntk_attention(
            query,
            key,
            value,
            self.z,
            self.k,
            kernel=kernel,
            is_causal=self.is_causal and query.shape[2] > 1,
            scale=query.shape[-1] ** -0.5 if self.scaling is None else self.scaling,
            feature_map=self.feature_map,
        )

    def _run_fused_then_combine(self) -> torch.Tensor:
        # The combine's output gradient G reaches the attention output as dO = α·G and its LSE as a multiple of α·G,
        # so a row with an LSE gradient always has a non-zero dO: the "out" form always serves, and its check can go.
        out_dtype = self.query.dtype
        attn_out, lse = fused_attention_with_lse(
            self.query,
            self.key,
            self.value,
            attention_mask=self.attention_mask,
            is_causal=self.is_causal,
            scaling=self.scaling,
            kernel=self.kernel,
            # The relative combine reads LSE only where it is -inf (no keys), with no gradient.
            lse_gradient="unchecked_out" if self.z is not None and self.prefix_mass == "paper" else "auto",
        )
        if self.path == "fused":
            return attn_out.to(out_dtype)
        phi_query = self.query if self.feature_query is None else self.feature_query
        args = (attn_out, lse, phi_query, self.z, self.k)
        if self.path == "fused+triton-combine":
            return triton_prefix_combine(*args, feature_map=self.feature_map, out_dtype=out_dtype)
        if self.path == "fused+torch-combine":
            return fused_prefix_combine(*args, feature_map=self.feature_map, out_dtype=out_dtype)
        dtype = compute_dtype_for(out_dtype)
        combine = relative_prefix_combine if self.path == "fused+relative-combine" else ntk_prefix_combine
        out, _ = combine(
            attn_out.to(dtype),
            lse.to(dtype),
            phi_query,
            self.z,
            self.k,
            feature_map=self.feature_map,
            feature_dropout=self.feature_dropout,
        )
        return out.to(out_dtype)


def _fused_path(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    is_causal: bool,
    feature_map: Union[str, FeatureMap],
    feature_dropout: float,
    feature_query: Optional[torch.Tensor],
    prefix_mass: str = "paper",
) -> str:
    """Which fused path serves a call that a fused kernel can take."""
    if z is None:
        return "fused"
    if prefix_mass == "relative":
        return "fused+relative-combine"
    q_len, head_dim, value_dim = query.shape[2], query.shape[-1], value.shape[-1]
    triton_ok = query.is_cuda and triton_combine_unavailable_reason(query, value_dim, feature_map) is None
    if feature_dropout == 0.0 and triton_ok:
        if (
            attention_mask is None
            and feature_query is None  # the one-Function path applies phi to the query it attends with
            and (not is_causal or q_len in (1, key.shape[2]))  # else the causal mask needs aligning: a bias
            and value_dim == head_dim
            and head_dim % 8 == 0
        ):
            return "fused-triton"
        return "fused+triton-combine"
    phi_query = query if feature_query is None else feature_query
    if feature_dropout == 0.0 and not feature_map_has_trainable_state(feature_map, phi_query):
        return "fused+torch-combine"
    return "fused+autograd-combine"


def plan_ntk_attention(
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
    backend: str = "auto",
    kernel: Optional[FusedKernel] = None,
    prefix_mass: str = "paper",
) -> AttentionPlan:
    """Check the inputs and decide the path of one call (arguments as :func:`ntk_attention`).

    ``backend="fused"`` raises a ValueError naming the reason where no fused path can serve the call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    check_inputs(query, key, value, z, k, attention_mask)
    check_feature_query(feature_query, query)
    prefix_combine_for(prefix_mass)  # a clear error for an unknown prefix_mass
    path, reason = "reference", None
    if backend != "reference":
        reason = fused_path_unavailable_reason(query, dropout, return_weights, attention_mask)
        if reason is not None and backend == "fused":
            raise ValueError(
                f"attention_backend='fused' cannot serve this call: {reason}. Use attention_backend='auto' to fall "
                "back to the reference path there."
            )
        if reason is None and (backend == "fused" or auto_uses_fused_path(query)):
            path = _fused_path(
                query,
                key,
                value,
                z,
                attention_mask,
                is_causal,
                feature_map,
                feature_dropout,
                feature_query,
                prefix_mass,
            )
    return AttentionPlan(
        path=path,
        fallback_reason=reason,
        query=query,
        key=key,
        value=value,
        z=z,
        k=k,
        attention_mask=attention_mask,
        is_causal=is_causal,
        scaling=scaling,
        feature_map=feature_map,
        dropout=dropout,
        feature_dropout=feature_dropout,
        return_weights=return_weights,
        feature_query=feature_query,
        kernel=kernel,
        prefix_mass=prefix_mass,
    )


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
    backend: str = "auto",
    prefix_mass: str = "paper",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """NTK-Attention: softmax attention plus a trained, infinitely long virtual prefix, on the fastest exact path.

    Args:
        query: (B, H, Lq, d), after rotary embeddings if the model uses them.
        key, value: (B, Hkv, Lk, d) and (B, Hkv, Lk, dv); ``H % Hkv == 0`` (grouped-query heads).
        z: (H, r, dv) prefix values per query head; ``None`` (with ``k=None``) gives plain attention.
        k: (H, r) prefix normaliser per query head, the effective non-negative vector.
        attention_mask: boolean (True = attend) or additive float, broadcastable to (B, H, Lq, Lk).
        is_causal: apply a causal mask aligned to the end (query i is key position ``Lk - Lq + i``), as with a KV cache.
        scaling: score scale; default ``d ** -0.5``.
        feature_map: a registered name (``"elu"``, the paper's) or a callable ``(..., d) -> (..., r)``.
        dropout: dropout on the attention probabilities over the real keys (pass 0 in eval mode).
        feature_dropout: dropout on ``phi(query)`` (pass 0 in eval mode).
        return_weights: also return (B, H, Lq, Lk) attention weights over the real keys; each row sums to the share of
            attention that is *not* on the virtual prefix (reference path).
        feature_query: (B, H, Lq, d) what phi is applied to, when not ``query`` itself (e.g. the query before its
            rotary embedding).
        backend: ``"auto"`` (a fused kernel where one serves the call, else the reference), ``"fused"`` (a
            ValueError where none can) or ``"reference"`` (scores materialised).
        prefix_mass: ``"paper"`` or ``"relative"``, as :func:`~peft_ntk.ops.reference.ntk_attention_reference`.

    On the fused paths memory grows linearly with the sequence length when no mask is materialised. Half-precision
    inputs are computed in float32 where the path combines, and the output has the query's dtype.

    Example::

        >>> import torch
        >>> from peft_ntk import ntk_attention
        >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> z, k = torch.zeros(4, 8, 8), torch.zeros(4, 8)
        >>> out = ntk_attention(q, kv, kv, z, k, is_causal=True)  # Z = 0, k = 0: plain causal attention
        >>> out.shape
        torch.Size([1, 4, 3, 8])
    """
    return plan_ntk_attention(
        query,
        key,
        value,
        z,
        k,
        attention_mask=attention_mask,
        is_causal=is_causal,
        scaling=scaling,
        feature_map=feature_map,
        dropout=dropout,
        feature_dropout=feature_dropout,
        return_weights=return_weights,
        feature_query=feature_query,
        backend=backend,
        prefix_mass=prefix_mass,
    ).run()


def fused_ntk_attention(
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
    feature_dropout: float = 0.0,
    kernel: Optional[FusedKernel] = None,
    feature_query: Optional[torch.Tensor] = None,
    prefix_mass: str = "paper",
) -> torch.Tensor:
    """:func:`ntk_attention` on a fused path, forced (a ValueError where none can serve), optionally on a given
    :class:`~peft_ntk.ops.kernels.FusedKernel`: what the kernel tests use."""
    return plan_ntk_attention(
        query,
        key,
        value,
        z,
        k,
        attention_mask=attention_mask,
        is_causal=is_causal,
        scaling=scaling,
        feature_map=feature_map,
        feature_dropout=feature_dropout,
        feature_query=feature_query,
        backend="fused",
        kernel=kernel,
        prefix_mass=prefix_mass,
    ).run()
