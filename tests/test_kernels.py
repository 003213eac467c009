"""The fused path against the reference op: forward, gradients (through the LSE too), edge cases, memory, dispatch."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, case_inputs, make_inputs, padding_mask, tiny_llama_ntk
from torch.profiler import ProfilerActivity, profile

import peft_ntk
from peft_ntk.ops import (
    fused_attention_with_lse,
    fused_ntk_attention,
    masked_scores,
    ntk_attention_reference,
    softmax_attention_with_lse,
)

TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_forward_and_gradients(case, dtype):
    inputs, kw = case_inputs(case)
    inputs = [t.to(dtype).requires_grad_(True) for t in inputs[:3]] + [t.requires_grad_(True) for t in inputs[3:]]
    ref = ntk_attention_reference(*inputs, **kw)
    out = fused_ntk_attention(*inputs, **kw)
    assert out.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), inputs)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        scale = b.abs().max().double().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=tol, atol=tol, msg=name)


def test_lse_gradient_is_exact():
    """A loss on the LSE alone: the fused kernel's own LSE has no gradient; ours must equal logsumexp's."""
    q, k, v, _, _ = make_inputs(lq=6, lk=6, requires_grad=True)
    mask = padding_mask(2, 6, 6, [6, 3])
    _, lse = fused_attention_with_lse(q, k, v, attention_mask=mask, is_causal=True)
    weights = torch.randn(lse.shape, dtype=lse.dtype)
    grads = torch.autograd.grad((lse * weights).sum(), (q, k, v), allow_unused=True)
    ref_lse = torch.logsumexp(masked_scores(q, k, attention_mask=mask, is_causal=True), dim=-1)
    ref = torch.autograd.grad((ref_lse * weights).sum(), (q, k))
    torch.testing.assert_close(grads[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], ref[1], rtol=1e-12, atol=1e-12)
    assert grads[2] is None or torch.equal(grads[2], torch.zeros_like(v))


def test_gradcheck_fused():
    inputs = make_inputs(b=1, h=2, hkv=1, lq=3, lk=4, d=4, requires_grad=True)
    mask = padding_mask(1, 3, 4, [3])

    def fn(*args):
        return fused_ntk_attention(*args, attention_mask=mask, is_causal=True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_fully_masked_rows_and_additive_bias_match_reference():
    inputs = make_inputs(requires_grad=True)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64).masked_fill(~mask, float("-inf"))  # T5-style position bias
    for attention_mask in (mask, bias):
        ref = ntk_attention_reference(*inputs, attention_mask=attention_mask)
        out = fused_ntk_attention(*inputs, attention_mask=attention_mask)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), inputs)
        ref_grads = torch.autograd.grad(ref.sum(), inputs)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_large_logits(scale):
    q, k, v, z, kvec = make_inputs(seed=3, dtype=torch.float32)
    if scale < 0:
        q, k = q.abs(), -k.abs()
    inputs = [t.requires_grad_(True) for t in (q, k, v, z, kvec)]
    scaling = abs(scale) * 8**-0.5
    out = fused_ntk_attention(*inputs, is_causal=True, scaling=scaling)
    ref = ntk_attention_reference(*inputs, is_causal=True, scaling=scaling)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), inputs))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_fused_path_does_not_materialise_scores():
    """At L = 2048 a (B,H,L,L) float32 score tensor is 32 MiB; the fused path's largest allocation must stay far below."""
    b, h, length, d = 1, 2, 2048, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=g, requires_grad=True) for _ in range(3))
    z, kvec = torch.randn(h, d, d, requires_grad=True), torch.rand(h, d, requires_grad=True)
    scores_bytes = b * h * length * length * 4

    def step(op):
        return lambda: op(q, k, v, z, kvec, is_causal=True).sum().backward()

    # One thread: the CPU kernel's per-thread work buffers grow with the thread count (16 threads: 16 MiB on torch 2.11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = _largest_allocation(step(fused_ntk_attention))
        reference = _largest_allocation(step(ntk_attention_reference))
    finally:
        torch.set_num_threads(threads)
    assert reference >= scores_bytes  # the measurement sees a materialised score tensor when there is one
    assert fused < scores_bytes / 8, f"largest allocation {fused} B on the fused path"


