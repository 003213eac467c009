"""Training-step time and peak memory of NTK-Attention against the base model, LoRA and prefix tuning.

What it measures
----------------
One forward + backward pass (``model(input_ids, labels=input_ids).loss.backward()``, batch 1, ``use_cache=False``,
gradients dropped after each step; no optimizer step) of a randomly initialised Llama-architecture model built from a
``LlamaConfig`` (nothing is downloaded), at several sequence lengths, for these variants:

* ``base``: the frozen base model. Every base parameter has ``requires_grad=False``; ``enable_input_require_grads()``
  makes the embedding output require grad, so the backward runs through every layer down to the embeddings (the
  activation gradients an adapter needs), but no weight gradient is computed. This is the floor every adapter pays.
* ``ntk-fused``: ``NTKAttentionConfig(attention_backend="fused")``: (O, LSE) from a fused kernel, no Lq×Lk score
  tensor: torch's fused CPU flash kernel on CPU; on CUDA torch's flash kernel (fp16/bf16 without a mask, as here) or
  its memory-efficient kernel (see ``peft_ntk/kernels.py``). The ``path`` column says which path actually ran
  (counted by wrapping the two attention ops during the first warm-up step).
* ``ntk-reference``: ``attention_backend="reference"``, the plain-torch reference op (materialises the scores).
* ``ntk-official``: the paper's formula written literally (:func:`peft_ntk.ops.naive_ntk_attention`, materialised,
  float32), swapped in for the reference op with ``unittest.mock.patch.object`` inside this benchmark only.
* ``lora-r8``: ``LoraConfig(r=8, target_modules=["q_proj", "v_proj"])``.
* ``prefix-m16`` / ``prefix-m128`` / ``prefix-m1024``: ``PrefixTuningConfig(num_virtual_tokens=m)``.

A variant that fails is recorded with its error string and the run goes on; one that runs out of memory is recorded
as ``oom``.

Step time: 2 warm-up steps (``--warmup``), then ``--steps`` timed steps with ``time.perf_counter`` (with
``torch.cuda.synchronize()`` around each step on GPU); the median is reported.

Inference (``--inference``; on by default for ``--preset gpu``, off for the CPU preset, whose results stay comparable
with earlier runs): after the training steps, in ``eval()`` mode under ``torch.no_grad()``, the median time of
``--steps`` forward passes over the whole sequence (``infer ms``, prefill without cache) and of ``--steps`` one-token
decode steps against a KV cache of the whole sequence (``decode ms``; the cache grows by one token per step), each
after ``--warmup`` untimed passes. On CUDA ``infer_peak_mib`` is the peak extra memory of the prefill passes.

Peak memory is the *extra* memory a training step needs on top of the built model (activations, gradients,
temporaries), in MiB:

* CPU: every (variant, length) runs in a fresh subprocess (this script re-invoked with a hidden ``--single`` flag), so
  nothing is shared between measurements. After building the model and its input the child resets its peak-RSS mark
  (``/proc/self/clear_refs``) and reads ``VmRSS``; after the steps it reads ``VmHWM``. Reported: ``VmHWM - VmRSS``.
  (Where the mark cannot be reset the value is ``VmHWM`` over the same baseline, so model-building peaks may show.)
* CUDA: in one process; ``torch.cuda.reset_peak_memory_stats()`` per (variant, length), reported
  ``max_memory_allocated() - memory_allocated()`` (the latter taken after building the model). The absolute peak is in
  the JSON as ``peak_total_mib``.

How to run
----------
    python benchmarks/bench_ntk_speed.py                      # CPU preset: 4 layers, hidden 256, L = 512 1024 2048
    python benchmarks/bench_ntk_speed.py --quick              # smoke test (~30 s): 2 layers, L = 128 256, 2 steps
    python benchmarks/bench_ntk_speed.py --preset gpu         # ~0.85B params, bf16, cuda, L = 512 ... 32768
    bash benchmarks/run_gpu.sh                                # the GPU tests, then the GPU preset
    python benchmarks/bench_ntk_speed.py --lengths 1024 4096 --steps 10 --variants base ntk-fused lora-r8

It prints one table per length (variant, step ms and its ratio to base, peak MiB and its ratio to base, trainable
parameters, attention path; with ``--inference`` also infer ms and decode ms and their ratios to base) and writes ``benchmarks/results/ntk_speed_<preset>.json`` (``--out``; results plus
torch/transformers/peft versions, device, threads and model config) and a PNG next to it (step time and peak memory
against length, log-log) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional
from unittest import mock

from ntk_rankgen_assets import bench

SCRIPT = Path(__file__).resolve()
RESULTS_DIR = SCRIPT.parent / "results"
RESULT_MARKER = "@@BENCH_RESULT@@ "

VARIANTS = (
    "base",
    "ntk-fused",
    "ntk-reference",
    "ntk-official",
    "lora-r8",
    "prefix-m16",
    "prefix-m128",
    "prefix-m1024",
)
QUICK_VARIANTS = ("base", "ntk-fused", "ntk-reference", "lora-r8", "prefix-m16")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "device": "cpu",
        "dtype": "float32",
        "lengths": [512, 1024, 2048],
        "model": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "intermediate_size": 512,
            "vocab_size": 1024,
        },
    },
    "gpu": {
        "device": "cuda",
        "dtype": "bfloat16",
        "lengths": [512, 2048, 4096, 8192, 16384, 32768],
        "model": {
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 5632,
            "vocab_size": 32000,
        },
    },
}


# ----------------------------------------------------------------------------------------------------------- one run


def _official_ntk_attention(
    query,
    key,
    value,
    z,
    k,
    *,
    attention_mask=None,
    is_causal=False,
    scaling=None,
    feature_map="elu",
    dropout=0.0,
    feature_dropout=0.0,
    return_weights=False,
    feature_query=None,
):
    """Drop-in for ``peft_ntk.ops.ntk_attention_reference``: the paper's literal formula in float32 (dropouts
    ignored)."""
    from peft_ntk.ops import naive_ntk_attention

    out = naive_ntk_attention(
        query.float(),
        key.float(),
        value.float(),
        z.float(),
        k.float(),
        attention_mask=attention_mask,
        is_causal=is_causal,
        scaling=scaling,
        feature_map=feature_map,
    ).to(query.dtype)
    return (out, None) if return_weights else out


def _counting_paths(calls: Counter, run):
    """Wrap ``AttentionPlan.run``: count the calls per path ("reference", or "fused" for every fused path)."""

    def wrapper(plan):
        calls["reference" if plan.path == "reference" else "fused"] += 1
        return run(plan)

    return wrapper


def _recording_kernel_names(names: Counter, select_kernel):
    def wrapper(*args, **kwargs):
        kernel = select_kernel(*args, **kwargs)
        names[kernel.name] += 1
        return kernel

    return wrapper


def _build_model(task: dict[str, Any]):
    """The base model for the task's variant, the adapter applied. Returns (model, stack of patches for the run)."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_ntk
    import peft_ntk.ops.dispatch

    variant, device = task["variant"], task["device"]
    dtype = getattr(torch, task["dtype"])
    config = LlamaConfig(**task["model"], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    patches = ExitStack()
    if variant == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif variant.startswith("ntk-"):
        backend = {"ntk-fused": "fused", "ntk-reference": "reference", "ntk-official": "reference"}[variant]
        model = get_peft_model(model, peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", attention_backend=backend))
        if variant == "ntk-official":
            patches.enter_context(
                mock.patch.object(peft_ntk.ops.dispatch, "ntk_attention_reference", _official_ntk_attention)
            )
    elif variant == "lora-r8":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    elif variant.startswith("prefix-m"):
        m = int(variant.removeprefix("prefix-m"))
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=m, task_type="CAUSAL_LM"))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    model.train()
    return model, patches


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _current_rss_kib() -> int:
    rss = _proc_status_kib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return psutil.Process().memory_info().rss // 1024
    except ImportError:
        return _peak_rss_kib()


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


