"""Counting device→host reads, the synchronisations that drain a GPU's queue, on any device (CPU included).

Used by ``profile_rankgen_loop.py`` and by the tests that bound the RankGen loop's reads per decode step.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    """Counts what makes the host wait for the device on a GPU: reading a value (``.item()``, ``bool(t)``,
    ``int(t)``, ``if t``: all ``aten._local_scalar_dense``), ops whose output shape depends on the data (nonzero,
    masked_select, unique, boolean-mask indexing, ``repeat_interleave`` with tensor repeats), and
    ``.tolist()`` / ``.cpu()`` / ``.numpy()`` (patched: on CPU they dispatch nothing). ``events`` holds
    ``(mark, what)``; ``mark`` is whatever the test sets (e.g. the number of model forwards so far)."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
    READS.add("aten.is_nonzero.default")  # (not aten.equal: torch 2.11 calls it in CPU-side argument checks)
    INDEXING = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}

    def __init__(self):
        super().__init__()
        self.events: list[tuple[object, str]] = []
        self.mark: object = None
        self._patched = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if (
            name in self.READS
            or "unique" in name
            or (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None)
            or (name in self.INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]))
        ):
            self.events.append((self.mark, name))
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def wrapper(tensor, *args, _original=original, _method=method, **kwargs):
                self.events.append((self.mark, _method))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    def count(self, mark=None) -> int:
        return sum(1 for m, _ in self.events if m == mark)
