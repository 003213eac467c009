"""The patches of ``generate(..., rankgen=...)`` (rankgen_logits/patch.py, built on rankgen_logits/_patching.py):
idempotent, and reverted to the exact objects transformers' classes held before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GenerationMixin
from transformers.pipelines.text_generation import TextGenerationPipeline

import rankgen_logits
from rankgen_logits import patch
from rankgen_logits._patching import MethodPatch

ROOT = Path(__file__).resolve().parents[1]


def _held() -> tuple[object, object]:
    return GenerationMixin.__dict__["generate"], TextGenerationPipeline.__dict__["_forward"]


@pytest.fixture
def unpatched():
    """Starts without the patch; ends in the state the test found (``import rankgen_logits`` leaves it enabled)."""
    was_enabled = rankgen_logits.rankgen_generate_enabled()
    rankgen_logits.disable_rankgen_generate()
    yield
    rankgen_logits.disable_rankgen_generate()
    if was_enabled:
        rankgen_logits.enable_rankgen_generate()


def test_enabling_twice_is_enabling_once(unpatched):
    generate, forward = _held()
    rankgen_logits.enable_rankgen_generate()
    patched = _held()
    rankgen_logits.enable_rankgen_generate()
    assert all(now is then for now, then in zip(_held(), patched))
    assert patched[0] is not generate and patched[1] is not forward
    assert patched[0].__wrapped__ is generate and patched[1].__wrapped__ is forward  # wrapped once, not twice
    assert rankgen_logits.rankgen_generate_enabled() and all(p.applied for p in patch.PATCHES)


def test_disabling_restores_the_original_function_objects(unpatched):
    generate, forward = _held()
    rankgen_logits.enable_rankgen_generate()
    rankgen_logits.disable_rankgen_generate()
    assert _held()[0] is generate and _held()[1] is forward
    rankgen_logits.disable_rankgen_generate()  # a no-op when not enabled
    assert _held()[0] is generate and _held()[1] is forward
    assert not rankgen_logits.rankgen_generate_enabled() and not any(p.applied for p in patch.PATCHES)


def test_every_replaced_method_goes_through_method_patch():
    assert all(isinstance(p, MethodPatch) for p in patch.PATCHES)
    assert {(p.owner, p.name) for p in patch.PATCHES} == {
        (GenerationMixin, "generate"),
        (TextGenerationPipeline, "_forward"),
    }


def test_disable_undoes_what_the_import_did():
    code = (
        "import transformers\n"
        "from transformers.pipelines.text_generation import TextGenerationPipeline as P\n"
        "before = transformers.GenerationMixin.__dict__['generate'], P.__dict__['_forward']\n"
        "import rankgen_logits\n"
        "assert transformers.GenerationMixin.__dict__['generate'] is not before[0]\n"
        "assert P.__dict__['_forward'] is not before[1]\n"
        "rankgen_logits.disable_rankgen_generate()\n"
        "assert transformers.GenerationMixin.__dict__['generate'] is before[0]\n"
        "assert P.__dict__['_forward'] is before[1]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_method_patch_is_the_same_as_peft_ntks():
    """rankgen_logits does not import peft_ntk, so it carries its own copy of the mechanism, kept identical."""
    assert (ROOT / "rankgen_logits" / "_patching.py").read_text() == (ROOT / "peft_ntk" / "_patching.py").read_text()
