"""The fused CUDA path (torch's flash and memory-efficient kernels) against float64 references. Needs a CUDA GPU.

Run on a GPU with ``bash benchmarks/run_gpu.sh`` (or ``pytest -m gpu tests/test_kernels_cuda.py``). Every test here is
marked ``gpu`` and skips cleanly without CUDA. Once they pass on a GPU, ``peft_ntk.ops.dispatch.CUDA_FUSED_PATH_VALIDATED``
may be set to True so that ``attention_backend="auto"`` uses the fused path on CUDA too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, case_inputs, make_inputs, tiny_llama_ntk
from transformers.utils import logging as hf_logging

import peft_ntk
import peft_ntk.ops.dispatch
from peft_ntk.ops import (
    dispatch,
    fused_attention,
    fused_attention_with_lse,
    fused_ntk_attention,
    kernels,
    ntk_attention_reference,
    softmax_attention_with_lse,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"
# Relative to the largest reference value. fp32 runs on the memory-efficient kernel (it may use TF32 tensor cores).
TOLERANCES = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _deterministic_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 references must not inherit a global TF32 setting
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture
def kernels_used(monkeypatch):
    """Names of the kernels select_kernel picked during the test."""
    names: list[str] = []
    real = kernels.select_kernel

    def spy(*args, **kwargs):
        kernel = real(*args, **kwargs)
        names.append(kernel.name)
        return kernel

    for module in (fused_attention, dispatch):  # the two callers
        monkeypatch.setattr(module, "select_kernel", spy)
    return names


def _weights_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def _loss(out, lse, *, on_out=True, on_lse=True):
    total = out.new_zeros((), dtype=torch.float64)
    if on_out:
        total = total + (out.double() * _weights_like(out, 1).double()).sum()
    if on_lse:
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        total = total + (finite.double() * _weights_like(lse, 2).double()).sum()
    return total


def _assert_close_scaled(actual, expected, tol, msg):
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual.double() / scale, expected.double() / scale, rtol=tol, atol=tol, msg=msg)


def _compare_with_reference(q, k, v, kw, tol, *, on_out=True, on_lse=True, **fused_kw):
    out, lse = fused_attention_with_lse(q, k, v, **kw, **fused_kw)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_kw = {**kw}
    ref_out, ref_lse, _ = softmax_attention_with_lse(*ref_inputs, **ref_kw)
    assert out.dtype == q.dtype and out.device.type == CUDA and lse.shape == ref_lse.shape
    _assert_close_scaled(out, ref_out, tol, "out")
    torch.testing.assert_close(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    _assert_close_scaled(lse[finite], ref_lse[finite], tol, "lse")
    grads = torch.autograd.grad(_loss(out, lse, on_out=on_out, on_lse=on_lse), (q, k, v), allow_unused=True)
    ref_grads = torch.autograd.grad(
        _loss(ref_out, ref_lse, on_out=on_out, on_lse=on_lse), ref_inputs, allow_unused=True
    )
    for name, a, b in zip("qkv", grads, ref_grads):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None and a.dtype == q.dtype, name
        assert torch.isfinite(a).all(), f"grad {name} not finite"
        _assert_close_scaled(a, b, tol, f"grad {name}")


def _cuda_case(case, dtype, head_dim=64, seed=0):
    (q, k, v, _, _), kw = case_inputs(case)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t.shape[:-1] + (head_dim,), generator=g, dtype=torch.float64) for t in (q, k, v))
    inputs = [t.to(CUDA, dtype).requires_grad_(True) for t in (q, k, v)]
    mask = kw["attention_mask"]
    return inputs, {**kw, "attention_mask": mask.to(CUDA) if mask is not None else None}


@pytest.mark.parametrize("lse_gradient", ["auto", "channel"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_cuda_forward_and_gradients_match_float64(case, dtype, lse_gradient, kernels_used):
    (q, k, v), kw = _cuda_case(case, dtype)
    _compare_with_reference(q, k, v, kw, TOLERANCES[dtype], lse_gradient=lse_gradient)
    unmasked = kw["attention_mask"] is None and (not kw["is_causal"] or q.shape[2] in (1, k.shape[2]))
    if not unmasked:
        assert kernels_used == ["cuda-efficient"]  # the only one of the three that takes a mask
    else:
        assert kernels_used == [_torch_sdpa_choice(q, k, v)]


def _torch_sdpa_choice(q, k, v) -> str:
    """The kernel torch's own SDPA picks for these (unmasked) inputs, named as our adapters are."""
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, False, enable_gqa=q.shape[1] != k.shape[1])
    # 0: torch would use its math path (e.g. fp32 with grouped-query heads); ours then takes memory-efficient
    return {0: "cuda-efficient", 1: "cuda-flash", 2: "cuda-efficient", 3: "cuda-cudnn"}[choice]