def run_single(task: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, length): build, warm up, time. Never raises; failures are recorded in the result."""
    import torch

    import peft_ntk.ops.dispatch
    import peft_ntk.ops.fused_attention
    import peft_ntk.ops.kernels

    warnings.simplefilter("ignore", FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(task["threads"])
    device, length = task["device"], task["length"]
    cuda = device.startswith("cuda")
    result: dict[str, Any] = {"variant": task["variant"], "length": length, "status": "ok"}
    model = patches = None
    try:
        model, patches = _build_model(task)
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["total_params"] = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, task["model"]["vocab_size"], (1, length), generator=generator).to(device)

        def step() -> None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        gc.collect()
        if cuda:
            resting = _reset_cuda_peak()
        else:
            result["rss_peak_reset"] = _reset_peak_rss()
            resting = _current_rss_kib()
            result["rss_after_build_mib"] = resting / 1024

        calls: Counter = Counter()
        with patches:
            for i in range(task["warmup"]):
                if i == 0:  # record which attention op (and which fused kernel) served the adapted layers
                    dispatch = peft_ntk.ops.dispatch
                    kernels_used: Counter = Counter()
                    select = _recording_kernel_names(kernels_used, peft_ntk.ops.kernels.select_kernel)
                    with (
                        mock.patch.object(
                            dispatch.AttentionPlan, "run", _counting_paths(calls, dispatch.AttentionPlan.run)
                        ),
                        mock.patch.object(dispatch, "select_kernel", select),
                        mock.patch.object(peft_ntk.ops.fused_attention, "select_kernel", select),
                    ):
                        step()
                    result["fused_kernels"] = dict(kernels_used)
                else:
                    step()
            times = [1e3 * t for t in bench.timed_calls(step, repeats=task["steps"], device=device)]
            if cuda:
                result["peak_mib"] = (torch.cuda.max_memory_allocated() - resting) / 2**20
                result["peak_total_mib"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                result["peak_mib"] = (_peak_rss_kib() - resting) / 1024
            if task.get("inference"):  # after the training peak is read, with the variant's patches still applied
                try:
                    result.update(_measure_inference(model, ids, task))
                except Exception as exc:  # the training numbers stand; say why inference has none
                    kind = "oom" if _is_oom(exc) else "error"
                    result["inference_error"] = f"{kind}: {type(exc).__name__}: {str(exc).strip()[:200]}"

        if task["variant"] == "ntk-official":
            calls = Counter({"naive-fp32": calls.pop("reference", 0), **calls})
        result["attention_calls"] = dict(calls)
        result["attention_path"] = "+".join(sorted(k for k, v in calls.items() if v)) or "-"
        result["step_ms"] = statistics.median(times)
        result["step_ms_all"] = times
    except Exception as exc:  # record and go on: one failing variant must not end the benchmark
        result["status"] = "oom" if _is_oom(exc) else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    finally:
        model = patches = None  # free the model before the next measurement (GPU: same process)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


def _reset_cuda_peak() -> int:
    """Return cached blocks and start a new peak-memory mark; returns the bytes allocated now, the baseline."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _measure_inference(model, ids, task: dict[str, Any]) -> dict[str, Any]:
    """Forward-only timings (no grad, eval mode): the whole sequence without cache, then one-token decode steps."""
    import torch

    cuda = task["device"].startswith("cuda")
    model.eval()
    out: dict[str, Any] = {}
    with torch.no_grad():
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            resting = _reset_cuda_peak()

        def prefill() -> None:
            model(input_ids=ids, use_cache=False)

        out["infer_ms"], out["infer_ms_all"] = _median_ms(prefill, task)
        if cuda:
            out["infer_peak_mib"] = (torch.cuda.max_memory_allocated() - resting) / 2**20
        cache = model(input_ids=ids, use_cache=True).past_key_values
        token = ids[:, -1:]
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40);
        # a PEFT model passes either on, so ask the base model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cache_kwarg = {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}

        def decode() -> None:
            model(input_ids=token, use_cache=True, **cache_kwarg)

        out["decode_ms"], out["decode_ms_all"] = _median_ms(decode, task)
    model.train()
    return out


