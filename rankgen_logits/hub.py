"""Sharing RankGen scorers on the Hugging Face Hub: a model card on every save, and ``push_to_hub`` that keeps it.

``RankGenScorer.save_pretrained`` calls :func:`write_scorer_model_card`, and ``RankGenScorer.push_to_hub`` is
:func:`push_scorer_to_hub`. transformers' own ``push_to_hub`` would replace the card with the one on the Hub or its
generic template; here the card is *updated*: the repo's ``README.md`` (at the target revision) is downloaded into a
fresh temporary folder, the scorer (weights, config, tokenizer) is saved there, the card gains its metadata and the
section between ``<!-- rankgen:begin -->`` and ``<!-- rankgen:end -->`` (rewritten on every save, the rest kept), and
the folder is uploaded in one commit with ``HfApi.create_commit``. The temporary folder is deleted whatever happens,
so an interrupted push leaves nothing behind locally; calling it again retries. Everything that talks to the Hub goes
through ``huggingface_hub``.

Card metadata: ``library_name: transformers``, tags ``rankgen`` and ``t5``, ``pipeline_tag: sentence-similarity``
(RankGen embeds a prefix and a continuation separately and scores their dot product: a two-tower similarity model,
not a cross-encoder), and ``base_model`` when the scorer was loaded from another Hub repository (such as
``kalpeshk2011/rankgen-t5-base-all``). ``huggingface_hub`` ships no list of pipeline tags; the list the Hub accepts
lives in huggingface.js (``@huggingface/tasks``), where ``sentence-similarity`` is one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Optional, Union

from transformers.utils import logging

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = [
    "not_cached_hint",
    "push_scorer_to_hub",
    "record_scorer_training_settings",
    "scorer_card_section",
    "write_scorer_model_card",
]

BEGIN = "<!-- rankgen:begin (written by rankgen_logits on every save; edit outside these markers) -->"
END = "<!-- rankgen:end -->"
_SECTION = re.compile(r"<!-- rankgen:begin[^\n]*-->.*?<!-- rankgen:end -->\n?", re.DOTALL)
TAGS = ("rankgen", "t5")
PIPELINE_TAG = "sentence-similarity"
PAPER_URL = "https://arxiv.org/abs/2205.09726"
PACKAGE = "peft-ntk-rankgen"
_SETTINGS_ATTRIBUTE = "_rankgen_training_settings"
_TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "optim",
    "seed",
    "bf16",
    "fp16",
)
_repo_id_for_cards: list[str] = []


def record_scorer_training_settings(scorer, settings: Any = None, **extra: Any) -> dict:
    """Remember how ``scorer`` was trained, for the "Training settings" table of the cards it saves from now on.

    ``settings``: a ``transformers.TrainingArguments`` or a mapping; ``extra``: more settings. Returns what is now
    recorded (a new dict; the inputs are not changed).

    Example:

    ```python
    >>> from rankgen_logits.hub import record_scorer_training_settings
    >>> record_scorer_training_settings(scorer, {"learning_rate": 1e-4}, dataset="pg19")  # doctest: +SKIP
    {'learning_rate': 0.0001, 'dataset': 'pg19'}

    ```
    """
    recorded = dict(getattr(scorer, _SETTINGS_ATTRIBUTE, None) or {})
    if isinstance(settings, Mapping):
        recorded.update(settings)
    elif settings is not None and hasattr(settings, "to_dict") and hasattr(settings, "learning_rate"):
        values = settings.to_dict()
        for name in _TRAINING_FIELDS:
            value = values.get(name)
            if value is None or value is False or (name in ("max_steps", "warmup_steps") and value <= 0):
                continue
            recorded[name] = getattr(value, "value", value)
    elif settings is not None:
        raise TypeError(f"settings must be transformers.TrainingArguments or a mapping, got {type(settings).__name__}")
    recorded.update(extra)
    object.__setattr__(scorer, _SETTINGS_ATTRIBUTE, recorded)
    return dict(recorded)


def not_cached_hint(repo_id: str) -> str:
    """The end of a "cannot find" message for a checkpoint read with ``local_files_only`` (or offline): what to do."""
    from huggingface_hub import constants

    why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "local_files_only=True was given"
    return (
        f"; {why} and {repo_id!r} is not in the local cache ({constants.HF_HUB_CACHE}). Download it once with the "
        "network on (unset HF_HUB_OFFLINE / drop local_files_only), point HF_HUB_CACHE or cache_dir= at a cache that "
        "has it, or pass the path of a local copy."
    )


def _is_hub_id(name: str) -> bool:
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        return False
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def scorer_card_section(scorer, repo_id: Optional[str] = None) -> str:
    """The card section (between the markers) describing ``scorer``; ``repo_id`` goes into the loading snippet."""
    config = scorer.config
    where = repo_id or "<this repo id or folder>"
    parameters = sum(p.numel() for p in scorer.parameters())
    source = getattr(config, "name_or_path", "") or ""
    lines = [
        BEGIN,
        "## About this scorer",
        "",
        f'A [RankGen]({PAPER_URL}) scorer ("RankGen: Improving Text Generation with Large Ranking Models"): a T5 '
        "encoder and a bias-free projection that embed a prefix (as `prefix_prompt + prefix`) and a continuation (as "
        "`suffix_prompt + continuation`), each pooled at the first position. The score of a continuation is the dot "
        "product of the two vectors; higher is better.",
        "",
        f"- **Parameters:** {parameters:,}",
        f"- **Encoder:** d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads, "
        f"feed-forward `{config.feed_forward_proj}`; projection {config.d_model} → {config.projection_dim}",
        f"- **Inputs:** prefix `{config.prefix_prompt!r}` + text, first {config.max_prefix_tokens} tokens; "
        f"continuation `{config.suffix_prompt!r}` + text, first {config.max_suffix_tokens} tokens",
        f"- **Tokenizer:** {'saved with the model' if scorer.tokenizer is not None else 'not included: pass tokenizer= when loading'}",
    ]
    if _is_hub_id(source) and source != repo_id:
        lines.append(f"- **Loaded from:** `{source}`")
    lines += [
        "",
        "### How to use",
        "",
        "```bash",
        f"pip install {PACKAGE}",
        "```",
        "",
        "```python",
        "from rankgen_logits import RankGenScorer, RankGenSettings",
        "",
        f"scorer = RankGenScorer.from_pretrained({where!r})",
        'scorer.score(["The wizard raised his staff."], ["The cave filled with light."])',
        "",
        "# RankGen decoding: the LM proposes, the scorer ranks (import rankgen_logits enables generate(rankgen=...))",
        'settings = RankGenSettings(scorer, tokenizer=lm_tokenizer, mode="beam", num_beams=2, num_samples=10,',
        "                           rerank_every=20)",
        "out = lm.generate(**inputs, rankgen=settings, do_sample=True, top_p=0.9, max_new_tokens=115)",
        "```",
    ]
    settings = getattr(scorer, _SETTINGS_ATTRIBUTE, None)
    if settings:
        lines += ["", "### Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {str(value).replace('|', chr(92) + '|')} |" for key, value in settings.items()]
    lines += [END, ""]
    return "\n".join(lines)


def write_scorer_model_card(scorer, save_directory: Union[str, os.PathLike], repo_id: Optional[str] = None) -> str:
    """Create or update ``save_directory/README.md`` for ``scorer``; returns its path.

    Metadata the user set is kept (a ``pipeline_tag`` or ``base_model`` of their own, license, datasets); the
    section between the markers is rewritten; the rest of the text is kept.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(os.fspath(save_directory), "README.md")
    repo_id = repo_id or (_repo_id_for_cards[-1] if _repo_id_for_cards else None)
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard(
            f"---\nlibrary_name: transformers\n---\n\n# RankGen scorer{' ' + repo_id if repo_id else ''}\n"
        )
    data: ModelCardData = card.data
    data["library_name"] = data.get("library_name") or "transformers"
    tags = list(data.get("tags") or [])
    data["tags"] = tags + [t for t in TAGS if t not in tags]
    if not data.get("pipeline_tag"):
        data["pipeline_tag"] = PIPELINE_TAG
    source = getattr(scorer.config, "name_or_path", "") or ""
    if not data.get("base_model") and _is_hub_id(source) and source != repo_id:
        data["base_model"] = source
    section = scorer_card_section(scorer, repo_id)
    text = card.text
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section, text, count=1)
    else:
        match = re.search(r"^# .*\n", text, flags=re.MULTILINE)
        at = match.end() if match else 0
        text = text[:at] + "\n" + section + "\n" + text[at:]
    card.text = text
    card.save(path)
    return path