def _usable(kernel, q, k, v) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_flash_attention

    check = can_use_flash_attention if kernel is kernels.CUDA_FLASH else can_use_cudnn_attention
    return check(SDPAParams(q, k, v, None, 0.0, False, q.shape[1] != k.shape[1]))


@pytest.mark.parametrize("lse_gradient", ["auto", "channel", "unchecked_out"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["no-mask", "causal-square", "decode", "mqa"])
@pytest.mark.parametrize("kernel_name", ["CUDA_FLASH", "CUDA_CUDNN"])
def test_each_unmasked_kernel_matches_float64_with_native_grouped_query_heads(kernel_name, case, dtype, lse_gradient):
    """Flash and cuDNN forced (each takes K/V with fewer heads as they are), in all three LSE-gradient forms."""
    (q, k, v), kw = _cuda_case(case, dtype)
    kernel = getattr(kernels, kernel_name)
    if not _usable(kernel, q.detach(), k.detach(), v.detach()):
        pytest.skip(f"{kernel_name} cannot serve {case} {dtype} on this GPU / torch")
    _compare_with_reference(q, k, v, kw, TOLERANCES[dtype], kernel=kernel, lse_gradient=lse_gradient)


def test_the_kernel_follows_torchs_sdpa_settings(kernels_used):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    (q, k, v), kw = _cuda_case("causal-square", torch.bfloat16)
    for backend, name in [
        (SDPBackend.FLASH_ATTENTION, "cuda-flash"),
        (SDPBackend.EFFICIENT_ATTENTION, "cuda-efficient"),
    ]:
        kernels_used.clear()
        with sdpa_kernel(backend):
            fused_attention_with_lse(q, k, v, **kw)
        assert kernels_used == [name]
    kernels_used.clear()
    fused_attention_with_lse(q, k, v, **kw)
    assert kernels_used == [_torch_sdpa_choice(q, k, v)]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", ["causal-square", "padding+causal", "causal-cache"])
def test_lse_only_loss(case, dtype):
    """A loss on the LSE alone: no output gradient anywhere, so the backward must take the extra-channel form."""
    (q, k, v), kw = _cuda_case(case, dtype)
    _compare_with_reference(q, k, v, kw, TOLERANCES[dtype], on_out=False)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("head_dim", [16, 40, 80, 96, 128, 256])
def test_head_dims(head_dim, dtype, kernels_used):
    """Head sizes that need padding to 8, the 128 of large models, and 256 (too wide for flash plus the LSE channel)."""
    (q, k, v), kw = _cuda_case("causal-square", dtype, head_dim=head_dim)
    _compare_with_reference(q, k, v, kw, TOLERANCES[dtype])
    if head_dim == 256:
        assert kernels_used == ["cuda-efficient"]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_fully_masked_rows_and_additive_bias(dtype):
    (q, k, v), _ = _cuda_case("no-mask", dtype)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool, device=CUDA)
    mask[0, :, 2] = False
    mask[1, :, :, 3:] = False
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64, device=CUDA).masked_fill(~mask, float("-inf")).to(dtype)
    for attention_mask in (mask, bias):
        for is_causal in (False, True):
            kw = dict(attention_mask=attention_mask, is_causal=is_causal)
            _compare_with_reference(q, k, v, kw, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_lse_gradient_forms_agree(dtype):
    (q, k, v), kw = _cuda_case("padding+causal", dtype, head_dim=128)
    grads = {}
    for mode in ("out", "channel"):
        out, lse = fused_attention_with_lse(q, k, v, **kw, lse_gradient=mode)
        grads[mode] = torch.autograd.grad(_loss(out, lse), (q, k, v))
    for a, b in zip(grads["out"], grads["channel"]):
        _assert_close_scaled(a, b.double(), TOLERANCES[dtype], "out vs channel")


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", ["causal-square", "causal-cache", "decode", "padding", "mqa"])
def test_fused_ntk_attention_matches_reference(case, dtype):
    (q, k, v, z, kvec), kw = case_inputs(case)
    inputs = [t.to(CUDA, dtype) for t in (q, k, v)] + [t.to(CUDA) for t in (z, kvec)]
    inputs = [t.requires_grad_(True) for t in inputs]
    kw = {**kw, "attention_mask": kw["attention_mask"].to(CUDA) if kw["attention_mask"] is not None else None}
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fused_ntk_attention(*inputs, **kw)
    ref = ntk_attention_reference(*ref_inputs, **kw)
    _assert_close_scaled(out, ref, TOLERANCES[dtype], "out")
    weights = _weights_like(ref, 3)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_inputs)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        _assert_close_scaled(a, b, TOLERANCES[dtype], name)


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resting