def test_backends_agree_on_a_model_with_padding():
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    outputs = {}
    for backend in ("reference", "fused"):
        model = tiny_llama_ntk(attention_backend=backend)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outputs[backend] = (out.logits.detach(), grads)
    torch.testing.assert_close(outputs["fused"][0], outputs["reference"][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs["reference"][1].items():
        torch.testing.assert_close(outputs["fused"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forced_fused_backend_refuses_what_it_cannot_do():
    model = tiny_llama_ntk(attention_backend="fused", attention_dropout=0.5).train()
    with pytest.raises(ValueError, match="attention_backend='fused' cannot serve.*dropout"):
        model(input_ids=torch.arange(6).view(1, 6))


def test_auto_backend_falls_back_for_attention_weights(monkeypatch):
    paths = []
    real = peft_ntk.ops.dispatch.AttentionPlan.run
    monkeypatch.setattr(peft_ntk.ops.dispatch.AttentionPlan, "run", lambda plan: paths.append(plan.path) or real(plan))
    model = tiny_llama_ntk().eval()
    ids = torch.arange(6).view(1, 6)
    model(input_ids=ids)
    assert paths == ["fused+torch-combine"] * 2  # both layers on a fused path
    out = model(input_ids=ids, output_attentions=True)
    assert paths[2:] == ["reference"] * 2 and out.attentions[0] is not None  # weights requested: reference path
    softmax_rows = softmax_attention_with_lse(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert softmax_rows[0].shape == (1, 1, 1, 2)


def test_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="attention_backend"):
        peft_ntk.NTKAttentionConfig(attention_backend="triton")


# ------------------------------------------------------------------------------------- the shared autograd Function
# The CUDA adapters are thin; everything else (head-dim padding, the LSE gradient, GQA, causal alignment, rows without
# keys, bias layout) is shared. These tests run it on CPU with the CPU kernel, directly and wrapped in emulations of the
# CUDA kernels' contracts (padded head dims, padded LSE, aligned bias, no mask for flash, out-layout in the backward).


def _lse_loss_terms(out, lse, seed=7):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows without keys: LSE = -inf
    return (out * w_out).sum() + (finite_lse * w_lse).sum()


def _check_attention_with_lse(q, k, v, kw, *, tol, **fused_kw):
    """Fused (out, lse) and the gradients of a loss on both against softmax_attention_with_lse in float64."""
    out, lse = fused_attention_with_lse(q, k, v, **kw, **fused_kw)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse, _ = softmax_attention_with_lse(*ref_inputs, **kw)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    grads = torch.autograd.grad(_lse_loss_terms(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(_lse_loss_terms(ref_out, ref_lse), ref_inputs)
    for name, a, b in zip("qkv", grads, ref_grads):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=tol, atol=tol, msg=f"grad {name}")


ATTENTION_TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _attention_case(case, dtype, d=8, dv=None, seed=0):
    (q, k, v, _, _), kw = case_inputs(case)
    if d != 8 or dv is not None:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(q.shape[:-1] + (d,), generator=g, dtype=torch.float64)
        k = torch.randn(k.shape[:-1] + (d,), generator=g, dtype=torch.float64)
        v = torch.randn(v.shape[:-1] + (dv or d,), generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)], kw


@pytest.mark.parametrize("lse_gradient", ["out", "channel"])
@pytest.mark.parametrize("dtype", list(ATTENTION_TOLERANCES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_both_lse_gradient_forms_are_exact(case, dtype, lse_gradient):
    (q, k, v), kw = _attention_case(case, dtype)
    _check_attention_with_lse(q, k, v, kw, tol=ATTENTION_TOLERANCES[dtype], lse_gradient=lse_gradient)


def test_auto_lse_gradient_falls_back_to_the_channel_for_rows_without_output_gradient(monkeypatch):
    """Rows whose output is unused but whose LSE is: "out" cannot shift D there; "auto" must use the extra channel."""
    widths = []
    real_backward = peft_ntk.ops.kernels.CPU_FLASH.backward

    def spy(grad_out, q, *args):
        widths.append(q.shape[-1])
        return real_backward(grad_out, q, *args)

    kernel = peft_ntk.ops.kernels.FusedKernel("cpu-spy", peft_ntk.ops.kernels.CPU_FLASH.forward, spy)
    q, k, v, _, _ = make_inputs(requires_grad=True)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fused_attention_with_lse(q, k, v, is_causal=True, kernel=kernel)
    ref_out, ref_lse, _ = softmax_attention_with_lse(*ref_inputs, is_causal=True)

    def loss(o, s):
        return (o[:, :, :2] ** 2).sum() + (s * torch.linspace(-1, 1, s.shape[-1], dtype=s.dtype)).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(loss(ref_out, ref_lse), ref_inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert widths == [9]  # d = 8 plus the LSE channel
    with pytest.raises(RuntimeError, match="lse_gradient='out' cannot serve"):
        out, lse = fused_attention_with_lse(q, k, v, is_causal=True, lse_gradient="out")
        torch.autograd.grad(loss(out, lse), (q, k, v))
    widths.clear()
    out, lse = fused_attention_with_lse(q, k, v, is_causal=True, kernel=kernel)
    torch.autograd.grad(_lse_loss_terms(out, lse), (q, k, v))
    assert widths == [8]  # every row has an output gradient: the shifted `out`, no extra channel


def _emulated_cuda_kernel(name, *, supports_bias):
    """The CPU kernel behind the contract of torch's CUDA kernels, with checks that fail loudly where ours breaks it."""
    cpu = peft_ntk.ops.kernels.CPU_FLASH

    def forward(q, k, v, bias, is_causal, scale):
        assert q.shape[-1] % 8 == 0 and q.shape[-1] == k.shape[-1] == v.shape[-1], (
            "head dims padded to one multiple of 8"
        )
        assert q.shape[1] == k.shape[1] == v.shape[1], "GQA heads expanded before the kernel"
        assert not is_causal or q.shape[2] == k.shape[2], "causal only with Lq == Lk (the kernels align it top-left)"
        if bias is not None:
            assert supports_bias, "the flash kernel takes no mask"
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and bias.dtype == q.dtype
            assert bias.stride(-1) == 1 and all(s % 16 == 0 for s in bias.stride()[:-1]), "bias rows 16-aligned"
            allowed = bias > float("-inf")
            if is_causal:
                allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
            # What a kernel does with a row without keys is its own business (NaN, +inf LSE, ...): never send one.
            assert allowed.any(-1).all(), "a row without keys reached the kernel"
        out, lse, _ = cpu.forward(q, k, v, bias, is_causal, scale)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # CUDA kernels write out as (B, Lq, H, P)
        padded = _round_up(q.shape[2], 32)  # the memory-efficient kernel pads the LSE to 32 queries
        raw = torch.full(lse.shape[:-1] + (padded,), float("nan"), dtype=lse.dtype)
        raw[..., : q.shape[2]] = lse
        return out, raw[..., : q.shape[2]], (raw, out.stride())

    def backward(grad_out, q, k, v, bias, out, state, is_causal, scale):
        raw, out_strides = state
        order = sorted(range(4), key=lambda i: -out_strides[i])  # the forward's out: dense in this order of dims
        for t in (out, grad_out):  # the memory-efficient kernel derives out's strides from its shape
            assert t.permute(order).is_contiguous(), "out and dO stored like the forward's out"
        assert q.shape[-1] % 8 == 0 and q.shape[-1] == k.shape[-1] == v.shape[-1] == out.shape[-1]
        lse = raw[..., : q.shape[2]]
        return cpu.backward(grad_out, q, k, v, bias, out, (lse,), is_causal, scale)

    return peft_ntk.ops.kernels.FusedKernel(
        name,
        forward,
        backward,
        head_dim_multiple=8,
        supports_bias=supports_bias,
        prepare_bias=peft_ntk.ops.kernels._aligned_bias if supports_bias else None,
    )


def _round_up(n, m):
    return (n + m - 1) // m * m


@pytest.mark.parametrize("lse_gradient", ["auto", "channel"])
@pytest.mark.parametrize("dims", [(8, None), (6, None), (5, 3)], ids=["d8", "d6", "d5-dv3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_cuda_efficient_contract(case, dims, lse_gradient):
    (q, k, v), kw = _attention_case(case, torch.float64, d=dims[0], dv=dims[1])
    kernel = _emulated_cuda_kernel("emulated-efficient", supports_bias=True)
    _check_attention_with_lse(q, k, v, kw, tol=1e-12, kernel=kernel, lse_gradient=lse_gradient)


@pytest.mark.parametrize("lse_gradient", ["auto", "channel"])
@pytest.mark.parametrize("case", ["no-mask", "causal-square", "decode", "mqa"])
def test_emulated_cuda_flash_contract(case, lse_gradient):
    (q, k, v), kw = _attention_case(case, torch.float64, d=12)
    kernel = _emulated_cuda_kernel("emulated-flash", supports_bias=False)
    _check_attention_with_lse(q, k, v, kw, tol=1e-12, kernel=kernel, lse_gradient=lse_gradient)
    with pytest.raises(ValueError, match="takes no attention mask"):
        fused_attention_with_lse(
            q, k, v, attention_mask=torch.ones(q.shape[2], k.shape[2], dtype=torch.bool), kernel=kernel
        )


def test_emulated_efficient_fully_masked_rows_and_bias():
    (q, k, v), _ = _attention_case("no-mask", torch.float64, d=6)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False
    mask[1, :, :, 4:] = False
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    kernel = _emulated_cuda_kernel("emulated-efficient", supports_bias=True)
    for attention_mask in (mask, bias, mask[:, :, :1].expand(2, 1, 5, 7)):
        _check_attention_with_lse(q, k, v, dict(attention_mask=attention_mask), tol=1e-12, kernel=kernel)
        _check_attention_with_lse(
            q, k, v, dict(attention_mask=attention_mask, is_causal=True), tol=1e-12, kernel=kernel
        )


def test_aligned_bias_keeps_broadcast_dims_and_aligns_rows():
    from peft_ntk.ops.kernels import _aligned_bias

    bias = torch.randn(1, 1, 5, 7)
    aligned = _aligned_bias(bias, (2, 4, 5, 7))
    assert aligned.shape == (2, 4, 5, 7) and aligned.stride() == (0, 0, 16, 1)
    assert torch.equal(aligned[1, 3], bias[0, 0])
    already = torch.randn(2, 1, 5, 32)
    assert _aligned_bias(already, (2, 4, 5, 32)).data_ptr() == already.data_ptr()  # no copy when aligned


def test_fused_path_refuses_a_bias_that_needs_gradients():
    q, k, v, _, _ = make_inputs()
    bias = torch.zeros(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad.*attention_backend='reference'"):
        fused_attention_with_lse(q, k, v, attention_mask=bias)
    assert "requires grad" in peft_ntk.ops.dispatch.fused_path_unavailable_reason(q, 0.0, False, attention_mask=bias)
    with torch.no_grad():
        assert peft_ntk.ops.dispatch.fused_path_unavailable_reason(q, 0.0, False, attention_mask=bias) is None


# ------------------------------------------------------------------- CUDA adapters: schemas and shapes on meta tensors


@pytest.mark.parametrize("lse_gradient", ["out", "channel"])
@pytest.mark.parametrize(
    "kernel_name, dtype, lq, masked",
    [
        ("CUDA_FLASH", torch.bfloat16, 50, False),
        ("CUDA_FLASH", torch.float16, 1, False),
        ("CUDA_EFFICIENT", torch.float32, 37, True),
        ("CUDA_EFFICIENT", torch.bfloat16, 37, False),
    ],
)
def test_cuda_adapters_call_the_ops_with_their_schemas_on_meta(kernel_name, dtype, lq, masked, lse_gradient):
    """The adapters' calls bind to the installed ops' schemas, and the ops' meta kernels accept the shapes we pass."""
    kernel = getattr(peft_ntk.ops.kernels, kernel_name)
    q = torch.empty(2, 8, lq, 60, device="meta", dtype=dtype, requires_grad=True)
    k, v = (torch.empty(2, 2, 50, 60, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, lq, 50, dtype=torch.bool, device="meta") if masked else None
    out, lse = fused_attention_with_lse(
        q, k, v, attention_mask=mask, is_causal=lq == 50, kernel=kernel, lse_gradient=lse_gradient
    )
    assert out.shape == (2, 8, lq, 60) and out.dtype == dtype and lse.shape == (2, 8, lq) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.dtype == dtype for g in grads)


def test_cuda_op_schemas_have_the_arguments_the_adapters_pass():
    ops = torch.ops.aten
    expected = {
        ops._scaled_dot_product_flash_attention: ["query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"],
        ops._scaled_dot_product_flash_attention_backward: [
            "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
            "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale",
        ],
        ops._scaled_dot_product_efficient_attention: [
            "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale",
        ],
        ops._scaled_dot_product_efficient_attention_backward: [
            "grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
            "dropout_p", "grad_input_mask", "is_causal", "scale",
        ],
    }  # fmt: skip
    for op, names in expected.items():
        assert [a.name for a in op.default._schema.arguments] == names, op
    flash_returns = [r.name for r in ops._scaled_dot_product_flash_attention.default._schema.returns]
    assert flash_returns[:2] == ["output", "logsumexp"] and len(flash_returns) == 9
    assert len(ops._scaled_dot_product_efficient_attention.default._schema.returns) == 4


# --------------------------------------------------------------------------------------------------- path selection


class _FakeCudaQuery:
    """Enough of a CUDA tensor for the path-selection helpers, without a GPU."""

    def __init__(self, dtype):
        self.device, self.dtype, self.shape = torch.device("cuda"), dtype, (1, 4, 8, 64)


def test_auto_keeps_the_reference_on_cuda_until_validated(monkeypatch):
    from transformers.utils import logging as hf_logging

    messages = []
    monkeypatch.setattr(peft_ntk.ops.dispatch.logger, "info_once", lambda msg: messages.append(msg))
    query = _FakeCudaQuery(torch.bfloat16)
    assert peft_ntk.ops.dispatch.CUDA_FUSED_PATH_VALIDATED is True  # validated on an H200 (benchmarks/run_gpu.sh tests)
    monkeypatch.setattr(peft_ntk.ops.dispatch, "CUDA_FUSED_PATH_VALIDATED", False)  # a fork that changed the adapters
    assert peft_ntk.ops.dispatch.auto_uses_fused_path(query) is False
    assert "attention_backend='fused'" in messages[0] and "run_gpu.sh" in messages[0]
    monkeypatch.setattr(peft_ntk.ops.dispatch, "CUDA_FUSED_PATH_VALIDATED", True)
    assert peft_ntk.ops.dispatch.auto_uses_fused_path(query) is True
    assert peft_ntk.ops.dispatch.auto_uses_fused_path(torch.zeros(1)) is True  # CPU: always
    assert hf_logging  # the module logs through transformers' logging


def test_cuda_float64_has_a_named_reason():
    reason = peft_ntk.ops.dispatch.fused_path_unavailable_reason(_FakeCudaQuery(torch.float64), 0.0, False)
    assert "float16, bfloat16 or float32" in reason
    reason = peft_ntk.ops.dispatch.fused_path_unavailable_reason(torch.zeros(1, device="meta"), 0.0, False)
    assert "no fused kernel" in reason and "meta" in reason


def test_cuda_kernel_follows_torchs_choice_including_grouped_heads(monkeypatch):
    """The CUDA kernel is the one torch's SDPA picks (asked with the call's grouping and decode shape); where torch
    would use its math path, or where a kernel lacks room for the LSE channel, the memory-efficient one serves."""
    import torch.backends.cuda as cuda_backends

    calls = []

    def fake_choice(query, key, value, mask=None, *args, enable_gqa=False):
        calls.append((tuple(query.shape), tuple(key.shape), mask is not None, enable_gqa))
        return answer

    monkeypatch.setattr(torch, "_fused_sdp_choice", fake_choice)
    monkeypatch.setattr(cuda_backends, "can_use_efficient_attention", lambda params: True)
    monkeypatch.setattr(cuda_backends, "can_use_cudnn_attention", lambda params: params.query.shape[-1] <= 128)
    select = peft_ntk.ops.kernels._cuda_kernel_cached.__wrapped__  # uncached; probes go to the CPU here
    cpu, bf16, flags = torch.device("cpu"), torch.bfloat16, (True, True, True, True)
    answer = 3
    assert select(cpu, bf16, 64, False, False, False, True, flags) is peft_ntk.ops.kernels.CUDA_CUDNN
    assert calls[-1] == ((1, 2, 128, 64), (1, 1, 128, 64), False, True)
    assert select(cpu, bf16, 64, False, True, False, False, flags) is peft_ntk.ops.kernels.CUDA_CUDNN
    assert calls[-1] == ((1, 1, 1, 64), (1, 1, 128, 64), False, False)  # decode: one query
    assert select(cpu, bf16, 128, False, False, True, False, flags) is peft_ntk.ops.kernels.CUDA_EFFICIENT  # no room
    answer = 1
    assert select(cpu, bf16, 64, False, False, True, False, flags) is peft_ntk.ops.kernels.CUDA_FLASH
    assert select(cpu, bf16, 256, False, False, True, False, flags) is peft_ntk.ops.kernels.CUDA_EFFICIENT
    assert select(cpu, bf16, 64, True, False, True, False, flags) is peft_ntk.ops.kernels.CUDA_EFFICIENT  # a mask
    answer = 0  # torch's math path
    assert select(cpu, bf16, 64, False, False, True, True, flags) is peft_ntk.ops.kernels.CUDA_EFFICIENT
    assert select(cpu, torch.float64, 64, False, False, True, False, flags) is None
