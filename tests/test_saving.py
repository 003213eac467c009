"""Atomic adapter saving: a save that fails or is killed midway never leaves a folder that loads as another adapter."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import peft.peft_model
import pytest
import torch
from helpers import make_different, snapshot, tiny_base
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_ntk
from peft_ntk.hub import saving

IDS = torch.arange(1, 9).view(1, 8)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def ntk_model(adapters=("default",)):
    model = get_peft_model(tiny_base(), peft_ntk.NTKAttentionConfig(init_weights=False), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft_ntk.NTKAttentionConfig(init_weights=False))
    return model


@torch.no_grad()
def logits_of(path: str) -> torch.Tensor:
    return PeftModel.from_pretrained(tiny_base(), path).eval()(input_ids=IDS).logits


def adapter_state(folder) -> tuple:
    """(config bytes, weights bytes) of one adapter folder; None for a missing file."""
    out = []
    for name in ADAPTER_FILES[:2]:
        path = os.path.join(folder, name)
        out.append(Path(path).read_bytes() if os.path.exists(path) else None)
    return tuple(out)


def leftovers(*folders) -> list:
    return [
        os.path.join(folder, name)
        for folder in folders
        if os.path.isdir(folder)
        for name in os.listdir(folder)
        if name.startswith(saving.STAGING_PREFIX)
    ]


@pytest.fixture(autouse=True)
def restore_patch_state():
    scope = peft_ntk.atomic_save_scope()
    yield
    peft_ntk.disable_atomic_save()
    if scope is not None:
        peft_ntk.enable_atomic_save(all_adapters=scope == "all")


def failing_safe_save(calls_before_failure=0):
    """A stand-in for safetensors' save_file that writes half a file and then fails as a full disk would."""
    real = peft.peft_model.safe_save_file
    state = {"calls": 0}

    def save_file(tensors, filename, metadata=None):
        if state["calls"] >= calls_before_failure:
            with open(filename, "wb") as handle:
                handle.write(b"\x00" * 100)  # partial bytes on disk
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        state["calls"] += 1
        return real(tensors, filename, metadata=metadata)

    return save_file


# ------------------------------------------------------------------------------------------------ patch management


def test_import_enables_atomic_saving_for_ntk_adapters_and_the_patch_is_reversible():
    assert peft_ntk.atomic_save_scope() == "ntk"
    wrapper = peft.PeftModel.save_pretrained
    original = wrapper.__wrapped__
    peft_ntk.enable_atomic_save()
    assert peft.PeftModel.save_pretrained is wrapper  # idempotent
    peft_ntk.enable_atomic_save(all_adapters=True)
    assert peft.PeftModel.save_pretrained is wrapper and peft_ntk.atomic_save_scope() == "all"
    peft_ntk.disable_atomic_save()
    assert peft.PeftModel.save_pretrained is original and peft_ntk.atomic_save_scope() is None
    peft_ntk.disable_atomic_save()  # no-op
    assert peft.PeftModel.save_pretrained is original
    peft_ntk.enable_atomic_save()
    assert peft_ntk.atomic_save_scope() == "ntk"


# ------------------------------------------------------------------------------- failures while PEFT writes files


@pytest.mark.parametrize("where", ["weights", "config", "model card"])
def test_failed_save_keeps_the_previous_adapter_and_a_retry_succeeds(tmp_path, monkeypatch, where):
    target = tmp_path / "adapter"
    model = ntk_model()
    model.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"unrelated")
    before, old_logits = snapshot(target), logits_of(target)

    make_different(model)
    if where == "weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save())
    elif where == "config":

        def broken_config_save(self, save_directory, **kwargs):
            Path(save_directory, "adapter_config.json").write_text('{"peft_type": "LO')  # half a config
            raise RuntimeError("config write failed (simulated)")

        monkeypatch.setattr(peft.config.PeftConfigMixin, "save_pretrained", broken_config_save)
    else:
        monkeypatch.setattr(PeftModel, "create_or_update_model_card", lambda self, d: 1 / 0)
    with pytest.raises((OSError, RuntimeError, ZeroDivisionError)):
        model.save_pretrained(target)

    assert snapshot(target) == before  # same files, same bytes: the partial write never reached the folder
    assert leftovers(target, tmp_path) == []
    torch.testing.assert_close(logits_of(target), old_logits, rtol=0, atol=0)

    monkeypatch.undo()
    model.save_pretrained(target)
    expected = tmp_path / "expected"
    model.save_pretrained(expected)
    assert adapter_state(target) == adapter_state(expected)
    assert (target / "optimizer.pt").read_bytes() == b"unrelated"
    torch.testing.assert_close(logits_of(target), logits_of(expected), rtol=0, atol=0)
    assert not torch.equal(logits_of(target), old_logits)
    assert leftovers(target, tmp_path) == []


