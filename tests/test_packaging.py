"""What a published distribution needs: license, one version, typed markers, the console script, module cards."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, from the dev extra
    import tomli as tomllib


import peft_ntk
import rankgen_logits
from rankgen_logits import metrics

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_is_an_spdx_expression_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert PROJECT["license-files"] == ["LICENSE"]


def test_one_version_for_both_packages():
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert peft_ntk.__version__ == rankgen_logits.__version__ == metadata.version("peft-ntk-rankgen")


def test_packages_are_marked_typed():
    for package in (peft_ntk, rankgen_logits):
        assert (Path(package.__file__).parent / "py.typed").is_file()


def test_torch_minimum_matches_what_is_tested():
    assert "torch>=2.11" in PROJECT["dependencies"]


def test_rankgen_train_console_script():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("rankgen-train") == "rankgen_logits.train:main"
    usage = subprocess.run([sys.executable, "-m", "rankgen_logits.train", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--quick" in usage.stdout


def test_evaluate_modules_have_module_cards():
    for name in ("rankgen_score", "continuation_accuracy"):
        card = (Path(metrics.path(name)) / "README.md").read_text()
        assert card.startswith("---\n") and "\ndescription:" in card.split("---")[1]
        for section in ("## Metric description", "### Inputs", "### Output values", "## Citation"):
            assert section in card, (name, section)


def test_transformers_verbosity_controls_every_logger_of_both_packages():
    import importlib
    import logging
    import pkgutil

    from transformers.utils import logging as hf_logging

    loggers = []
    for package in (peft_ntk, rankgen_logits):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            if isinstance(getattr(module, "logger", None), logging.Logger):
                loggers.append(module.logger)
    assert len(loggers) >= 10 and all(lg.name.startswith("transformers.") for lg in loggers), [
        lg.name for lg in loggers
    ]
    previous = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        assert not any(lg.isEnabledFor(logging.WARNING) for lg in loggers)
        hf_logging.set_verbosity_info()
        assert all(lg.isEnabledFor(logging.INFO) for lg in loggers)
    finally:
        hf_logging.set_verbosity(previous)


def test_the_libraries_work_without_datasets_and_evaluate():
    """datasets and evaluate are extras: the tuner and the decoder import and run without them."""
    child = """
import sys
sys.modules["datasets"] = None  # as if not installed
sys.modules["evaluate"] = None
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
import peft_ntk, rankgen_logits
from rankgen_logits.training_data import as_pairs_dataset
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
model = get_peft_model(LlamaForCausalLM(config), peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM"))
model(input_ids=torch.tensor([[1, 2, 3]]))
try:
    as_pairs_dataset(["a document"])
except ImportError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'peft-ntk-rankgen[train]'" in result.stdout
