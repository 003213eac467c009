"""Where a decode step of RankGen's loop goes, against transformers' own sampling loop with the same rows.

For one RankGen beam search (B=2, N=10, L=20: ``beam``), the same with the per-row cache instead of shared-prompt
attention (``beam-plain-cache``, with ``--plain-cache``) and one ``generate`` call drawing B·N samples per prompt
(``sampling-BxN``), on the model of ``bench_rankgen_loop.py --preset paper`` (a 155M-parameter Llama, 12 layers,
50,257-token vocabulary, 256-token prompts; ``--quick``: its tiny default model), generating 40 new tokens (two scoring
rounds; ``--new-tokens 115`` for the paper's length), it prints and writes:

* wall time per decode step (a timed run after a short warm-up; ``torch.cuda.synchronize`` around it);
* per step, from ``torch.profiler`` over ``--profiled-steps`` ordinary decode steps (16, from the third forward on):
  CUDA kernels launched (memory copies and sets included), aten ops dispatched (every nesting level), and the top ops
  by self CPU time and by self CUDA time;
* device→host synchronisations per step: on CUDA the warnings of ``torch.cuda.set_sync_debug_mode("warn")``, and on
  every device the reads the tests count (``.item()`` / ``bool(t)`` / ``.tolist()`` / ``.cpu()`` / nonzero / boolean
  indexing ...: ``host_reads.SyncCounter``, which the tests use too), both also per window between
  two forwards (median over decode steps, max), so that the scoring rounds show apart from ordinary steps.

A "step" is one model forward: the prefill, then one per further new token (a scoring round falls inside a step).

    python benchmarks/profile_rankgen_loop.py --device cuda --plain-cache      # the paper model, about a minute
    python benchmarks/profile_rankgen_loop.py --quick --device cpu             # tiny model, ~15 s

Writes ``benchmarks/results/rankgen_profile_{device}.json`` (``--out``).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import bench_rankgen_loop as loop  # the model, tokenizer, prompts and peers of the loop benchmark
import torch
from host_reads import SyncCounter  # what the tests count as a device→host read
from torch.profiler import ProfilerActivity, profile, schedule

from ntk_rankgen_assets import bench

ROOT = Path(__file__).resolve().parent
VARIANTS = ("beam", "beam-plain-cache", "sampling-BxN")


@contextmanager
def forward_windows(model, on_forward):
    """Calls ``on_forward()`` before every model forward; yields a list holding the forward count."""
    count = [0]

    def hook(*_):
        count[0] += 1
        on_forward(count[0])

    handle = model.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def _window_stats(per_window: dict[int, int], windows: int) -> dict:
    counts = [per_window.get(w, 0) for w in range(1, windows + 1)]
    decode = counts[1:-1] or counts  # without the prefill and the final round
    return {
        "total": sum(counts),
        "per_step": sum(counts) / max(windows, 1),
        "median_per_decode_step": statistics.median(decode),
        "max_per_window": max(counts),
        "per_window": counts,
    }


def _top(prof, key: str, steps: int, n: int) -> list[dict]:
    rows = []
    averages = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    for e in sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:n]:
        if getattr(e, key) <= 0:
            break
        rows.append(
            {
                "name": e.key,
                "calls_per_step": e.count / steps,
                "self_cpu_us_per_step": e.self_cpu_time_total / steps,
                "self_cuda_us_per_step": getattr(e, "self_device_time_total", 0.0) / steps,
            }
        )
    return rows


def profile_variant(run, model, device, top: int, profiled_steps: int) -> dict:
    """A short warm-up, then a timed run, a profiled run and a counted run of ``run(tokens)`` (one generate call).

    The profiler records ``profiled_steps`` ordinary decode steps (from the third forward on, before the first scoring
    round when L allows), so that its trace stays small; the counts cover every step."""
    torch.manual_seed(0)
    run(loop.EVERY + 2)  # warm-up, a scoring round included: allocator, kernels, lazy inits
    # --- time
    with forward_windows(model, lambda f: None) as forwards:
        torch.manual_seed(1)
        bench.synchronize(device)
        start = time.perf_counter()
        run(None)
        bench.synchronize(device)
        wall = time.perf_counter() - start
    steps = forwards[0]
    # --- profile: steps 3 .. 2 + active (profiler step n = the window of forward n)
    active = max(1, min(profiled_steps, steps - 3))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.manual_seed(1)
    with profile(
        activities=activities, schedule=schedule(skip_first=2, wait=0, warmup=1, active=active, repeat=1)
    ) as prof:
        with forward_windows(model, lambda f: prof.step()):
            run(None)
            bench.synchronize(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    aten_ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"))
    # --- device→host reads, as the tests count them, and (CUDA) synchronisations as CUDA reports them
    reads, cuda_syncs = SyncCounter(), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = [0]

        def on_forward(f):
            reads.mark = f
            cuda_syncs[f - 1] = cuda_syncs.get(f - 1, 0) + len(caught) - seen[0]
            seen[0] = len(caught)

        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with forward_windows(model, on_forward) as counted, reads:
                torch.manual_seed(1)
                run(None)
                bench.synchronize(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        cuda_syncs[counted[0]] = cuda_syncs.get(counted[0], 0) + len(caught) - seen[0]
    result = {
        "steps": steps,
        "wall_seconds": wall,
        "wall_ms_per_step": 1000 * wall / steps,
        "profiled_steps": active,
        "cuda_kernels_per_step": kernels / active if device.type == "cuda" else None,
        "aten_ops_per_step": aten_ops / active,
        "host_reads": _window_stats(Counter(mark for mark, _ in reads.events), counted[0]),
        "top_self_cpu": _top(prof, "self_cpu_time_total", active, top),
        "top_self_cuda": _top(prof, "self_device_time_total", active, top) if device.type == "cuda" else [],
    }
    if device.type == "cuda":
        result["cuda_syncs"] = _window_stats(cuda_syncs, counted[0])
    return result


def parse_args(argv):
    parser = bench.argument_parser(__doc__, quick="the loop benchmark's tiny model, 24 new tokens", threads=None)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per call (at most 8)")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="default 40: two scoring rounds (the paper's length: 115); quick 24",
    )
    parser.add_argument("--profiled-steps", type=int, default=16, help="decode steps the profiler records")
    parser.add_argument("--plain-cache", action="store_true", help="also profile beam with the per-row cache")
    parser.add_argument("--top", type=int, default=15, help="rows of the top-ops tables")
    parser.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/rankgen_profile_{device}.json"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads = args.threads or torch.get_num_threads()
    if not 1 <= args.batch_size <= len(loop.PROMPT_SPECS):
        parser.error(f"--batch-size must be between 1 and {len(loop.PROMPT_SPECS)}")
    args.new_tokens = args.new_tokens or (24 if args.quick else 2 * loop.EVERY)
    args.out = args.out or ROOT / "results" / f"rankgen_profile_{args.device}.json"
    return args


def build(args):
    """The loop benchmark's model, tokenizer and prompts: ``--preset paper``, or its tiny defaults with --quick."""
    texts = loop.corpus()
    if args.quick:
        size = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": None, "vocab_size": 512, "prompt_tokens": None}
    else:
        size = loop.PRESETS["paper"]
    tok = loop.build_tokenizer(texts, size["vocab_size"])
    model = loop.build_model(tok, size["hidden"], size["layers"], size["heads"], size["intermediate"])
    model = model.to(args.device)
    return tok, model, loop.build_prompts(tok, texts, size["prompt_tokens"])[: args.batch_size]