def test_failed_first_save_leaves_no_folder(tmp_path, monkeypatch):
    target = tmp_path / "runs" / "adapter"
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save())
    with pytest.raises(OSError, match="simulated"):
        ntk_model().save_pretrained(target)
    assert not target.exists() and leftovers(tmp_path / "runs") == []


def test_failure_in_a_second_adapter_keeps_every_previous_adapter(tmp_path, monkeypatch):
    target = tmp_path / "adapters"
    model = ntk_model(adapters=("default", "other"))
    model.save_pretrained(target)
    before = snapshot(target)
    make_different(model)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save(calls_before_failure=1))
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(target)
    assert snapshot(target) == before and leftovers(target, tmp_path) == []
    monkeypatch.undo()
    model.save_pretrained(target, selected_adapters=["other"])  # subfolder only; the default adapter stays as it was
    assert adapter_state(target) == adapter_state(tmp_path / "adapters") and snapshot(target) != before
    expected = tmp_path / "expected"
    model.save_pretrained(expected, selected_adapters=["other"])
    assert adapter_state(target / "other") == adapter_state(expected / "other")
    assert {k: v for k, v in snapshot(target).items() if not k.startswith("other")} == {
        k: v for k, v in before.items() if not k.startswith("other")
    }


# ------------------------------------------------------------ failures and crashes while files are moved into place


class Crash(BaseException):
    """The process dies here: nothing after this point runs."""


def counting_replace(fail_at, root, exc):
    """os.replace that raises ``exc`` once, at its ``fail_at``-th call under ``root`` (calls elsewhere untouched)."""
    real = os.replace
    state = {"calls": 0}

    def replace(src, dst, **kwargs):
        if str(dst).startswith(str(root)):
            state["calls"] += 1
            if state["calls"] == fail_at + 1:
                raise exc
        return real(src, dst, **kwargs)

    return replace, state


def prepare_two_saves(tmp_path, adapters):
    """Save adapter A to target and (for reference) B elsewhere; return the model holding B."""
    target = tmp_path / "target"
    model = ntk_model(adapters)
    model.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"unrelated")
    make_different(model)
    reference_b = tmp_path / "reference_b"
    model.save_pretrained(reference_b)
    return model, target, reference_b


def adapter_folders(root, adapters):
    return [root if name == "default" else root / name for name in adapters]


@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=["one-adapter", "two-adapters"])
def test_an_exception_at_any_step_of_the_swap_restores_the_previous_folder(tmp_path, monkeypatch, adapters):
    model, target, _ = prepare_two_saves(tmp_path, adapters)
    before = snapshot(target)
    step = 0
    while True:
        replace, state = counting_replace(step, target, OSError(errno.EIO, "I/O error (simulated)"))
        monkeypatch.setattr(os, "replace", replace)
        try:
            model.save_pretrained(target)
        except OSError:
            monkeypatch.undo()
            assert snapshot(target) == before, f"failure at step {step}"
            assert leftovers(target, tmp_path) == []
            step += 1
            continue
        monkeypatch.undo()
        break
    assert step >= 4  # the journal, the configs aside, the weights in, the configs in: each step was hit