def push_scorer_to_hub(
    scorer,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    max_shard_size: Union[int, str, None] = "50GB",
    tags: Optional[list[str]] = None,
):
    """Upload ``scorer`` (weights, config, tokenizer) and its updated model card to ``repo_id`` in one commit.

    What ``RankGenScorer.push_to_hub`` runs; the arguments are those of transformers' ``push_to_hub``. Returns the
    ``huggingface_hub.CommitInfo`` of the commit.

    Example:

    ```python
    >>> scorer.push_to_hub("my-user/my-rankgen", private=True)  # doctest: +SKIP
    CommitInfo(commit_url='https://huggingface.co/my-user/my-rankgen/commit/...', ...)

    ```
    """
    from huggingface_hub import HfApi, ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    from . import __version__

    api = HfApi(library_name=PACKAGE, library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rankgen-push-") as tmp:
        folder = os.path.join(tmp, "scorer")
        os.mkdir(folder)
        try:
            card = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
            shutil.copyfile(card, os.path.join(folder, "README.md"))
        except (EntryNotFoundError, RevisionNotFoundError):
            pass
        _repo_id_for_cards.append(repo_id)
        try:
            scorer.save_pretrained(folder, max_shard_size=max_shard_size)
        finally:
            _repo_id_for_cards.pop()
        if tags:
            card = ModelCard.load(os.path.join(folder, "README.md"))
            current = list(card.data.get("tags") or [])
            card.data["tags"] = current + [t for t in tags if t not in current]
            card.save(os.path.join(folder, "README.md"))
        try:
            return api.create_commit(
                repo_id=repo_id,
                operations=_additions(folder),
                commit_message=commit_message or "Upload RankGen scorer",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
        except BaseException as error:
            _note_failed_push(error, repo_id)
            raise


def _additions(folder: str) -> list:
    """One ``CommitOperationAdd`` per file under ``folder``: the push is a single commit, applied whole or not at all.

    (``HfApi.upload_folder`` may split an upload into several commits and retries on its own in recent
    ``huggingface_hub`` releases; ``create_commit`` keeps one commit.)
    """
    from huggingface_hub import CommitOperationAdd

    operations = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            operations.append(
                CommitOperationAdd(
                    path_in_repo=os.path.relpath(path, folder).replace(os.sep, "/"), path_or_fileobj=path
                )
            )
    return operations


def _note_failed_push(error: BaseException, repo_id: str) -> None:
    note = (
        f"The push to {repo_id!r} did not complete. The Hub applies a commit whole or not at all, so the repo is "
        "as it was, and the temporary folder the push saved into is deleted. Run the same push_to_hub call again to "
        "retry."
    )
    if hasattr(error, "append_to_message"):  # huggingface_hub's HTTP errors: shown in str(error)
        error.append_to_message("\n\n" + note)
    elif hasattr(error, "add_note"):  # Python >= 3.11: shown under the traceback
        error.add_note(note)
