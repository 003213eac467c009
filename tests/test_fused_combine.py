"""The fused path's prefix combine (one autograd Function) against the reference ntk_prefix_combine, in float64."""

from __future__ import annotations

import pytest
import torch

from peft_ntk.ops import fused_ntk_attention, ntk_attention_reference, ntk_prefix_combine
from peft_ntk.ops.feature_maps import PositiveRandomFeatures, draw_random_projection, feature_map_has_trainable_state
from peft_ntk.ops.torch_combine import fused_prefix_combine

B, H, L, D = 2, 3, 7, 8


def _inputs(seed=0, *, dtype=torch.float64, lse_scale=4.0, feature_dim=D):
    g = torch.Generator().manual_seed(seed)
    attn_out = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    # LSEs of both signs and large magnitudes (the t/q branches of the stable form), rows without keys (-inf)
    lse = torch.randn(B, H, L, generator=g, dtype=torch.float64) * lse_scale
    lse[0, 1, 2] = float("-inf")
    lse[1, 0, 0] = 60.0
    lse[1, 2, 3] = -60.0
    query = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 2
    z = torch.randn(H, feature_dim, D, generator=g, dtype=torch.float64)
    k = torch.rand(H, feature_dim, generator=g, dtype=torch.float64)
    k[2], z[2] = 0.0, 0.0  # a head without prefix (k = 0 implies Z = 0): with lse = -inf the denominator is 0
    lse[1, 2, 5] = float("-inf")
    return [t.to(dtype) for t in (attn_out, lse, query, z, k)]


def _favor():
    return PositiveRandomFeatures(draw_random_projection(16, D, seed=0, dtype=torch.float64))


FEATURE_MAPS = {"elu": "elu", "relu": "relu", "favor": _favor()}


def _reference(attn_out, lse, query, z, k, feature_map):
    return ntk_prefix_combine(attn_out, lse, query, z, k, feature_map=feature_map)[0]


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_forward_and_every_gradient_match_the_reference_in_float64(name):
    feature_map = FEATURE_MAPS[name]
    feature_dim = 16 if name == "favor" else D
    inputs = [t.requires_grad_(True) for t in _inputs(feature_dim=feature_dim)]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fused_prefix_combine(*inputs, feature_map=feature_map)
    ref = _reference(*ref_inputs, feature_map)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_inputs)
    for arg, a, b in zip(["attn_out", "lse", "query", "z", "k"], grads, ref_grads):
        b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, arg=arg: f"grad {arg}: {m}")


def test_gradcheck_in_float64():
    attn_out, lse, query, z, k = _inputs(1, lse_scale=2.0)
    # finite differences need a smooth neighbourhood: finite LSEs, and prefix mass bounded away from 0
    lse, k = lse.clamp(-8, 8), k + 0.1
    inputs = [t.requires_grad_(True) for t in (attn_out, lse, query, z, k)]
    assert torch.autograd.gradcheck(lambda *a: fused_prefix_combine(*a, feature_map="elu"), inputs)


def test_only_the_inputs_that_need_gradients_get_them():
    attn_out, lse, query, z, k = _inputs(2)
    z.requires_grad_(True)
    out = fused_prefix_combine(attn_out, lse, query, z, k)
    (grad_z,) = torch.autograd.grad(out.sum(), (z,))
    ref_z = z.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_reference(attn_out, lse, query, ref_z, k, "elu").sum(), (ref_z,))
    torch.testing.assert_close(grad_z, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_and_single_precision_inputs_are_computed_in_float32(dtype):
    """bf16/fp16 attention outputs and queries with fp32 parameters, as in a half-precision model with fp32 adapters."""
    attn_out, lse, query, z, k = _inputs(3)
    low = [attn_out.to(dtype), lse.float(), query.to(dtype), z.float(), k.float()]
    low = [t.requires_grad_(True) for t in low]
    exact = [t.detach().double().requires_grad_(True) for t in low]  # the same (rounded) values, in float64
    out = fused_prefix_combine(*low)
    ref = _reference(*exact, "elu")
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(out.float().sum(), low)
    ref_grads = torch.autograd.grad(ref.sum(), exact)
    for a, b, t in zip(grads, ref_grads, low):
        assert a.dtype == t.dtype
        b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=tol, atol=tol)