@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=["one-adapter", "two-adapters"])
def test_a_crash_at_any_step_never_leaves_a_different_adapter_and_recovery_restores_the_previous(
    tmp_path, monkeypatch, adapters
):
    model, target, reference_b = prepare_two_saves(tmp_path, adapters)
    before = snapshot(target)
    old = [adapter_state(f) for f in adapter_folders(target, adapters)]
    new = [adapter_state(f) for f in adapter_folders(reference_b, adapters)]
    states_seen = set()
    step = 0
    while True:
        replace, _ = counting_replace(step, target, Crash())
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", replace)
            patch.setattr(saving, "_roll_back", lambda *a: (_ for _ in ()).throw(Crash()))  # nothing is undone
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.save_pretrained(target)
                finished = True
            except Crash:
                finished = False
        # The state a killed process leaves: every adapter folder is the old adapter, the new one, or has no config.
        kinds = []
        for folder, old_state, new_state in zip(adapter_folders(target, adapters), old, new):
            state = adapter_state(folder)
            if state == old_state:
                kinds.append("old")
            elif state == new_state:
                kinds.append("new")
            else:
                assert state[0] is None, f"step {step}: {folder} loads as neither adapter"
                with pytest.raises(Exception):  # noqa: B017 - PEFT's own error for a folder without a config
                    logits_of(folder)
                kinds.append("no config")
        assert not ("old" in kinds and "new" in kinds), f"step {step}: old and new adapters mixed: {kinds}"
        states_seen.add(tuple(kinds))
        if finished:
            assert kinds == ["new"] * len(adapters)
            break
        assert peft_ntk.recover_interrupted_save(target)
        assert snapshot(target) == before, f"recovery after a crash at step {step}"
        assert leftovers(target, tmp_path) == []
        step += 1
    assert ("no config",) * len(adapters) in states_seen  # the swap window was exercised
    torch.testing.assert_close(logits_of(target), logits_of(reference_b), rtol=0, atol=0)


def test_a_crash_into_a_missing_folder_leaves_nothing_that_loads(tmp_path, monkeypatch):
    target = tmp_path / "new-adapter"
    real_rename = os.rename
    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(Crash()))
        patch.setattr(saving, "_roll_back", lambda *a: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ntk_model().save_pretrained(target)
    assert not target.exists() and len(leftovers(tmp_path)) == 1
    assert not peft_ntk.recover_interrupted_save(tmp_path / "another-adapter")  # other folders' staging is left alone
    assert peft_ntk.recover_interrupted_save(target) and leftovers(tmp_path) == []
    assert os.rename is real_rename


def test_a_crash_after_the_last_move_keeps_the_new_adapter(tmp_path, monkeypatch):
    model, target, reference_b = prepare_two_saves(tmp_path, ("default",))
    monkeypatch.setattr(saving.shutil, "rmtree", lambda *a, **k: None)  # the process dies before cleaning up
    model.save_pretrained(target)
    monkeypatch.undo()
    assert len(leftovers(target)) == 1
    assert peft_ntk.recover_interrupted_save(target)
    assert adapter_state(target) == adapter_state(reference_b) and leftovers(target) == []


# ----------------------------------------------------------------------------------------- what passes through


def test_unrelated_files_and_the_model_card_are_kept(tmp_path):
    target = tmp_path / "checkpoint-10"
    target.mkdir()
    (target / "optimizer.pt").write_bytes(b"optimizer")
    (target / "sub").mkdir()
    (target / "sub" / "file.txt").write_text("keep me")
    (target / "README.md").write_text("# My adapter\n\nNotes the user wrote.\n")
    model = ntk_model()
    model.save_pretrained(target)
    make_different(model)
    model.save_pretrained(target)
    assert (target / "optimizer.pt").read_bytes() == b"optimizer"
    assert (target / "sub" / "file.txt").read_text() == "keep me"
    card = (target / "README.md").read_text()
    assert "Notes the user wrote." in card and "library_name: peft" in card  # PEFT updated the existing card
    assert leftovers(target, tmp_path) == []


def test_a_symlinked_folder_is_saved_through_and_stays_a_link(tmp_path, monkeypatch):
    real, link = tmp_path / "real", tmp_path / "link"
    model = ntk_model()
    model.save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(real)
    make_different(model)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save())
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(link)
    assert snapshot(real) == before and leftovers(real, tmp_path) == []
    monkeypatch.undo()
    model.save_pretrained(link)
    assert link.is_symlink() and snapshot(real) != before and leftovers(real, tmp_path) == []


