"""Sharing NTK-Attention adapters on the Hugging Face Hub: ``push_to_hub`` with a model card, and clear load errors.

Everything that talks to the Hub goes through ``huggingface_hub`` (``HfApi``, ``hf_hub_download``); this module has
no HTTP code of its own.

**Push.** ``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter in a
temporary folder, then *replaces* the ``README.md`` PEFT wrote with the card found on the Hub (or transformers'
generic template, ``library_name: transformers``), so the PEFT and NTK-Attention card never reaches the Hub.
:func:`enable_hub_integration` (run by ``import peft_ntk``) routes ``push_to_hub`` of models whose adapters are all
NTK-Attention adapters to :func:`push_adapter_to_hub`, which

1. creates the repo if needed (``exist_ok=True``; ``private=`` applies to a new repo) and the branch ``revision``;
2. downloads the repo's ``README.md`` at that revision, if it has one, into a fresh temporary folder, and saves the
   adapter there with ``save_pretrained`` (atomic, see :mod:`peft_ntk.hub.saving`), so PEFT and
   :mod:`peft_ntk.hub.model_card` *update* that card (the user's text and metadata are kept);
3. uploads the folder in one commit (``HfApi.create_commit``): the Hub applies a commit whole or not at all.

The temporary folder is deleted whatever happens, so an interrupted push leaves nothing behind locally; it never
touches a folder of yours. Run the same call again to retry. Other adapter types keep transformers' push.

**Pull.** ``PeftModel.from_pretrained(base, repo_id, revision=...)``, ``AutoPeftModelFor*.from_pretrained(repo_id)``
and ``PeftModel.load_adapter`` are PEFT's own (``import peft_ntk`` first). PEFT turns every failure to fetch
``adapter_config.json`` into ``ValueError: Can't find 'adapter_config.json' at '<repo>'``, whatever the cause. With
``enable_hub_integration(explain_load_errors=True)`` that error keeps its type but says why and what to do: an invalid token, a missing or private repository, a
missing revision, or offline mode (``HF_HUB_OFFLINE=1``) with nothing in the cache (see
:func:`explain_hub_error`). Loading from the cache offline works as PEFT and ``huggingface_hub`` do it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional, Union

from peft import PeftModel
from peft.config import PeftConfigMixin
from transformers.utils import logging

from .._patching import MethodPatch
from ..tuner.peft_type import NTK_PEFT_TYPE
from . import model_card

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = [
    "disable_hub_integration",
    "enable_hub_integration",
    "explain_hub_error",
    "hub_integration_enabled",
    "push_adapter_to_hub",
]

_PACKAGE = "peft-ntk-rankgen"


def _api():
    from huggingface_hub import HfApi

    from .._version import __version__

    return HfApi(library_name=_PACKAGE, library_version=__version__)


# --------------------------------------------------------------------------------------------------------- push


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    safe_serialization: bool = True,
    selected_adapters: Optional[list[str]] = None,
    max_shard_size: Union[int, str, None] = None,
):
    """Upload ``model``'s adapter(s) and an updated model card to ``repo_id`` in one commit.

    What ``model.push_to_hub(repo_id, ...)`` runs for NTK-Attention adapters (see the module docstring).

    Args:
        model: a PEFT model.
        repo_id: ``"user/name"`` (or ``"name"``, in the token owner's namespace).
        commit_message, commit_description: of the commit (default message: "Upload NTK-Attention adapter").
        private: visibility of a repo created by this call (an existing repo keeps its own).
        token: a Hub token; default: the saved login or ``HF_TOKEN``.
        revision: branch to push to; created from ``main`` when missing.
        create_pr: open a pull request instead of committing to the branch.
        tags: extra tags for the card's metadata.
        safe_serialization, selected_adapters: passed to ``save_pretrained``.
        max_shard_size: accepted for ``PushToHubMixin`` compatibility; adapters are saved as a single file.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (a ``str``: its URL).

    Example:

    ```python
    >>> import peft_ntk
    >>> model.push_to_hub("my-user/my-ntk-adapter", private=True)  # doctest: +SKIP
    CommitInfo(commit_url='https://huggingface.co/my-user/my-ntk-adapter/commit/...', ...)

    ```
    """
    del max_shard_size  # adapters are small; PEFT writes a single weights file
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="peft-ntk-push-") as tmp:
        folder = os.path.join(tmp, "adapter")
        os.mkdir(folder)
        card = _existing_card(repo_id, revision, token)
        if card is not None:
            shutil.copyfile(card, os.path.join(folder, "README.md"))
        model_card._repo_id_for_cards.append(repo_id)
        try:
            model.save_pretrained(folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters)
        finally:
            model_card._repo_id_for_cards.pop()
        if tags:
            _add_tags(os.path.join(folder, "README.md"), tags)
        try:
            return api.create_commit(
                repo_id=repo_id,
                operations=_additions(folder),
                commit_message=commit_message or "Upload NTK-Attention adapter",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
        except BaseException as error:
            _note_failed_push(error, repo_id)
            raise


def _existing_card(repo_id: str, revision: Optional[str], token) -> Optional[str]:
    """Local path of the repo's ``README.md`` at ``revision``, or ``None`` when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None


def _add_tags(path: str, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    current = list(card.data.get("tags") or [])
    card.data["tags"] = current + [t for t in tags if t not in current]
    card.save(path)


# --------------------------------------------------------------------------------------------------------- pull


def explain_hub_error(error: BaseException, repo_id: str) -> Optional[str]:
    """What went wrong fetching ``repo_id`` from the Hub and what to do, or ``None`` if ``error`` is no Hub error.

    Looks through the exception chain (``__cause__`` / ``__context__``) for a ``huggingface_hub`` error.

    Example:

    ```python
    >>> from peft_ntk.hub import explain_hub_error
    >>> explain_hub_error(ValueError("unrelated"), "user/adapter") is None
    True

    ```
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, seen = [], set()
    while error is not None and id(error) not in seen:  # the error PEFT raised, and what caused it
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in chain:  # an answer from the Hub says most
        if isinstance(error, GatedRepoError):
            return f"{repo_id!r} is gated: request access on its page, then log in or pass token=."
        if isinstance(error, RevisionNotFoundError):
            return f"{repo_id!r} has no such revision (branch, tag or commit); check revision=."
        if isinstance(error, RepositoryNotFoundError):
            return (
                f"the Hub has no repository {repo_id!r} that this token can see: check the name, and for a private "
                "repo log in (`hf auth login`) or pass token= with read access."
            )
        if isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status == 401:
                return (
                    "the Hub refused the token (401 Unauthorized: invalid or expired). Pass a valid one as token=, "
                    "run `hf auth login` again, or unset HF_TOKEN to load public repos anonymously."
                )
            if status == 403:
                return f"the token has no read access to {repo_id!r} (403 Forbidden)."
            return f"the Hub answered with an error: {str(error).splitlines()[0]}"
    for error in chain:
        if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            if constants.HF_HUB_OFFLINE:
                return (
                    f"offline mode is on (HF_HUB_OFFLINE=1) and {repo_id!r} is not in the local cache "
                    f"({constants.HF_HUB_CACHE}). Download it once with the network on (unset HF_HUB_OFFLINE, or "
                    f"run `hf download {repo_id}`), point HF_HUB_CACHE / cache_dir= at a cache that has it, or pass "
                    "the path of a local copy instead of the repo id."
                )
            if "local_files_only" in str(error):
                return (
                    f"local_files_only=True was given and {repo_id!r} is not in the local cache "
                    f"({constants.HF_HUB_CACHE}): drop local_files_only to download it, or pass cache_dir= / the path "
                    "of a local copy."
                )
            return (
                f"{repo_id!r} could not be reached and is not in the local cache ({constants.HF_HUB_CACHE}): check "
                f"the network and the endpoint ({constants.ENDPOINT}), or pass the path of a local copy."
            )
    return None


def _make_clearer_config_error(function):
    """Wrap a ``PeftConfigMixin`` classmethod so PEFT's "Can't find 'adapter_config.json'" says why."""

    def wrapper(cls, model_id, *args, **kwargs):
        try:
            return function(cls, model_id, *args, **kwargs)
        except ValueError as error:
            reason = explain_hub_error(error, str(model_id)) if "Can't find" in str(error) else None
            if reason is None:
                raise
            raise ValueError(f"{error}: {reason}") from error

    return wrapper


# --------------------------------------------------------------------------------------------------------- hooks


def _all_adapters_are_ntk(model) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return bool(configs) and all(config.peft_type == NTK_PEFT_TYPE for config in configs.values())


def _make_push_to_hub(original):
    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        if not args and _all_adapters_are_ntk(self):
            return push_adapter_to_hub(self, repo_id, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    return push_to_hub


_PUSH_PATCH = MethodPatch(PeftModel, "push_to_hub", _make_push_to_hub)
_LOAD_ERROR_PATCHES = tuple(
    MethodPatch(PeftConfigMixin, name, _make_clearer_config_error) for name in ("from_pretrained", "_get_peft_type")
)


def enable_hub_integration(*, explain_load_errors: bool = False) -> None:
    """Route ``push_to_hub`` of NTK-Attention models to :func:`push_adapter_to_hub` and write NTK model cards on every
    save; models with other adapter types keep PEFT's and transformers' behaviour. Idempotent; ``import peft_ntk``
    runs it.

    Args:
        explain_load_errors: also make PEFT's "Can't find 'adapter_config.json'" error say why (token, repository,
            revision, offline mode; :func:`explain_hub_error`). It is raised before PEFT knows the adapter type, so
            it applies to every adapter type and is left to the caller to switch on.
    """
    model_card.enable_ntk_model_cards()
    _PUSH_PATCH.apply()
    if explain_load_errors:
        for patch in _LOAD_ERROR_PATCHES:
            patch.apply()


def disable_hub_integration() -> None:
    """Undo :func:`enable_hub_integration`: PEFT's and transformers' own methods come back."""
    model_card.disable_ntk_model_cards()
    for patch in (_PUSH_PATCH, *_LOAD_ERROR_PATCHES):
        patch.revert()


def hub_integration_enabled() -> bool:
    """Whether :func:`enable_hub_integration` is in effect."""
    return _PUSH_PATCH.applied


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
