"""Atomic ``PeftModel.save_pretrained``: an interrupted save never leaves a folder that loads as a different adapter.

PEFT writes ``adapter_model.safetensors`` (or ``.bin``), ``adapter_config.json`` and ``README.md`` straight into the
target folder, one after the other. A failure in between (disk full, a bad tensor, Ctrl-C, a killed job) leaves the
new weights next to the old config, or half a weights file, and the folder may still load, as neither adapter.

:func:`enable_atomic_save` wraps ``peft.PeftModel.save_pretrained`` (every PEFT model class inherits it, and the
``Trainer`` saves PEFT checkpoints through it). A wrapped call on the main process:

1. lets PEFT write everything into a private staging folder (``.tmp-peft-save-*``, inside the target folder, or next
   to it when the target is missing or empty, so that renames never cross file systems), with the existing
   ``README.md`` copied in first so PEFT updates the model card as usual (and :mod:`peft_ntk.model_card` adds the
   NTK-Attention content there: the card is part of the same atomic save); then fsyncs what it wrote;
2. if the target folder is missing or empty, renames the staged folder onto it: one atomic rename;
3. otherwise moves the files in, each with an atomic ``os.replace``, in an order where a config never sits next to
   weights of another save: (a) every old ``adapter_config.json`` it is about to replace is moved aside into the
   staging folder, so those adapter folders stop loading; (b) weights, model card and any other staged file go in,
   the old versions moved aside too; (c) the new configs go in. A journal in the staging folder records the plan.

Guarantee, for each adapter folder a call writes (the target, and ``target/<name>`` for non-default adapters):

- The call returns: the folder holds the new adapter, fsynced.
- The call raises (any exception, ``KeyboardInterrupt`` included, while PEFT writes or while files are moved): the
  folder holds exactly the files it held before (same contents; new files removed), and the staging folder is gone;
  the exception propagates. (An interrupt that lands after the last rename, when the save is complete, leaves the
  complete new adapter.) Only if putting the old files back fails too is the staging folder kept, for
  :func:`recover_interrupted_save`, with a warning that says so.
- The process dies at any instant (SIGKILL, power loss): each folder holds its previous adapter, its new adapter, or
  no ``adapter_config.json`` (loading then fails with PEFT's error: it never loads). A config is never next to
  weights of another save, and once one folder of a multi-adapter save holds its new adapter, none holds its old
  one. The previous files stay in the staging folder: :func:`recover_interrupted_save` (called automatically at the
  start of the next atomic save to the same folder) puts the previous adapter back. A target that was missing or
  empty is either still missing/empty or complete.
- Files PEFT does not write (a ``Trainer`` checkpoint's ``optimizer.pt``, ``trainer_state.json``, tokenizer files)
  are never touched. Saving with ``safe_serialization=False`` also moves aside a stale ``adapter_model.safetensors``
  in the same folder, which PEFT's loader would otherwise prefer over the new ``adapter_model.bin``.

Scope: ``import peft_ntk`` enables it for NTK-Attention adapters only: a save whose adapters are all NTK adapters
takes the atomic route, every other save reaches PEFT's original method unchanged. ``enable_atomic_save(
all_adapters=True)`` extends it to every adapter type; :func:`disable_atomic_save` restores the original. Calls with
``is_main_process=False`` (which write no files) always go straight to PEFT; every argument is passed on untouched.

Differences from PEFT's plain save that remain: a file that is a symlink in the target is replaced by a regular file
(PEFT would write through the link); while a save runs, and after a crash until recovery, a hidden
``.tmp-peft-save-*`` folder exists inside or next to the target; ``path_initial_model_for_weight_conversion`` is
written by PEFT directly, as before. One writer per folder at a time. Durability across power loss relies on the
file system keeping renames ordered after fsynced data (ext4, xfs, btrfs, APFS do; network file systems may not).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import secrets
import shutil
import warnings
from typing import Any, Optional

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .._patching import MethodPatch
from ..tuner.peft_type import NTK_PEFT_TYPE
from . import model_card

CONFIG_NAME = "adapter_config.json"
STAGING_PREFIX = ".tmp-peft-save-"
_JOURNAL = "journal.json"
_NEW, _OLD = "new", "old"
_scope: Optional[str] = None  # None (disabled), "ntk" or "all"
_PEFT_SIGNATURE = inspect.signature(PeftModel.save_pretrained)


# --------------------------------------------------------------------------------------------------- patch management


def _make_atomic_save_pretrained(original):
    def save_pretrained(self, save_directory, *args, **kwargs):
        arguments = _bound_arguments(self, save_directory, args, kwargs) or {}
        with model_card.saving_adapters(arguments.get("selected_adapters")):  # the card describes what is saved
            if _scope == "all" or (_scope == "ntk" and _all_selected_are_ntk(self, save_directory, args, kwargs)):
                return _atomic_save(original, self, save_directory, args, kwargs)
            return original(self, save_directory, *args, **kwargs)

    return save_pretrained


_SAVE_PATCH = MethodPatch(PeftModel, "save_pretrained", _make_atomic_save_pretrained)


def enable_atomic_save(*, all_adapters: bool = False) -> None:
    """Make ``PeftModel.save_pretrained`` atomic (see the module docstring). Idempotent.

    Args:
        all_adapters: ``False`` (what ``import peft_ntk`` sets): only saves whose adapters are all NTK-Attention
            adapters are atomic; every other save is PEFT's own. ``True``: every adapter type.

    Calling it again only changes the scope; undo with :func:`disable_atomic_save`.
    """
    global _scope
    _scope = "all" if all_adapters else "ntk"
    _SAVE_PATCH.apply()


def disable_atomic_save() -> None:
    """Put PEFT's original ``save_pretrained`` back (a no-op when atomic saving is not enabled)."""
    global _scope
    _SAVE_PATCH.revert()
    _scope = None