def test_arguments_reach_peft_unchanged_and_non_main_processes_go_straight_to_peft(tmp_path, monkeypatch):
    calls = []
    original = peft.PeftModel.save_pretrained.__wrapped__

    def spy(self, save_directory, *args, **kwargs):
        calls.append((str(save_directory), args, kwargs))
        return original(self, save_directory, *args, **kwargs)

    peft_ntk.disable_atomic_save()
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", spy)
    peft_ntk.enable_atomic_save()
    model = ntk_model()
    state_dict = {k: v.clone() * 0 for k, v in model.state_dict().items()}  # the Trainer passes its own state dict
    model.save_pretrained(tmp_path / "a", True, None, state_dict=state_dict, token="unused")
    assert calls[-1][0] != str(tmp_path / "a") and calls[-1][1] == (True, None)  # written to the staging folder
    assert calls[-1][2] == {"state_dict": state_dict, "token": "unused"}
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "a")
    assert all((p == 0).all() for n, p in reloaded.named_parameters() if "ntk_" in n)

    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert calls[-1][0] == str(tmp_path / "b") and calls[-1][2] == {"is_main_process": False}
    assert leftovers(tmp_path) == [] and not (tmp_path / "b" / "adapter_config.json").exists()
    peft_ntk.disable_atomic_save()


def test_bin_weights_are_not_shadowed_by_stale_safetensors(tmp_path):
    target = tmp_path / "adapter"
    model = ntk_model()
    model.save_pretrained(target)  # safetensors
    make_different(model)
    model.save_pretrained(target, safe_serialization=False)  # PEFT's loader prefers the old .safetensors if left
    assert not (target / "adapter_model.safetensors").exists() and (target / "adapter_model.bin").exists()
    expected = tmp_path / "expected"
    model.save_pretrained(expected, safe_serialization=False)
    torch.testing.assert_close(logits_of(target), logits_of(expected), rtol=0, atol=0)


def lora_model():
    return get_peft_model(tiny_base(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_other_adapter_types_get_peft_own_save_unless_asked(tmp_path, monkeypatch):
    target = tmp_path / "lora"
    model = lora_model()
    model.save_pretrained(target)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save())
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(target)
    # PEFT's own save: the half-written file is in the folder
    assert (target / "adapter_model.safetensors").read_bytes() == b"\x00" * 100

    monkeypatch.undo()
    model.save_pretrained(target)
    before = snapshot(target)
    peft_ntk.enable_atomic_save(all_adapters=True)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save())
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(target)
    assert snapshot(target) == before and leftovers(target, tmp_path) == []


# ---------------------------------------------------------------------------------------------------- Trainer


class _Snapshot(TrainerCallback):
    def __init__(self, model):
        self.model, self.params = model, {}

    def on_save(self, args, state, control, **kwargs):
        self.params[state.global_step] = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }


def test_trainer_checkpoint_whose_save_fails_never_loads_and_the_previous_one_does(tmp_path, monkeypatch):
    model = ntk_model()
    data = [{"input_ids": IDS[0], "labels": IDS[0]} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
    )
    snap = _Snapshot(model)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[snap])
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_safe_save(calls_before_failure=1))
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    monkeypatch.undo()

    good, failed = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"
    assert (good / "optimizer.pt").exists() and (good / "trainer_state.json").exists()
    loaded = PeftModel.from_pretrained(tiny_base(), good)
    for name, value in snap.params[2].items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value)
    # The Trainer created checkpoint-4 before saving into it; the failed save left it exactly as it was: empty.
    assert not failed.exists() or os.listdir(failed) == []
    with pytest.raises(Exception):  # noqa: B017 - nothing there to load
        PeftModel.from_pretrained(tiny_base(), failed)
    assert leftovers(tmp_path / "run", good) == []
