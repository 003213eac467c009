"""The prefix combine as two Triton kernels (forward, backward) for CUDA: one pass over the rows each way.

Same math as :mod:`peft_ntk.ops.torch_combine` (whose docstring derives the gradients) for the built-in ``elu`` and
``relu`` feature maps: the forward reads the query, the attention output and the LSE once and writes the output (in the
(B, L, H, d) layout the attention interface returns, so no transpose copy follows) plus α, β and a mass flag per row;
the backward reads them once more and writes dO, dLSE, dq, and per-chunk partial sums of dZ and dk that are added up
in a fixed order (deterministic, no atomics). Products with Z run as fp32 ``tl.dot`` in IEEE precision (no TF32).

Kernels are compiled on first use (``triton`` is imported lazily). With ``TRITON_INTERPRET=1`` they run on CPU tensors
through Triton's interpreter, which is how the CPU tests check them against the reference when Triton is installed.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .feature_maps import elu_feature_map, get_feature_map, relu_feature_map
from .kernels import load_kernel_state, save_kernel_state

_FEATURE_CODES = {elu_feature_map: 0, relu_feature_map: 1}
_MAX_HEAD_DIM = 128  # the backward keeps a (d × dv) fp32 accumulator and Z in registers
_TARGET_PROGRAMS = 512  # backward grid: enough programs to fill the GPU, few partial sums to add


def triton_feature_code(feature_map: Any) -> Optional[int]:
    """0 for the built-in elu map, 1 for relu (by identity, so a re-registered name does not match); else None."""
    try:
        fn = get_feature_map(feature_map)
    except ValueError:
        return None
    return _FEATURE_CODES.get(fn)


def triton_combine_unavailable_reason(query: torch.Tensor, value_dim: int, feature_map: Any) -> Optional[str]:
    if triton_feature_code(feature_map) is None:
        return "the Triton combine implements the built-in 'elu' and 'relu' feature maps only"
    if max(query.shape[-1], value_dim) > _MAX_HEAD_DIM:
        return f"head sizes above {_MAX_HEAD_DIM} are left to the torch combine"
    if _kernels() is None:
        return "triton is not installed"
    return None


@functools.lru_cache(maxsize=1)
def _kernels():
    """(forward, backward) Triton kernels, or None without triton. Reload the kernel module after changing
    ``TRITON_INTERPRET`` (the tests do) and clear this cache."""
    try:
        from . import _triton_combine_kernels as module
    except ImportError:
        return None
    return module.combine_forward, module.combine_backward


def _forward_blocks(head_dim: int, value_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_L, BLOCK_D, BLOCK_DV, num_warps); tl.dot needs every dimension ≥ 16."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    block_dv = max(16, 1 << (value_dim - 1).bit_length())
    wide = max(block_d, block_dv) > 64
    return (32 if wide else 64), block_d, block_dv, (8 if wide else 4)


def _backward_blocks(head_dim: int, value_dim: int) -> tuple[int, int, int, int]:
    """The backward holds Z and the dZ accumulator besides ~7 row tiles: shorter row tiles keep it in registers."""
    _, block_d, block_dv, warps = _forward_blocks(head_dim, value_dim)
    return (16 if max(block_d, block_dv) > 64 else 32), block_d, block_dv, warps


def _dot_precision(tensor: torch.Tensor) -> str:
    """fp32 inputs: IEEE products (the reference's precision). Half-precision inputs: TF32 tensor cores, whose
    2^-11 relative rounding is below the 2^-8 (bf16) or 2^-11 (fp16) of the inputs and the output, where the GPU has
    them (NVIDIA from Ampere on; not ROCm, not Triton's interpreter)."""
    if tensor.dtype == torch.float32 or not _has_tf32(tensor.device):
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=16)
def _has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.cuda is not None and torch.cuda.get_device_capability(device)[0] >= 8


def _last_dim_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _combine_forward(attn_out, lse, query, z, k, feature_code: int, out_dtype: torch.dtype):
    """Launch the forward kernel: (out stored as (B, L, H, dv), zk, stats)."""
    forward_kernel, _ = _kernels()
    batch, heads, length, head_dim = query.shape
    value_dim = attn_out.shape[-1]
    zk = torch.cat([z.float(), k.float().unsqueeze(-1)], dim=-1).contiguous()  # (H, r, dv + 1)
    # (B, L, H, dv) storage seen as (B, H, L, dv): the attention interface's transpose then needs no copy
    out = torch.empty((batch, length, heads, value_dim), dtype=out_dtype, device=query.device).transpose(1, 2)
    stats = torch.empty((batch * heads, 3, length), dtype=torch.float32, device=query.device)
    block_l, block_d, block_dv, warps = _forward_blocks(head_dim, value_dim)
    forward_kernel[(triton_cdiv(length, block_l), batch * heads)](
        query, attn_out, lse, zk, out, stats,
        *query.stride()[:3], *attn_out.stride()[:3], *lse.stride(), *out.stride()[:3],
        heads, length, head_dim, value_dim, head_dim**-0.25,
        BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DV=block_dv, FEATURE=feature_code,
        PRECISION=_dot_precision(query), num_warps=warps,
    )  # fmt: skip
    return out, zk, stats


def _combine_backward(grad, attn_out, query, zk, stats, feature_code: int, *, shifted_out: bool):
    """Launch the backward kernel: (dq, dO, dLSE or out', dZ, dk); dZ, dk in float32."""
    _, backward_kernel = _kernels()
    (grad,) = _last_dim_contiguous(grad)
    batch, heads, length, head_dim = query.shape
    value_dim = attn_out.shape[-1]
    block_l, block_d, block_dv, warps = _backward_blocks(head_dim, value_dim)
    blocks = triton_cdiv(length, block_l)
    # a power of two (a compile-time loop count: few distinct kernels), at most 64 row blocks per program
    per_program = 1 << min(6, max(0, (blocks * batch * heads // _TARGET_PROGRAMS).bit_length() - 1))
    chunks = triton_cdiv(blocks, per_program)
    grad_q = torch.empty_like(query)
    grad_o = torch.empty_like(attn_out)
    if shifted_out:
        third = torch.empty_like(attn_out)  # out', laid out as the attention output (and dO)
    else:
        third = torch.empty((batch, heads, length), dtype=torch.float32, device=query.device)
    partials = torch.empty((batch * heads, chunks, block_d, block_dv + 1), dtype=torch.float32, device=query.device)
    backward_kernel[(chunks, batch * heads)](
        query, attn_out, grad, stats, zk, grad_q, grad_o, third, partials,
        *query.stride()[:3], *attn_out.stride()[:3], *grad.stride()[:3], *grad_q.stride()[:3], *grad_o.stride()[:3],
        heads, length, head_dim, value_dim, head_dim**-0.25, chunks,
        BLOCKS_PER_PROGRAM=per_program, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DV=block_dv, FEATURE=feature_code,
        PRECISION=_dot_precision(query), SHIFTED_OUT=shifted_out, num_warps=warps,
    )  # fmt: skip
    d_zk = partials.view(batch, heads, chunks, block_d, block_dv + 1).sum((0, 2))
    return grad_q, grad_o, third, d_zk[:, :head_dim, :value_dim], d_zk[:, :head_dim, block_dv]


class _TritonPrefixCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, lse, query, z, k, feature_code: int, out_dtype: torch.dtype):
        attn_out, query = _last_dim_contiguous(attn_out, query)
        out, zk, stats = _combine_forward(attn_out, lse, query, z, k, feature_code, out_dtype)
        ctx.save_for_backward(attn_out, query, zk, stats)
        ctx.feature_code, ctx.z_dtype, ctx.k_dtype, ctx.lse_dtype = feature_code, z.dtype, k.dtype, lse.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        attn_out, query, zk, stats = ctx.saved_tensors
        grad_q, grad_o, grad_lse, grad_z, grad_k = _combine_backward(
            grad, attn_out, query, zk, stats, ctx.feature_code, shifted_out=False
        )
        return grad_o, grad_lse.to(ctx.lse_dtype), grad_q, grad_z.to(ctx.z_dtype), grad_k.to(ctx.k_dtype), None, None


class _TritonNTKAttention(torch.autograd.Function):
    """A fused attention kernel and the Triton combine as one Function, for unmasked attention.

    The combine's backward writes the shifted output ``out'`` that carries the LSE gradient into the attention
    kernel's backward (the "out" form of :mod:`peft_ntk.ops.fused_attention`), so the LSE gradient costs no extra pass and no
    tensor of its own. ``kernel`` is a :class:`peft_ntk.ops.kernels.FusedKernel` that takes q, k, v as given (equal head
    sizes, a multiple of its ``head_dim_multiple``; fewer K/V heads only where it has ``native_gqa``).
    """

    @staticmethod
    def forward(ctx, query, key, value, z, k, is_causal: bool, scale: float, kernel, feature_code: int, out_dtype):
        attn_out, lse, state = kernel.forward(query, key, value, None, is_causal, scale)
        (attn_out,) = _last_dim_contiguous(attn_out)
        out, zk, stats = _combine_forward(attn_out, lse, query, z, k, feature_code, out_dtype)
        ctx.save_for_backward(query, key, value, attn_out, zk, stats, *save_kernel_state(ctx, state))
        ctx.is_causal, ctx.scale, ctx.kernel, ctx.feature_code = is_causal, scale, kernel, feature_code
        ctx.z_dtype, ctx.k_dtype = z.dtype, k.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, attn_out, zk, stats, *tensors = ctx.saved_tensors
        state = load_kernel_state(ctx, tuple(tensors))
        grad_q, grad_o, shifted_out, grad_z, grad_k = _combine_backward(
            grad, attn_out, query, zk, stats, ctx.feature_code, shifted_out=True
        )
        dq, dk, dv = ctx.kernel.backward(grad_o, query, key, value, None, shifted_out, state, ctx.is_causal, ctx.scale)
        return dq + grad_q, dk, dv, grad_z.to(ctx.z_dtype), grad_k.to(ctx.k_dtype), *(None,) * 5


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_prefix_combine(
    attn_out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    feature_map: Any = "elu",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``ntk_prefix_combine(...)[0]`` for the elu/relu maps on the Triton kernels (see the module docstring).

    Returns (B, H, L, dv) in ``out_dtype`` (default ``attn_out``'s), stored as (B, L, H, dv). Call
    :func:`triton_combine_unavailable_reason` first.
    """
    reason = triton_combine_unavailable_reason(query, attn_out.shape[-1], feature_map)
    if reason is not None:
        raise ValueError(f"the Triton combine cannot serve this call: {reason}")
    if z.shape[1] != query.shape[-1]:
        raise ValueError(f"z has {z.shape[1]} features, but the {feature_map!r} map gives {query.shape[-1]}")
    code = triton_feature_code(feature_map)
    return _TritonPrefixCombine.apply(attn_out, lse, query, z, k, code, out_dtype or attn_out.dtype)


def triton_ntk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    *,
    kernel: Any,
    is_causal: bool,
    scale: float,
    feature_map: Any = "elu",
) -> torch.Tensor:
    """Unmasked NTK-Attention in one autograd Function: ``kernel`` (a FusedKernel) for (O, LSE), the Triton combine
    for the prefix. ``query`` (B, H, L, d) and ``key``/``value`` as ``kernel`` takes them (see
    :class:`_TritonNTKAttention`); ``is_causal`` only with Lq == Lk. Returns (B, H, L, d) stored as (B, L, H, d)."""
    reason = triton_combine_unavailable_reason(query, value.shape[-1], feature_map)
    if reason is not None:
        raise ValueError(f"the Triton combine cannot serve this call: {reason}")
    query, key, value = _last_dim_contiguous(query, key, value)
    code = triton_feature_code(feature_map)
    return _TritonNTKAttention.apply(query, key, value, z, k, is_causal, scale, kernel, code, query.dtype)