def atomic_save_scope() -> Optional[str]:
    """``None`` when atomic saving is off, ``"ntk"`` for NTK-Attention adapters only, ``"all"`` for every adapter."""
    return _scope if _SAVE_PATCH.applied else None


def atomic_save_pretrained(model: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, *args, **kwargs)``, atomically, whether or not the patch is enabled."""
    _atomic_save(_SAVE_PATCH.original, model, save_directory, args, kwargs)


def _bound_arguments(model, save_directory, args, kwargs) -> Optional[dict]:
    # PEFT's signature, read before any patching: a wrapper in between may take (*args, **kwargs).
    try:
        return _PEFT_SIGNATURE.bind(model, save_directory, *args, **kwargs).arguments
    except TypeError:
        return None  # let PEFT raise its own error


def _all_selected_are_ntk(model, save_directory, args, kwargs) -> bool:
    arguments = _bound_arguments(model, save_directory, args, kwargs)
    configs = getattr(model, "peft_config", {})
    if arguments is None:
        return False
    selected = arguments.get("selected_adapters")
    selected = list(configs) if selected is None else selected
    return bool(selected) and all(name in configs and configs[name].peft_type == NTK_PEFT_TYPE for name in selected)


# ------------------------------------------------------------------------------------------------------- the save


def _atomic_save(original, model, save_directory, args, kwargs) -> None:
    arguments = _bound_arguments(model, save_directory, args, kwargs)
    target = os.path.realpath(os.fspath(save_directory))  # a symlinked folder: work next to the real one
    if arguments is None or not arguments.get("is_main_process", True) or os.path.isfile(target):
        # Non-main processes write no files; a file path or bad arguments get PEFT's own error.
        return original(model, save_directory, *args, **kwargs)

    recover_interrupted_save(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    whole_folder = not os.path.exists(target) or (
        os.path.isdir(target) and not os.listdir(target) and os.stat(target).st_dev == os.stat(parent).st_dev
    )
    staging = _make_staging(parent if whole_folder else target)
    new = os.path.join(staging, _NEW)
    try:
        _write_journal(staging, {"target": target})
        readme = os.path.join(target, "README.md")
        if os.path.isfile(readme):  # PEFT updates an existing model card in place: give it the current one
            os.makedirs(new)
            shutil.copy2(readme, os.path.join(new, "README.md"))
        original(model, new, *args, **kwargs)
        if os.path.isdir(new):
            _fsync_tree(new)
            if not (whole_folder and _rename_folder_onto(new, target)):
                _commit_files(staging, target)
    except BaseException as exc:
        try:
            _roll_back(staging, target)
        except BaseException as rollback_error:
            message = (
                f"peft_ntk atomic save: restoring {target} after a failed save failed too ({rollback_error!r}); the "
                f"previous files are kept in {staging}. Run peft_ntk.recover_interrupted_save({target!r})."
            )
            if hasattr(exc, "add_note"):
                exc.add_note(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _make_staging(where: str) -> str:
    while True:
        path = os.path.join(where, STAGING_PREFIX + secrets.token_hex(8))
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            continue
    return path


def _rename_folder_onto(new: str, target: str) -> bool:
    """One atomic rename of the staged folder onto a missing or empty target; False if that is not possible now."""
    try:
        os.rename(new, target)  # POSIX replaces an empty directory; anything in it makes this fail
    except OSError as error:
        if error.errno in (
            errno.ENOTEMPTY,
            errno.EEXIST,
            errno.EXDEV,
            errno.EACCES,
            errno.EPERM,
            errno.EISDIR,
            errno.ENOTDIR,
        ):
            return False
        raise
    _fsync_dir(os.path.dirname(target))
    return True


def _staged_files(new: str) -> list[str]:
    files = []
    for root, _, names in os.walk(new):
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), new).replace(os.sep, "/"))
    return sorted(files)


def _path(base: str, rel: str) -> str:
    return os.path.join(base, *rel.split("/"))


def _commit_files(staging: str, target: str) -> None:
    new, old = os.path.join(staging, _NEW), os.path.join(staging, _OLD)
    files = _staged_files(new)
    configs = [f for f in files if f.rsplit("/", 1)[-1] == CONFIG_NAME]
    others = [f for f in files if f.rsplit("/", 1)[-1] != CONFIG_NAME]
    # PEFT's loader prefers adapter_model.safetensors over adapter_model.bin: a stale one would shadow new .bin weights.
    shadows = []
    for f in others:
        if f.rsplit("/", 1)[-1] == WEIGHTS_NAME:
            sibling = f[: -len(WEIGHTS_NAME)] + SAFETENSORS_WEIGHTS_NAME
            if sibling not in files and os.path.lexists(_path(target, sibling)):
                shadows.append(sibling)
    folders = [""] + sorted({f.rsplit("/", 1)[0] for f in files if "/" in f})
    new_folders = [d for d in folders if not os.path.isdir(_path(target, d))]
    os.makedirs(target, exist_ok=True)
    _write_journal(
        staging,
        {"target": target, "plan": {"configs": configs, "others": others, "shadows": shadows, "folders": new_folders}},
    )

    touched = {target}
    for f in configs + shadows:  # (a) adapters about to change stop loading
        _move_aside(target, old, f)
    for f in others:  # (b) weights, model card, anything else
        _move_aside(target, old, f)
        destination = _path(target, f)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(_path(new, f), destination)
        touched.add(os.path.dirname(destination))
    for f in configs:  # (c) the new adapters appear
        os.replace(_path(new, f), _path(target, f))
    for folder in sorted(touched):
        _fsync_dir(folder)
    journal = _read_journal(staging)
    journal["committed"] = True  # a crash from here on keeps the new adapter: recovery only deletes the staging folder
    _write_journal(staging, journal)


def _move_aside(target: str, old: str, rel: str) -> None:
    source = _path(target, rel)
    if os.path.lexists(source):
        backup = _path(old, rel)
        os.makedirs(os.path.dirname(backup), exist_ok=True)
        os.replace(source, backup)


def _roll_back(staging: str, target: str) -> None:
    """Undo a (partial) commit: safe to repeat, and safe to interrupt (configs leave first and come back last).

    Invariant kept by both the commit and this function: a planned file missing from ``new/`` is the new file, now in
    the target; a file present in ``old/`` is the previous version, to be put back.
    """
    journal = _read_journal(staging) or {}
    plan = journal.get("plan")
    if not plan or journal.get("committed"):
        return  # nothing was moved yet, or everything was
    new, old = os.path.join(staging, _NEW), os.path.join(staging, _OLD)

    def take_back(rel):
        staged, placed = _path(new, rel), _path(target, rel)
        if not os.path.lexists(staged) and os.path.lexists(placed):
            os.makedirs(os.path.dirname(staged), exist_ok=True)
            os.replace(placed, staged)

    def restore(rel):
        backup = _path(old, rel)
        if os.path.lexists(backup):
            os.replace(backup, _path(target, rel))

    for f in plan["configs"]:
        take_back(f)
    for f in plan["others"]:
        take_back(f)
        restore(f)
    for f in plan["shadows"] + plan["configs"]:
        restore(f)
    for folder in sorted(plan["folders"], key=lambda d: -(d.count("/") + 1 if d else 0)):  # deepest first
        try:
            os.rmdir(_path(target, folder))
        except OSError:
            pass
    _fsync_dir(target)


# --------------------------------------------------------------------------------------------------- recovery


def recover_interrupted_save(save_directory: str) -> bool:
    """Put back the previous adapter after a save that was killed midway, and delete its staging folder.

    Looks for ``.tmp-peft-save-*`` folders inside ``save_directory`` and, for saves into a missing or empty folder,
    next to it (those whose journal names ``save_directory``). Safe to call at any time when no save to this folder is
    running; atomic saves call it themselves first. Returns whether anything was found.
    """
    target = os.path.realpath(os.fspath(save_directory))
    found = False
    candidates = []
    if os.path.isdir(target):
        candidates += [(os.path.join(target, n), True) for n in os.listdir(target) if n.startswith(STAGING_PREFIX)]
    parent = os.path.dirname(target)
    if os.path.isdir(parent):
        candidates += [(os.path.join(parent, n), False) for n in os.listdir(parent) if n.startswith(STAGING_PREFIX)]
    for staging, inside in candidates:
        if not os.path.isdir(staging):
            continue
        journal = _read_journal(staging)
        if not inside and (journal is None or journal.get("target") != target):
            continue  # another folder's save (or one that is just starting)
        _roll_back(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
        found = True
    return found


# ------------------------------------------------------------------------------------------------------- helpers


def _write_journal(staging: str, content: dict) -> None:
    tmp = os.path.join(staging, _JOURNAL + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(staging, _JOURNAL))
    _fsync_dir(staging)


def _read_journal(staging: str) -> Optional[dict]:
    try:
        with open(os.path.join(staging, _JOURNAL), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _fsync_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