def _fused_training_step_peak(length: int, dtype: torch.dtype, heads: int = 8, head_dim: int = 64) -> int:
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, length, head_dim, generator=g, device=CUDA, dtype=dtype).requires_grad_(True)
        for _ in range(3)
    )
    z = torch.randn(heads, head_dim, head_dim, device=CUDA, requires_grad=True)
    kvec = torch.rand(heads, head_dim, device=CUDA, requires_grad=True)
    return _peak_bytes(lambda: fused_ntk_attention(q, k, v, z, kvec, is_causal=True).sum().backward())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_grows_linearly_with_length(dtype):
    """fwd + bwd of fused NTK-Attention at 8k and 16k: linear memory (a score matrix would quadruple it)."""
    heads, element = 8, torch.finfo(dtype).bits // 8
    peaks = {length: _fused_training_step_peak(length, dtype, heads) for length in (8192, 16384)}
    for length, peak in peaks.items():
        scores_bytes = heads * length * length * element
        assert peak < scores_bytes / 4, f"peak {peak / 2**20:.0f} MiB at L = {length}"
    ratio = peaks[16384] / peaks[8192]
    assert 1.5 < ratio < 2.5, f"peak memory ratio 16k/8k = {ratio:.2f} (linear: 2, quadratic: 4)"


# -------------------------------------------------------------------------------------------------------- end to end


def _tiny_llama(backend: str, dtype: torch.dtype):
    return tiny_llama_ntk(attention_backend=backend).to(CUDA, dtype)


@pytest.fixture
def attention_calls(monkeypatch):
    calls = {"fused": 0, "reference": 0}
    real_run = peft_ntk.ops.dispatch.AttentionPlan.run

    def run(plan):
        calls["reference" if plan.path == "reference" else "fused"] += 1
        return real_run(plan)

    monkeypatch.setattr(peft_ntk.ops.dispatch.AttentionPlan, "run", run)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_training_step_and_generate_with_cache(dtype, attention_calls):
    """A padded batch through a Llama with NTK adapters: logits, loss gradients and greedy generation with a KV cache
    agree between attention_backend="fused" and "reference" on the GPU (padded: memory-efficient kernel with a mask;
    unpadded bf16: flash kernel, also for the one-token decode steps)."""
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as for generation
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    results = {}
    for backend in ("reference", "fused"):
        model = _tiny_llama(backend, dtype).train()
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0
            )
            unpadded = model.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        results[backend] = (out.logits.detach().double(), grads, generated, unpadded)
    assert attention_calls["fused"] > 0 and attention_calls["reference"] > 0
    tol = TOLERANCES[dtype]
    _assert_close_scaled(results["fused"][0], results["reference"][0], tol, "logits")
    grad_tol = 1e-2 if dtype == torch.float32 else 1e-1  # through two layers and a loss on every token
    for name, grad in results["reference"][1].items():
        _assert_close_scaled(results["fused"][1][name], grad, grad_tol, name)
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie in the argmax
        assert torch.equal(results["fused"][2], results["reference"][2])
        assert torch.equal(results["fused"][3], results["reference"][3])


def test_auto_backend_uses_the_reference_on_cuda_until_validated(attention_calls, monkeypatch):
    messages = []
    monkeypatch.setattr(dispatch.logger, "info_once", lambda msg: messages.append(msg))
    model = _tiny_llama("auto", torch.float32).eval()
    ids = torch.arange(1, 7, device=CUDA).view(1, 6)
    with torch.no_grad():
        model(input_ids=ids)
    if dispatch.CUDA_FUSED_PATH_VALIDATED:
        assert attention_calls == {"fused": 2, "reference": 0}
    else:
        assert attention_calls == {"fused": 0, "reference": 2} and "attention_backend='fused'" in messages[0]
    assert hf_logging  # kernels logs through transformers' logging


