"""Real text that ships with every Python: the reference documentation and the standard library's docstrings."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

# Standard-library modules whose docstrings make a small, self-contained target domain.
DOCSTRING_MODULES = (
    "json",
    "re",
    "itertools",
    "collections",
    "functools",
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "fractions",
    "difflib",
    "shutil",
    "tempfile",
    "contextlib",
    "pprint",
    "copy",
    "fnmatch",
    "glob",
    "base64",
    "csv",
    "queue",
    "calendar",
)


def python_reference_docs(strip: bool = True) -> list[str]:
    """The Python reference documentation shipped as ``pydoc_data.topics`` (~465 k characters), one text per topic
    in the order of the topics' names; ``strip=False`` keeps each topic's leading and trailing blank lines."""
    from pydoc_data.topics import topics

    return [topics[key].strip() if strip else topics[key] for key in sorted(topics)]


def _public_members(module) -> list[tuple[str, object]]:
    members = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if inspect.ismodule(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        members.append((name, obj))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    members.append((f"{name}.{attr}", getattr(obj, attr, None)))
    return members


def stdlib_docstrings(module_names: Iterable[str] = DOCSTRING_MODULES, min_chars: int = 40) -> list[str]:
    """Docstrings of standard-library modules and their public functions, classes and methods, each once.

    Each text is the qualified name on the first line, then the docstring.
    """
    docs: list[str] = []
    seen: set[str] = set()
    for module_name in module_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
        candidates = [(module_name, module)] + [(f"{module_name}.{n}", o) for n, o in _public_members(module)]
        for qualname, obj in candidates:
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            docs.append(f"{qualname}\n{doc.strip()}")
    return docs


def split_documents(docs: Sequence[str], heldout_every: int) -> tuple[list[str], list[str]]:
    """Every ``heldout_every``-th document is held out: a deterministic split by document, no text shared."""
    train = [d for i, d in enumerate(docs) if i % heldout_every != heldout_every - 1]
    heldout = [d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1]
    return train, heldout


def token_blocks(
    tokenizer: Any, docs: Sequence[str], block_size: int, max_blocks: Optional[int] = None
) -> torch.Tensor:
    """The documents' tokens, EOS after each, cut into ``(N, block_size)`` blocks (the remainder is dropped)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