def main(argv=None) -> dict:
    return bench.run_script(parse_args, run, argv)


def run(args) -> dict:
    import rankgen_logits.generation as generation

    device = torch.device(args.device)
    tok, model, prompts = build(args)
    gen_kwargs = loop.generation_kwargs(tok)

    def call(peer):
        def run_once(tokens=None):
            return loop.RUNNERS[peer](model, tok, loop.LetterE(), prompts, gen_kwargs, tokens or args.new_tokens)

        return run_once

    results = {}
    with torch.no_grad():
        for variant in VARIANTS:
            if variant == "beam-plain-cache" and not args.plain_cache:
                continue
            peer = "beam" if variant.startswith("beam") else variant
            shared = generation.use_shared_prompt_layers
            if variant == "beam-plain-cache":
                generation.use_shared_prompt_layers = lambda *a, **k: False
            try:
                results[variant] = profile_variant(call(peer), model, device, args.top, args.profiled_steps)
            finally:
                generation.use_shared_prompt_layers = shared
    env = bench.environment(device)
    report = {
        "config": {
            "device": env.get("gpu", env["device"]),
            "quick": args.quick,
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "num_beams": loop.BEAMS,
            "num_samples": loop.SAMPLES,
            "rerank_every": loop.EVERY,
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers,
            "vocab_size": len(tok),
            "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
            "threads": env["threads"],
            "torch": env["torch"],
            "transformers": env["transformers"],
        },
        "results": results,
        "environment": env,
    }
    print_report(report)
    bench.save_report(report, args.out)
    return report


def print_report(report) -> None:
    cfg = report["config"]
    print(
        f"\n{cfg['parameters']:,}-parameter Llama ({cfg['layers']} layers, vocabulary {cfg['vocab_size']:,}), "
        f"batch {cfg['batch_size']}, prompts of {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens, "
        f"{cfg['device']}"
    )
    print(
        f"{'variant':<18}{'ms/step':>9}{'kernels/step':>14}{'aten ops/step':>15}{'reads/step':>12}{'cuda syncs/step':>17}"
    )
    for name, r in report["results"].items():
        kernels = "-" if r["cuda_kernels_per_step"] is None else f"{r['cuda_kernels_per_step']:.0f}"
        syncs = r.get("cuda_syncs")
        syncs = "-" if syncs is None else f"{syncs['per_step']:.2f} (med {syncs['median_per_decode_step']})"
        print(
            f"{name:<18}{r['wall_ms_per_step']:>9.2f}{kernels:>14}{r['aten_ops_per_step']:>15.0f}"
            f"{r['host_reads']['per_step']:>12.2f}{syncs:>17}"
        )
    for name, r in report["results"].items():
        for key, label in (("top_self_cpu", "self CPU"), ("top_self_cuda", "self CUDA")):
            if not r[key]:
                continue
            print(f"\n{name}: top ops by {label} time (per step: calls, self CPU us, self CUDA us)")
            for row in r[key]:
                print(
                    f"  {row['name'][:60]:<60}{row['calls_per_step']:>8.1f}{row['self_cpu_us_per_step']:>10.1f}"
                    f"{row['self_cuda_us_per_step']:>10.1f}"
                )


if __name__ == "__main__":
    main()