def test_float64_on_cuda_is_refused_when_forced():
    q, k, v, z, kvec = (t.to(CUDA) for t in make_inputs())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        fused_attention_with_lse(q, k, v)
    assert "float16" in dispatch.fused_path_unavailable_reason(q, 0.0, False)


# ------------------------------------------------------------------------------------------- the Triton prefix combine


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize(
    "shape",
    [(1, 32, 3000, 64, 64), (2, 4, 37, 128, 128), (1, 2, 5, 40, 24)],
    ids=["llama-3000-rows", "d128", "d40-dv24"],
)
def test_triton_combine_matches_float64(shape, dtype):
    """Half/single-precision attention output and queries with fp32 Z, k; 3000 rows x 32 heads make the backward's
    programs loop over several row blocks (partial sums of dZ, dk). The backward is deterministic."""
    from peft_ntk.ops import ntk_prefix_combine
    from peft_ntk.ops.triton_combine import triton_prefix_combine

    batch, heads, length, head_dim, value_dim = shape
    g = torch.Generator().manual_seed(0)
    attn_out = torch.randn(batch, heads, length, value_dim, generator=g, dtype=torch.float64)
    lse = torch.randn(batch, heads, length, generator=g, dtype=torch.float64) * 3
    lse[0, 0, 0] = float("-inf")
    query = torch.randn(batch, length, heads, head_dim, generator=g, dtype=torch.float64).transpose(1, 2)
    z = torch.randn(heads, head_dim, value_dim, generator=g, dtype=torch.float64) * 0.1
    k = torch.rand(heads, head_dim, generator=g, dtype=torch.float64)
    inputs = [attn_out.to(CUDA, dtype), lse.to(CUDA, torch.float32), query.to(CUDA, dtype)]
    inputs = [t.requires_grad_(True) for t in inputs + [z.to(CUDA, torch.float32), k.to(CUDA, torch.float32)]]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    out = triton_prefix_combine(*inputs)
    ref = ntk_prefix_combine(*exact)[0]
    assert out.dtype == dtype
    _assert_close_scaled(out, ref, TOLERANCES[dtype], "out")
    weights = _weights_like(ref, 3)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    again = torch.autograd.grad((triton_prefix_combine(*inputs).double() * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    for name, a, b, c in zip("attn_out lse query z k".split(), grads, ref_grads, again):
        assert a.dtype == inputs["attn_out lse query z k".split().index(name)].dtype, name
        _assert_close_scaled(a, torch.where(torch.isfinite(b), b, torch.zeros_like(b)), TOLERANCES[dtype], name)
        assert torch.equal(a, c), f"grad {name} differs between two identical backwards"


def test_fused_ntk_attention_uses_the_triton_kernels_for_built_in_maps(monkeypatch):
    """Unmasked: kernel and combine in one Function. With a mask: the combine alone after the masked kernel."""
    from peft_ntk import triton_combine

    calls = []
    for cls in (triton_combine._TritonNTKAttention, triton_combine._TritonPrefixCombine):

        def spy(*args, real=cls.apply, name=cls.__name__):
            calls.append(name)
            return real(*args)

        monkeypatch.setattr(cls, "apply", spy)
    (q, k, v, z, kvec), kw = case_inputs("causal-square")
    inputs = [t.to(CUDA, torch.bfloat16) for t in (q, k, v)] + [t.to(CUDA, torch.float32) for t in (z, kvec)]
    fused_ntk_attention(*inputs, **kw)
    fused_ntk_attention(*inputs, **kw, feature_map="relu")
    assert calls == ["_TritonNTKAttention", "_TritonNTKAttention"]
    (q, k, v, z, kvec), kw = case_inputs("padding")
    inputs = [t.to(CUDA, torch.bfloat16) for t in (q, k, v)] + [t.to(CUDA, torch.float32) for t in (z, kvec)]
    fused_ntk_attention(*inputs, **{**kw, "attention_mask": kw["attention_mask"].to(CUDA)})
    assert calls[2:] == ["_TritonPrefixCombine"]