def test_saves_only_per_row_scalars_beyond_what_attention_keeps():
    """The backward recomputes phi and u: besides attn_out and the query (kept by the attention kernel anyway) and the
    parameters, only (B, H, L) tensors are saved. The autograd version keeps several (B, H, L, d) float32 tensors."""
    attn_out, lse, query, z, k = (t.float().requires_grad_(True) for t in _inputs(4))
    kept = (attn_out, query, z, k)

    def saved_extra_elements(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        ours = {id(t) for t in kept}
        return sum(t.numel() for t in saved if id(t) not in ours and t.data_ptr() not in {x.data_ptr() for x in kept})

    fused = saved_extra_elements(lambda: fused_prefix_combine(attn_out, lse, query, z, k))
    reference = saved_extra_elements(lambda: _reference(attn_out, lse, query, z, k, "elu"))
    assert fused <= 3 * B * H * L, fused
    assert reference >= 2 * B * H * L * D  # the measurement sees (B, H, L, d) tensors when they are saved


def test_a_learned_feature_map_is_detected_and_takes_the_autograd_path():
    weight = torch.eye(D, dtype=torch.float64, requires_grad=True)

    def learned(x):
        return torch.nn.functional.elu(x @ weight) + 1

    _, _, query, _, _ = _inputs(5)
    assert feature_map_has_trainable_state(learned, query)
    assert not feature_map_has_trainable_state("elu", query)
    assert not feature_map_has_trainable_state(FEATURE_MAPS["favor"], query)
    q, kv = torch.randn(1, 2, 4, D, dtype=torch.float64), torch.randn(1, 2, 4, D, dtype=torch.float64)
    z, kvec = torch.randn(2, D, D, dtype=torch.float64), torch.rand(2, D, dtype=torch.float64)
    out = fused_ntk_attention(q, kv, kv, z, kvec, is_causal=True, feature_map=learned)
    (grad,) = torch.autograd.grad(out.sum(), (weight,))
    ref_weight = weight.detach().clone().requires_grad_(True)

    def ref_map(x):
        return torch.nn.functional.elu(x @ ref_weight) + 1

    (ref,) = torch.autograd.grad(
        ntk_attention_reference(q, kv, kv, z, kvec, is_causal=True, feature_map=ref_map).sum(), (ref_weight,)
    )
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


class _ExpFeatures:
    """phi(x) = exp(x / d^(1/4)), with a stabilized form whose log-scale is differentiable (the row maximum)."""

    def __call__(self, x):
        return torch.exp(x * x.shape[-1] ** -0.25)

    def stabilized(self, x):
        scaled = x * x.shape[-1] ** -0.25
        log_scale = scaled.amax(-1)
        return torch.exp(scaled - log_scale.unsqueeze(-1)), log_scale


def test_a_stabilized_map_with_a_differentiable_log_scale():
    inputs = [t.requires_grad_(True) for t in _inputs(6)]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fused_prefix_combine(*inputs, feature_map=_ExpFeatures())
    ref = _reference(*ref_inputs, _ExpFeatures())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_grads = torch.autograd.grad(ref.sum(), ref_inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, torch.where(torch.isfinite(b), b, torch.zeros_like(b)), rtol=1e-10, atol=1e-10)


def test_a_row_without_keys_or_prefix_mass_passes_no_gradient_through_the_denominator():
    """lse = -inf and a = phi·k = 0 while u = phi·Z is not 0 (k and Z are trained independently): the reference divides
    by 1 there, so k gets no gradient from that row."""
    attn_out, lse, query, z, k = _inputs(7)
    query = query.abs()  # relu features all positive ...
    k[0] = 0.0  # ... but head 0's k is zero where they are, and its Z is not
    lse[0, 0, :] = float("-inf")
    inputs = [t.requires_grad_(True) for t in (attn_out, lse, query, z, k)]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fused_prefix_combine(*inputs, feature_map="relu")
    ref = _reference(*ref_inputs, "relu")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (grad_k,) = torch.autograd.grad(out.sum(), inputs[4])
    (ref_k,) = torch.autograd.grad(ref.sum(), ref_inputs[4])
    torch.testing.assert_close(grad_k, ref_k, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the Triton kernels, through Triton's CPU interpreter

TRITON_CASES = [("elu", 7, 8, 8), ("relu", 7, 8, 8), ("elu", 70, 40, 24), ("elu", 3, 16, 80)]


def check_triton_kernels(feature_map: str, length: int, head_dim: int, value_dim: int) -> None:
    """fp32 inputs against the float64 reference: lengths that leave a partial block, head sizes padded to a power of
    two, dv != d, LSEs of +-60 and -inf, a head without prefix mass, and the (B, L, H, d) query layout of transformers."""
    from peft_ntk.ops.triton_combine import triton_prefix_combine

    g = torch.Generator().manual_seed(length)
    attn_out = torch.randn(B, H, length, value_dim, generator=g)
    lse = torch.randn(B, H, length, generator=g) * 4
    lse[0, 0, 0], lse[1, 1, -1], lse[0, 2, 1 % length] = float("-inf"), 60.0, -60.0
    query = (torch.randn(B, length, H, head_dim, generator=g) * 2).transpose(1, 2)
    z, k = torch.randn(H, head_dim, value_dim, generator=g), torch.rand(H, head_dim, generator=g)
    k[2], z[2] = 0.0, 0.0
    lse[1, 2, 0] = float("-inf")
    inputs = [t.requires_grad_(True) for t in (attn_out, lse, query, z, k)]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    out = triton_prefix_combine(*inputs, feature_map=feature_map)
    ref = _reference(*exact, feature_map)
    assert out.dtype == torch.float32 and out.transpose(1, 2).is_contiguous()  # stored as (B, L, H, dv)
    scale = ref.abs().max()
    torch.testing.assert_close(out.double() / scale, ref / scale, rtol=1e-6, atol=1e-6)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    for arg, a, b in zip(["attn_out", "lse", "query", "z", "k"], grads, ref_grads):
        b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
        assert a.dtype == torch.float32 and a.shape == b.shape, arg
        scale = b.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(
            a.double() / scale, b / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=arg: f"{n}: {m}"
        )


def check_triton_ntk_attention(case: str) -> None:
    """The attention kernel and the Triton combine as one Function (CPU flash kernel, fp32) against the reference."""
    from peft_ntk.ops.kernels import CPU_FLASH
    from peft_ntk.ops.triton_combine import triton_ntk_attention

    g = torch.Generator().manual_seed(0)
    q_len, k_len, kv_heads, is_causal = {"causal": (9, 9, 1, True), "no-mask": (6, 11, 3, False),
                                         "decode": (1, 12, 1, False)}[case]  # fmt: skip
    query = torch.randn(B, q_len, H, D, generator=g).transpose(1, 2)
    key, value = (torch.randn(B, kv_heads, k_len, D, generator=g) for _ in range(2))
    z, k = torch.randn(H, D, D, generator=g) * 0.3, torch.rand(H, D, generator=g)
    inputs = [t.requires_grad_(True) for t in (query, key, value, z, k)]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    out = triton_ntk_attention(*inputs, kernel=CPU_FLASH, is_causal=is_causal, scale=D**-0.5)
    ref = ntk_attention_reference(*exact, is_causal=is_causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    for arg, a, b in zip(["query", "key", "value", "z", "k"], grads, ref_grads):
        scale = b.abs().max()
        torch.testing.assert_close(
            a.double() / scale, b / scale, rtol=1e-5, atol=1e-5, msg=lambda m, n=arg: f"{n}: {m}"
        )


def test_triton_kernels_match_the_reference_in_the_interpreter():
    """Triton reads TRITON_INTERPRET when it is imported, so the interpreter runs in a fresh process."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_fused_combine as t\n"
        "for case in t.TRITON_CASES:\n    t.check_triton_kernels(*case); print('ok', case)\n"
        "for case in ('causal', 'no-mask', 'decode'):\n    t.check_triton_ntk_attention(case); print('ok', case)\n"
        "from peft_ntk.ops.triton_combine import triton_combine_unavailable_reason as reason\n"
        "q = t.torch.zeros(1, 2, 3, 8)\n"
        "assert reason(q, 8, 'elu') is None and reason(q, 8, 'relu') is None\n"
        "assert 'built-in' in reason(q, 8, t.FEATURE_MAPS['favor'])\n"
        "assert 'above 128' in reason(t.torch.zeros(1, 2, 3, 256), 256, 'elu')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == len(TRITON_CASES) + 3


def test_tf32_products_only_for_half_precision_on_gpus_that_have_them():
    from peft_ntk.ops.triton_combine import _dot_precision

    assert _dot_precision(torch.zeros(1)) == "ieee"
    assert _dot_precision(torch.zeros(1, dtype=torch.bfloat16)) == "ieee"  # CPU (Triton's interpreter): no TF32
    if torch.cuda.is_available():
        has_tf32 = torch.version.cuda is not None and torch.cuda.get_device_capability()[0] >= 8
        assert _dot_precision(torch.zeros(1, dtype=torch.bfloat16, device="cuda")) == ("tf32" if has_tf32 else "ieee")
        assert _dot_precision(torch.zeros(1, device="cuda")) == "ieee"
