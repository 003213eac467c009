"""What every script in ``benchmarks/`` shares: its common flags, the record of the environment, JSON and PNG output,
and timing.

Here rather than in ``benchmarks/`` because this package is installed: a benchmark imports it the same way whether it
runs as ``python benchmarks/<name>.py`` or is loaded from its file by a test, without touching ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch

from .training import quiet_run

Device = Union[str, torch.device]


# ---------------------------------------------------------------------------------------------------------------------
# arguments


def argument_parser(
    doc: str,
    *,
    quick: Optional[str] = None,
    full: Optional[str] = None,
    threads: Optional[int] = 1,
    threads_help: Optional[str] = None,
) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--threads`` and, given their help, ``--quick``
    and ``--full`` (mutually exclusive)."""
    parser = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))
    modes = parser.add_mutually_exclusive_group()
    if quick is not None:
        modes.add_argument("--quick", action="store_true", help=quick)
    if full is not None:
        modes.add_argument("--full", action="store_true", help=full)
    default = "torch's" if threads is None else threads
    threads_text = threads_help or f"torch CPU threads (default: {default})"
    parser.add_argument("--threads", type=int, default=threads, help=threads_text)
    return parser


def fill_defaults(args: argparse.Namespace, defaults: Mapping[str, tuple[Any, Any]]) -> argparse.Namespace:
    """Every option left at ``None`` gets its ``(quick, full)`` value from ``defaults``, the first with ``--quick``."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def default_help(defaults: Mapping[str, tuple[Any, Any]], name: str) -> str:
    """``"default F (quick Q)"`` for an option of :func:`fill_defaults`."""
    quick, full = defaults[name]
    return f"default {full} (quick {quick})"


def run_script(
    parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict],
    argv: Optional[Sequence[str]] = None,
) -> dict:
    """A benchmark's ``main``: ``run(parse_args(argv))`` under :func:`~ntk_rankgen_assets.training.quiet_run` with
    the ``--threads`` asked for (the torch threads and the log level are put back afterwards, for the tests)."""
    args = parse_args(argv)
    with quiet_run(args.threads):
        return run(args)


# ---------------------------------------------------------------------------------------------------------------------
# the environment a result was measured in


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def environment(device: Device = "cpu", threads: Optional[int] = None, **extra: Any) -> dict[str, Any]:
    """Versions, machine and threads, for a report's JSON. ``threads`` defaults to torch's current number; on CUDA
    the GPU's name and the CUDA version are added; ``extra`` is merged in last."""
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_ntk": metadata.version("peft-ntk-rankgen"),
        "device": str(device),
        "threads": torch.get_num_threads() if threads is None else threads,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------------
# output


def write_json(report: Mapping[str, Any], path: Union[str, Path], *, indent: int = 2) -> Path:
    """``report`` as JSON at ``path`` (folders made as needed); values JSON does not know are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent, default=str) + "\n")
    return path


def pyplot() -> Optional[ModuleType]:
    """``matplotlib.pyplot`` drawing to files only, or ``None`` (with a note) when matplotlib is not installed: the
    plots are optional, the JSON is the result."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def label_axes(
    ax: Any,
    xlabel: str,
    ylabel: str,
    title: Optional[str] = None,
    *,
    title_size: Optional[float] = None,
    grid: bool = True,
    legend_size: Optional[float] = 7,
) -> None:
    """The axis labels, the title, a faint grid on major and minor ticks and a small legend, as the reports draw
    them; ``grid=False`` and ``legend_size=None`` leave those out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    if grid:
        ax.grid(True, which="both", alpha=0.3)
    if legend_size is not None:
        ax.legend(fontsize=legend_size)


def save_figure(fig: Any, path: Union[str, Path], *, dpi: int = 120, rect: Optional[tuple] = None) -> Path:
    """Lay ``fig`` out (inside ``rect`` when given), write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def save_report(
    report: Mapping[str, Any],
    path: Union[str, Path],
    plot: Optional[Callable[[Path], Optional[Path]]] = None,
    *,
    indent: int = 2,
    note: str = "",
) -> Optional[Path]:
    """Write ``report`` to ``path``, then ``plot(<path>.png)``; prints what was written, then ``note``. Returns the
    PNG's path, or ``None`` without one."""
    path = write_json(report, path, indent=indent)
    png = plot(path.with_suffix(".png")) if plot is not None else None
    print(f"wrote {path}" + (f" and {png}" if png else "") + note, flush=True)
    return png


# ---------------------------------------------------------------------------------------------------------------------
# timing


def synchronize(device: Device) -> None:
    """Wait for the device's queue (CUDA); nothing elsewhere, where every op has finished when it returns."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 0, device: Device = "cpu") -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones; the device is synchronised
    before and after each timed call, so that a call's time holds its queued work and nothing else."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times