def _median_ms(fn, task: dict[str, Any]) -> tuple[float, list[float]]:
    times = [
        1e3 * t for t in bench.timed_calls(fn, repeats=task["steps"], warmup=task["warmup"], device=task["device"])
    ]
    return statistics.median(times), times


def _run_in_subprocess(task: dict[str, Any], timeout: Optional[float]) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPT), "--single", json.dumps(task)]
    base = {"variant": task["variant"], "length": task["length"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    if proc.returncode == -9:  # most likely the kernel's OOM killer
        return {**base, "status": "oom", "error": "child killed by SIGKILL (out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {**base, "status": "error", "error": tail[:300]}


# ------------------------------------------------------------------------------------------------------ orchestration


def _fmt_ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def format_table(length: int, rows: dict[str, dict[str, Any]]) -> str:
    base = rows.get("base", {})
    base_ok = base.get("status") == "ok"
    base_ms = base.get("step_ms") if base_ok else None
    base_mib = base.get("peak_mib") if base_ok else None
    inference = any("infer_ms" in r or "inference_error" in r for r in rows.values())
    header = f"{'variant':<14} {'step ms':>10} {'x base':>7} {'peak MiB':>10} {'x base':>7}"
    if inference:
        header += f" {'infer ms':>10} {'x base':>7} {'decode ms':>10} {'x base':>7}"
    header += f" {'trainable':>11}  path"
    lines = [f"L = {length}", header, "-" * len(header)]
    blank_inference = f" {'':>10} {'':>7} {'':>10} {'':>7}" if inference else ""
    for variant, r in rows.items():
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
        if r["status"] != "ok":
            lines.append(
                f"{variant:<14} {r['status']:>10} {'':>7} {'':>10} {'':>7}{blank_inference} {params:>11}  "
                f"{r.get('error', '')}"
            )
            continue
        line = (
            f"{variant:<14} {r['step_ms']:>10.1f} {_fmt_ratio(r['step_ms'], base_ms):>7} {r['peak_mib']:>10.1f} "
            f"{_fmt_ratio(r['peak_mib'], base_mib):>7}"
        )
        if inference and "infer_ms" in r:
            line += (
                f" {r['infer_ms']:>10.2f} {_fmt_ratio(r['infer_ms'], base.get('infer_ms')):>7}"
                f" {r['decode_ms']:>10.2f} {_fmt_ratio(r['decode_ms'], base.get('decode_ms')):>7}"
            )
        elif inference:
            line += f" {'-':>10} {'':>7} {'-':>10} {'':>7}"
        kernels = "+".join(sorted(r.get("fused_kernels", {})))
        line += f" {params:>11}  {r['attention_path']}" + (f" ({kernels})" if kernels else "")
        if "inference_error" in r:
            line += f"  (inference {r['inference_error'][:80]})"
        lines.append(line)
    return "\n".join(lines)


def summarize(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The issue's targets, read off the results: ntk-fused against base and LoRA, and its memory growth."""
    fused, base, lora = results.get("ntk-fused", {}), results.get("base", {}), results.get("lora-r8", {})

    def ratios(key: str, peer: dict[str, dict[str, Any]]) -> dict[str, float]:
        out = {}
        for length, r in fused.items():
            other = peer.get(length, {})
            if r.get("status") == "ok" and other.get("status") == "ok" and r.get(key) and other.get(key):
                out[length] = r[key] / other[key]
        return out

    summary: dict[str, Any] = {
        "fused_step_vs_base": ratios("step_ms", base),
        "fused_step_vs_lora_r8": ratios("step_ms", lora),
        "fused_infer_vs_base": ratios("infer_ms", base),
        "fused_decode_vs_base": ratios("decode_ms", base),
    }
    ok = sorted((int(L), r["peak_mib"]) for L, r in fused.items() if r.get("status") == "ok" and r.get("peak_mib"))
    # peak(L2) / peak(L1) divided by L2 / L1: about 1 for linear growth, about L2 / L1 for quadratic.
    summary["fused_memory_growth_per_length"] = {
        f"{a}->{b}": (pb / pa) / (b / a) for (a, pa), (b, pb) in zip(ok, ok[1:]) if pa > 0
    }
    labels = {
        "fused_step_vs_base": "ntk-fused train step / base",
        "fused_step_vs_lora_r8": "ntk-fused train step / lora-r8",
        "fused_infer_vs_base": "ntk-fused prefill (no grad) / base",
        "fused_decode_vs_base": "ntk-fused decode step / base",
        "fused_memory_growth_per_length": "ntk-fused peak-memory growth / length growth (1 = linear)",
    }
    summary["lines"] = [
        f"{labels[key]}: " + ", ".join(f"{L}: {v:.3f}" for L, v in values.items())
        for key, values in summary.items()
        if values and key in labels
    ]
    return summary


def plot(report: dict[str, Any], path: Path) -> Optional[Path]:
    plt = bench.pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    inference = report.get("inference", False)
    fig, axes = plt.subplots(1, 3 if inference else 2, figsize=(18 if inference else 12, 4.5))
    for variant, by_length in report["results"].items():
        ok = [(int(L), r) for L, r in by_length.items() if r["status"] == "ok"]
        if not ok:
            continue
        lengths = [L for L, _ in ok]
        axes[0].plot(lengths, [r["step_ms"] for _, r in ok], marker="o", label=variant)
        axes[1].plot(lengths, [max(r["peak_mib"], 1e-3) for _, r in ok], marker="o", label=variant)
        if inference:
            timed = [(L, r["infer_ms"]) for L, r in ok if "infer_ms" in r]
            axes[2].plot([L for L, _ in timed], [t for _, t in timed], marker="o", label=variant)
    env = report["environment"]
    ylabels = ("train step (fwd+bwd), ms", "peak extra memory, MiB", "prefill forward (no grad), ms")
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(report["lengths"], [str(L) for L in report["lengths"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        bench.label_axes(ax, "sequence length", ylabel, legend_size=None)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"NTK-Attention vs LoRA / prefix tuning, preset {report['preset']} ({env['device']}, {env['threads']} threads"
        + (f" x {env['jobs']} jobs)" if env.get("jobs", 1) > 1 else ")")
    )
    return bench.save_figure(fig, path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = bench.argument_parser(
        __doc__,
        quick="smoke test: cpu, 2 layers, L = 128 256, 2 steps, 5 variants",
        threads=None,
        threads_help="torch threads (default: every core this process may use)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: the preset's)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all")
    parser.add_argument("--steps", type=int, help="timed steps per measurement, median reported (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--inference",
        action=argparse.BooleanOptionalAction,
        help="also time forward-only passes (prefill and one-token decode); default: on for --preset gpu, off for cpu",
    )
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument(
        "--jobs",
        type=int,
        help="CPU only: measurements run side by side, the threads split between them (default 1; --quick: 2). "
        "Distorts the timings; for smoke tests.",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="CPU only: seconds per measurement")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/ntk_speed_<preset>.json)")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.single is not None:
        print(RESULT_MARKER + json.dumps(run_single(json.loads(args.single))), flush=True)
        return {}

    import torch

    preset_name = "cpu" if args.quick else args.preset
    preset = PRESETS[preset_name]
    model_config = dict(preset["model"])
    lengths = args.lengths or ([128, 256] if args.quick else preset["lengths"])
    variants = list(args.variants or (QUICK_VARIANTS if args.quick else VARIANTS))
    if "base" not in variants:
        variants.insert(0, "base")  # the ratios need it
    steps = args.steps or (2 if args.quick else 5)
    layers = args.layers or (2 if args.quick else None)
    if layers:
        model_config["num_hidden_layers"] = layers
    # room for the longest sequence plus the longest virtual prefix
    model_config["max_position_embeddings"] = max(2048, max(lengths) + 1024)
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; use --preset cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    jobs = max(1, args.jobs or (min(2, threads) if args.quick else 1)) if device == "cpu" else 1
    out = args.out or RESULTS_DIR / f"ntk_speed_{preset_name}.json"

    inference = args.inference if args.inference is not None else device != "cpu"
    task_base = {
        "device": device,
        "dtype": preset["dtype"],
        "model": model_config,
        "steps": steps,
        "warmup": args.warmup,
        "threads": max(1, threads // jobs),
        "inference": inference,
    }
    tasks = [{**task_base, "variant": v, "length": L} for L in lengths for v in variants]
    print(
        f"preset {preset_name} ({device}, {preset['dtype']}), {model_config['num_hidden_layers']} layers, "
        f"lengths {lengths}, {len(variants)} variants, {args.warmup} warm-up + {steps} timed steps, "
        f"{task_base['threads']} threads" + (f" x {jobs} jobs" if jobs > 1 else ""),
        flush=True,
    )

    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {v: {} for v in variants}
    tables = []
    if device == "cpu":
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_in_subprocess, task, args.timeout) for task in tasks]
            done = iter(futures)
            for L in lengths:
                for v in variants:
                    results[v][str(L)] = next(done).result()
                tables.append(format_table(L, {v: results[v][str(L)] for v in variants}))
                print("\n" + tables[-1], flush=True)
    else:
        for L in lengths:
            for task in (t for t in tasks if t["length"] == L):
                results[task["variant"]][str(L)] = run_single(task)
            tables.append(format_table(L, {v: results[v][str(L)] for v in variants}))
            print("\n" + tables[-1], flush=True)
    elapsed = time.perf_counter() - started
    ratios = {}
    for L, r in results.get("ntk-fused", {}).items():
        if r["status"] == "ok" and results["base"][L]["status"] == "ok":
            ratios[L] = r["step_ms"] / results["base"][L]["step_ms"]
    summary = summarize(results)
    if summary["lines"]:
        print("\n" + "\n".join(summary["lines"]))

    report = {
        "description": "forward+backward training step (batch 1, no optimizer step) of a random Llama model",
        "memory_measure": (
            "peak RSS increase over the RSS after building the model, in a fresh process per measurement (MiB)"
            if device == "cpu"
            else "torch.cuda.max_memory_allocated() minus memory_allocated() after building the model (MiB)"
        ),
        "preset": preset_name,
        "quick": args.quick,
        "environment": bench.environment(device, task_base["threads"], jobs=jobs),
        "config": {**model_config, "dtype": preset["dtype"], "batch_size": 1},
        "lengths": lengths,
        "variants": variants,
        "steps": steps,
        "warmup": args.warmup,
        "elapsed_s": elapsed,
        "ntk_fused_step_ratio_to_base": ratios,
        "inference": inference,
        "summary": {k: v for k, v in summary.items() if k != "lines"},
        "results": results,
    }
    print(f"\n{elapsed:.0f} s")
    bench.save_report(report, out, lambda png: plot(report, png))
    return report


if __name__ == "__main__":
    main()
