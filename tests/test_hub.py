"""Sharing on the Hub: NTK adapters and RankGen scorers pushed to and pulled from a Hub server on loopback.

``tests/fake_hub.py`` speaks the endpoints the real ``huggingface_hub`` client calls. Each end-to-end step runs in a
child process (this file run as a script: ``python tests/test_hub.py <scenario>``) whose environment points the
client at the server *before* it is imported (``HF_ENDPOINT``; ``HF_HOME`` / ``HF_HUB_CACHE`` in the test's tmp
dir), so the client's own code runs unmodified. A guard in the child refuses every connection beyond loopback and
logs the attempt; the tests assert that there was none and that the server saw no request it does not speak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from transformers import Trainer, TrainingArguments
from transformers.utils import PushToHubMixin

import peft_ntk
from peft_ntk.hub import (
    disable_hub_integration,
    enable_hub_integration,
    explain_hub_error,
    hub_integration_enabled,
    model_card,
)

# PEFT's own methods (import peft_ntk wraps the card hook; config loading stays PEFT's unless asked for)
PEFT_CREATE_CARD = PeftModel.create_or_update_model_card.__wrapped__
PEFT_CONFIG_FROM_PRETRAINED = PeftConfigMixin.__dict__["from_pretrained"].__func__
PEFT_GET_TYPE = PeftConfigMixin.__dict__["_get_peft_type"].__func__
assert all(f.__module__.startswith("peft.") for f in (PEFT_CREATE_CARD, PEFT_CONFIG_FROM_PRETRAINED, PEFT_GET_TYPE))

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_hub import FakeHub  # noqa: E402
from helpers import TINY_T5, make_different, snapshot, tiny_base, tiny_rankgen_scorer, train_word_tokenizer  # noqa: E402

ALICE, BOB = "hf_alice_token", "hf_bob_token"
IDS = torch.arange(1, 9).view(1, 8)


# ================================================================================================ the child process


def _guard_network() -> None:
    """Refuse (and log) every connection that is not to loopback: nothing may reach the real Hub."""
    import socket

    log = os.environ.get("NETWORK_GUARD_LOG")
    allowed = {"127.0.0.1", "::1", "localhost", None}

    def refuse(what):
        if log:
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"{what}\n")
        raise OSError(f"test guard: no network beyond loopback (tried {what})")

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if (host.decode() if isinstance(host, bytes) else host) not in allowed:
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in allowed:
            refuse(address)
        return real_connect(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect


@torch.no_grad()
def _logits(model) -> list:
    return model.eval()(input_ids=IDS).logits[0, -1].tolist()


def _error(call) -> str:
    try:
        call()
    except Exception as err:  # the message the user sees, and the error type
        return "\n".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])])
    return "no error"


def _ntk(base=None):
    return get_peft_model(
        base if base is not None else tiny_base(),
        peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM", init_weights=False),
    )


@torch.no_grad()
def _perturb(model, seed: int = 1) -> None:
    """New adapter weights (only weights: the config stays, so the in-memory model computes what it saves)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "ntk_" in name:
            param.add_(torch.randn(param.shape, generator=generator))


def _push_leftovers() -> list:
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(("peft-ntk-push-", "rankgen-push-"))]


def _tiny_scorer(seed: int = 0):
    return tiny_rankgen_scorer(train_word_tokenizer(), seed, **TINY_T5).eval()


def _scores(scorer) -> list:
    with torch.no_grad():
        return scorer.score(["the class of the object"] * 2, ["is a type", "returns none"]).tolist()


def child_push() -> dict:
    """Everything that writes to the Hub, in one process (each process start costs seconds)."""
    from transformers import AutoModelForCausalLM

    out = {}
    # An adapter whose base model also lives on the Hub; a second version on the branch "v2".
    tiny_base().push_to_hub("alice/tiny-llama")  # the base model, with transformers' own push
    model = _ntk(AutoModelForCausalLM.from_pretrained("alice/tiny-llama"))
    peft_ntk.record_training_settings(model, {"learning_rate": 0.001, "max_steps": 5}, dataset="pydoc topics")
    first = model.push_to_hub("ntk-adapter", commit_message="first adapter")  # namespace: the token's user
    out.update(commit=str(first), oid=first.oid, main=_logits(model))
    _perturb(model)
    out.update(v2_oid=model.push_to_hub("alice/ntk-adapter", revision="v2").oid, v2=_logits(model))
    out["pr_url"] = model.push_to_hub("alice/ntk-adapter", create_pr=True, commit_message="proposal").pr_url

    # A scorer, private, as if loaded from the official checkpoint; another one on "v2".
    scorer = _tiny_scorer()
    scorer.config.name_or_path = "kalpeshk2011/rankgen-t5-base-all"
    scorer.push_to_hub("alice/rankgen-tiny", private=True)
    _tiny_scorer(seed=1).push_to_hub("alice/rankgen-tiny", revision="v2")
    out.update(scores=_scores(scorer), scores_v2=_scores(_tiny_scorer(seed=1)))

    # A repo whose card the user wrote (seeded by the test): pushed twice.
    model = _ntk()
    model.push_to_hub("alice/carded")
    _perturb(model)
    model.push_to_hub("alice/carded", tags=["my-tag"])

    # A private adapter, and what other people see. Refusals first, while nothing of the repo is cached (with a
    # cached copy the client falls back to it).
    model.push_to_hub("alice/secret", private=True)
    out["anonymous"] = _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/secret", token=False))
    out["bob"] = _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/secret", token=BOB))
    out["wrong_load"] = _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/secret", token="hf_wrong"))
    out["alice"] = _logits(PeftModel.from_pretrained(tiny_base(), "alice/secret"))
    out["secret_pushed"] = _logits(model)
    out["wrong_push"] = _error(lambda: model.push_to_hub("alice/other", token="hf_wrong"))
    out["bob_push"] = _error(lambda: model.push_to_hub("alice/secret", token=BOB))
    out["missing"] = _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/nope"))
    out["missing_revision"] = _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/secret", revision="v9"))
    out["leftovers"] = _push_leftovers()
    return out


def child_load() -> dict:
    """Somewhere else (a fresh cache): pull the adapter, its base model, the scorer, with revisions."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from rankgen_logits import RankGenScorer

    base = AutoModelForCausalLM.from_pretrained("alice/tiny-llama")
    return {
        "main": _logits(AutoPeftModelForCausalLM.from_pretrained("alice/ntk-adapter")),
        "v2": _logits(PeftModel.from_pretrained(base, "alice/ntk-adapter", revision="v2")),
        "scores": _scores(RankGenScorer.from_pretrained("alice/rankgen-tiny")),
        "scores_v2": _scores(RankGenScorer.from_pretrained("alice/rankgen-tiny", revision="v2")),
        "scorer_wrong_token": _error(lambda: RankGenScorer.from_pretrained("alice/rankgen-tiny", token="hf_wrong")),
        "scorer_anonymous": _error(lambda: RankGenScorer.from_pretrained("alice/rankgen-tiny", token=False)),
        "scorer_missing": _error(lambda: RankGenScorer.from_pretrained("alice/nope")),
    }


def child_offline() -> dict:
    """HF_HUB_OFFLINE=1 on the cache ``child_load`` filled: what is cached loads; what is not gets a message."""
    from peft import AutoPeftModelForCausalLM

    from rankgen_logits import RankGenScorer

    return {
        "main": _logits(AutoPeftModelForCausalLM.from_pretrained("alice/ntk-adapter")),
        "scores": _scores(RankGenScorer.from_pretrained("alice/rankgen-tiny")),
        "auto": _error(lambda: AutoPeftModelForCausalLM.from_pretrained("alice/never-downloaded")),
        "peft": _error(lambda: PeftModel.from_pretrained(tiny_base(), "alice/never-downloaded")),
        "scorer": _error(lambda: RankGenScorer.from_pretrained("alice/never-downloaded")),
    }


def child_interrupted_push() -> dict:
    """The test makes the first commit fail with a 500 and drops the connection on the second."""
    model = _ntk()
    local = os.path.join(os.getcwd(), "my-adapter")
    model.save_pretrained(local)
    before = snapshot(local)
    out = {"error_500": _error(lambda: model.push_to_hub("alice/interrupted"))}
    out["leftovers_500"] = _push_leftovers()
    out["error_drop"] = _error(lambda: model.push_to_hub("alice/interrupted"))
    out["leftovers_drop"] = _push_leftovers()
    out["retry_oid"] = model.push_to_hub("alice/interrupted").oid
    out["leftovers_after_retry"] = _push_leftovers()
    out["local_unchanged"] = snapshot(local) == before
    return out


# ================================================================================================ the parent side

USER_CARD = "---\nlicense: mit\nlanguage: en\ntags:\n- mine\n---\n\n# My adapter\n\nWords I wrote myself.\n"


def run_child(hub, tmp_path, scenario: str, *, cache: str = "cache", token=ALICE, offline: bool = False) -> dict:
    """Run ``scenario`` in a fresh interpreter pointed at ``hub``; returns its result, raises on failure."""
    guard_log = tmp_path / "network_guard.log"
    temp = tmp_path / f"tmp-{scenario}"
    work = tmp_path / f"work-{scenario}"
    temp.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / cache),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="1" if offline else "0",
        NETWORK_GUARD_LOG=str(guard_log),
        TMPDIR=str(temp),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p),
    )
    if token:
        env["HF_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "test_hub.py"), scenario],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not guard_log.exists(), f"a connection beyond loopback was tried: {guard_log.read_text()}"
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, f"{scenario} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(results[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One Hub for the module: push (``child_push``), pull elsewhere (``child_load``), then pull offline."""
    tmp_path = tmp_path_factory.mktemp("hub")
    with FakeHub({ALICE: "alice", BOB: "bob"}) as hub:
        hub.seed("alice/carded", {"README.md": USER_CARD.encode(), "notes.txt": b"kept"})
        pushed = run_child(hub, tmp_path, "push", cache="cache-pusher")
        loaded = run_child(hub, tmp_path, "load", cache="cache-user")
        online_requests = len(hub.log)
        offline = run_child(hub, tmp_path, "offline", cache="cache-user", offline=True)
        yield {"hub": hub, "pushed": pushed, "loaded": loaded, "offline": offline, "online_requests": online_requests}
    assert not hub.unhandled, f"the client used endpoints FakeHub does not speak: {hub.unhandled}"


def card(hub, repo_id: str, revision: str = "main") -> ModelCard:
    return ModelCard(hub.files(repo_id, revision)["README.md"].decode())


def close(a, b) -> None:
    # A freshly built and a loaded T5 may round differently in the last float32 bits.
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_adapter_round_trip_with_revisions_and_the_base_model_from_the_hub(shared):
    hub, pushed, loaded = shared["hub"], shared["pushed"], shared["loaded"]
    assert pushed["commit"].startswith(f"{hub.url}/alice/ntk-adapter/commit/")
    files = hub.files("alice/ntk-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert hub.files("alice/ntk-adapter", "v2")["adapter_model.safetensors"] != files["adapter_model.safetensors"]
    assert "config.json" in hub.files("alice/tiny-llama")
    # Pulled into a fresh cache: exactly the pushed adapters, each at its revision.
    assert loaded["main"] == pushed["main"] and loaded["v2"] == pushed["v2"] and pushed["main"] != pushed["v2"]
    assert pushed["leftovers"] == []
    # create_pr=True: a pull request with the v2 weights; main keeps the first adapter.
    assert pushed["pr_url"] == f"{hub.url}/alice/ntk-adapter/discussions/1"
    assert (
        hub.files("alice/ntk-adapter", "refs/pr/1")["adapter_model.safetensors"]
        == (hub.files("alice/ntk-adapter", "v2")["adapter_model.safetensors"])
    )


def test_offline_loads_from_the_cache_and_explains_a_miss(shared):
    offline, pushed = shared["offline"], shared["pushed"]
    assert offline["main"] == pushed["main"]
    close(offline["scores"], pushed["scores"])
    assert len(shared["hub"].log) == shared["online_requests"]  # not one request while offline
    for key in ("auto", "peft"):
        message = offline[key]
        assert message.startswith("ValueError: Can't find 'adapter_config.json' at 'alice/never-downloaded'"), message
        assert (
            "HF_HUB_OFFLINE=1" in message and "not in the local cache" in message and "unset HF_HUB_OFFLINE" in message
        )
    assert "HF_HUB_OFFLINE=1" in offline["scorer"] and "not in the local cache" in offline["scorer"], offline["scorer"]
    assert "Download it once with the network on" in offline["scorer"]


def test_adapter_model_card_on_the_hub(shared):
    pushed = card(shared["hub"], "alice/ntk-adapter")
    data = pushed.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "alice/tiny-llama"
    assert data["pipeline_tag"] == "text-generation"
    assert {"peft", "ntk-attention", "base_model:adapter:alice/tiny-llama"} <= set(data["tags"])
    text = pushed.text
    assert "pip install peft-ntk-rankgen" in text and "import peft_ntk" in text
    assert "AutoPeftModelForCausalLM.from_pretrained('alice/ntk-adapter')" in text
    # 2 layers x 4 query heads x (8² + 8): the trainable parameter count, and the recorded training settings.
    assert "576 trainable parameters" in text
    assert "| learning_rate | 0.001 |" in text and "| dataset | pydoc topics |" in text
    assert text.count(model_card.BEGIN) == 1
    # transformers' generic card (what PushToHubMixin would have uploaded) is not what reached the Hub.
    assert "This is the model card of a 🤗 transformers model" not in text


def test_a_card_already_on_the_hub_is_updated_not_replaced(shared):
    hub = shared["hub"]
    updated = card(hub, "alice/carded")
    data = updated.data.to_dict()
    assert data["license"] == "mit" and data["language"] == "en"
    assert {"mine", "peft", "ntk-attention", "my-tag"} <= set(data["tags"])
    assert "# My adapter" in updated.text and "Words I wrote myself." in updated.text
    assert updated.text.count(model_card.BEGIN) == 1 and updated.text.count(model_card.END) == 1  # pushed twice
    assert hub.files("alice/carded")["notes.txt"] == b"kept"
    assert "base_model" not in data and "base_model:adapter:" not in data["tags"]  # the base had no name


def test_private_repo_tokens_and_missing_repos(shared):
    hub, out = shared["hub"], shared["pushed"]
    assert hub.repos["alice/secret"].private
    assert out["alice"] == out["secret_pushed"]
    for key in ("anonymous", "bob"):
        assert out[key].startswith("ValueError: Can't find 'adapter_config.json' at 'alice/secret'"), out[key]
        assert "no repository 'alice/secret' that this token can see" in out[key]
    assert "refused the token (401 Unauthorized" in out["wrong_load"], out["wrong_load"]
    assert "401" in out["wrong_push"] and "Invalid credentials in Authorization header" in out["wrong_push"]
    assert "403" in out["bob_push"] and "rights" in out["bob_push"], out["bob_push"]
    assert "no repository 'alice/nope'" in out["missing"], out["missing"]
    assert "has no such revision" in out["missing_revision"], out["missing_revision"]
    assert "alice/other" not in hub.repos


def test_scorer_push_pull_private_revisions_and_card(shared):
    hub, pushed, loaded = shared["hub"], shared["pushed"], shared["loaded"]
    assert hub.repos["alice/rankgen-tiny"].private
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(hub.files("alice/rankgen-tiny"))
    close(loaded["scores"], pushed["scores"])
    close(loaded["scores_v2"], pushed["scores_v2"])
    assert not torch.allclose(torch.tensor(loaded["scores"]), torch.tensor(loaded["scores_v2"]), rtol=1e-2)
    wrong, anonymous = loaded["scorer_wrong_token"], loaded["scorer_anonymous"]
    assert "401" in wrong and "Invalid credentials" in wrong, wrong
    assert "RepositoryNotFoundError" in anonymous and "private" in anonymous, anonymous
    assert "RepositoryNotFoundError" in loaded["scorer_missing"] and "alice/nope" in loaded["scorer_missing"]
    data = card(hub, "alice/rankgen-tiny").data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert "rankgen" in data["tags"] and data["base_model"] == "kalpeshk2011/rankgen-t5-base-all"
    text = card(hub, "alice/rankgen-tiny").text
    assert "RankGenScorer.from_pretrained('alice/rankgen-tiny')" in text and "pip install peft-ntk-rankgen" in text


def test_an_interrupted_push_leaves_nothing_behind_and_a_retry_succeeds(tmp_path):
    with FakeHub({ALICE: "alice"}) as hub:
        hub.fail_next("commit", status=500)
        hub.fail_next("commit", drop=True)
        out = run_child(hub, tmp_path, "interrupted_push")
    assert "500" in out["error_500"] and "commit" in out["error_500"], out["error_500"]
    assert "disconnected" in out["error_drop"].lower(), out["error_drop"]
    for key in ("error_500", "error_drop"):
        assert "did not complete" in out[key] and "Run the same push_to_hub call again" in out[key], out[key]
    assert out["leftovers_500"] == out["leftovers_drop"] == out["leftovers_after_retry"] == []
    assert out["local_unchanged"] and not list((tmp_path / "tmp-interrupted_push").iterdir())
    commits = [status for _, path, status in hub.requests_of("/api/models/alice/interrupted/commit/")]
    assert commits == [500, 0, 200]  # 0: the connection dropped with no answer
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.files("alice/interrupted"))
    assert not hub.unhandled


def test_the_example_trains_pushes_and_loads_elsewhere_against_the_local_hub(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    example = os.path.join(os.path.dirname(HERE), "examples", "hub_share.py")
    done = subprocess.run(
        [sys.executable, example, "--local-hub", "--quick", "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hub"].startswith("http://127.0.0.1:")
    assert summary["elsewhere"]["max_abs_diff"] == 0.0
    ppl = summary["heldout_perplexity"]
    assert ppl["adapted"] < ppl["base"] and abs(summary["elsewhere"]["heldout_perplexity"] - ppl["adapted"]) < 1e-3
    assert "demo/ntk-share-base/model.safetensors" in summary["elsewhere"]["downloaded"]  # the base came from the Hub
    assert "ntk-attention" in summary["card_head"] and "base_model: demo/ntk-share-base" in summary["card_head"]


# ------------------------------------------------------------------------------------- in-process, no server


def _read_card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def test_local_save_writes_the_ntk_card_and_saving_again_rewrites_only_its_section(tmp_path):
    model = _ntk()
    model.save_pretrained(tmp_path)
    first = _read_card(tmp_path)
    assert first.data.library_name == "peft" and {"peft", "ntk-attention"} <= set(first.data.tags)
    assert first.data.pipeline_tag == "text-generation"
    assert first.data.get("base_model") is None and "base_model:adapter:" not in first.data.tags
    adapter = sum(p.numel() for n, p in model.named_parameters() if "ntk_" in n)
    assert f"{adapter:,} trainable parameters" in first.text and "import peft_ntk" in first.text

    edited = first.text.replace("# Model Card for Model ID", "# Model Card for Model ID\n\nMy notes.")
    (tmp_path / "README.md").write_text(
        f"---\n{yaml.safe_dump({**first.data.to_dict(), 'license': 'mit'})}---\n{edited}"
    )
    peft_ntk.record_training_settings(model, {"learning_rate": 0.5})
    model.save_pretrained(tmp_path)
    second = _read_card(tmp_path)
    assert "My notes." in second.text and second.data.license == "mit"
    assert second.text.count(model_card.BEGIN) == 1 and "| learning_rate | 0.5 |" in second.text


def test_the_card_describes_every_adapter_and_a_partial_save_leaves_it_alone(tmp_path):
    model = _ntk()
    model.add_adapter("other", peft_ntk.NTKAttentionConfig(init_weights=False, feature_map="relu"))
    model.save_pretrained(tmp_path)
    text = _read_card(tmp_path).text
    assert "**Adapter `default`:**" in text and "**Adapter `other`:**" in text and "feature map `relu`" in text
    before = (tmp_path / "README.md").read_bytes()
    _perturb(model)
    model.peft_config["default"].feature_map = "relu"  # would show on the card if "default" were described again
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert (tmp_path / "README.md").read_bytes() == before


def test_the_parameter_count_is_what_the_adapter_file_holds_including_saved_heads(tmp_path):
    from peft.utils import get_peft_model_state_dict
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_base().config
    config.num_labels = 3
    base = LlamaForSequenceClassification(config)
    model = get_peft_model(base, peft_ntk.NTKAttentionConfig(task_type="SEQ_CLS"))
    expected = sum(t.numel() for t in get_peft_model_state_dict(model).values())
    assert expected > 576  # the Z and k of 2 layers x 4 heads, plus the classification head saved whole
    model.save_pretrained(tmp_path)
    card = _read_card(tmp_path)
    assert f"{expected:,} trainable parameters" in card.text and card.data.pipeline_tag == "text-classification"
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in card.text


def test_the_card_is_written_inside_the_atomic_save(tmp_path, monkeypatch):
    model = _ntk()
    model.save_pretrained(tmp_path)
    before = snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("card update failed")

    monkeypatch.setattr(model_card, "update_ntk_model_card", broken)
    make_different(model)
    with pytest.raises(RuntimeError, match="card update failed"):
        model.save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before  # weights, config and card: all the previous save's


def test_other_adapter_types_keep_peft_card_and_push():
    lora = get_peft_model(tiny_base(), LoraConfig(target_modules=["q_proj"]))
    with tempfile.TemporaryDirectory() as folder:
        lora.save_pretrained(folder)
        assert model_card.BEGIN not in _read_card(folder).text
        assert "ntk-attention" not in (_read_card(folder).data.tags or [])


def test_hub_hooks_are_idempotent_and_reversible():
    try:
        enable_hub_integration()
        enable_hub_integration()
        assert hub_integration_enabled()
        assert PeftModel.push_to_hub.__wrapped__ is PushToHubMixin.push_to_hub
        disable_hub_integration()
        assert not hub_integration_enabled()
        assert PeftModel.push_to_hub is PushToHubMixin.push_to_hub
        assert PeftModel.create_or_update_model_card is PEFT_CREATE_CARD
        enable_hub_integration(explain_load_errors=True)
        assert PeftConfigMixin.__dict__["from_pretrained"].__func__.__wrapped__ is PEFT_CONFIG_FROM_PRETRAINED
        disable_hub_integration()
        for name, original in (("from_pretrained", PEFT_CONFIG_FROM_PRETRAINED), ("_get_peft_type", PEFT_GET_TYPE)):
            assert PeftConfigMixin.__dict__[name].__func__ is original
    finally:
        enable_hub_integration()
    assert hub_integration_enabled()


def test_import_leaves_other_adapter_types_alone():
    """`import peft_ntk` (done above) wraps only what NTK adapters need, and the wrappers hand every other model to
    PEFT's own method; PEFT's config loading (shared by every adapter type) is not touched unless asked for."""
    for name, original in (("from_pretrained", PEFT_CONFIG_FROM_PRETRAINED), ("_get_peft_type", PEFT_GET_TYPE)):
        assert PeftConfigMixin.__dict__[name].__func__ is original
    calls = []
    lora = get_peft_model(tiny_base(), LoraConfig(target_modules=["q_proj"]))
    peft_ntk.disable_hub_integration()
    try:  # installed over a stand-in for transformers' push, which the wrapper must hand LoRA models to
        with mock.patch.object(PushToHubMixin, "push_to_hub", lambda self, *a, **kw: calls.append((a, kw))):
            peft_ntk.enable_hub_integration()
            lora.push_to_hub("alice/lora", private=True)
            peft_ntk.disable_hub_integration()
    finally:
        peft_ntk.enable_hub_integration()
    with tempfile.TemporaryDirectory() as folder:
        lora.save_pretrained(folder)
        ours = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
        peft_ntk.disable_atomic_save()
        peft_ntk.disable_hub_integration()
        try:
            lora.save_pretrained(folder)
            peft = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
        finally:
            peft_ntk.enable_atomic_save()
            peft_ntk.enable_hub_integration()
    assert calls == [(("alice/lora",), {"private": True})]
    assert ours == peft  # the same files, byte for byte


def test_trainer_callback_records_the_settings_and_the_trainers_card_keeps_the_ntk_section(tmp_path):
    torch.manual_seed(0)
    model = _ntk()
    rows = torch.randint(0, 64, (8, 8))
    args = TrainingArguments(
        str(tmp_path),
        learning_rate=3e-3,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r, "labels": r} for r in rows],
        callbacks=[peft_ntk.NTKModelCardCallback()],
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()  # what Trainer.push_to_hub writes: its own card, then PEFT's (and our) update
    text = _read_card(tmp_path).text
    assert text.count(model_card.BEGIN) == 1 and "generated automatically" in text
    for row in (
        "| learning_rate | 0.003 |",
        "| max_steps | 2 |",
        "| total_train_batch_size | 4 |",
        "| trained_steps | 2 |",
        "| last_logged_train_loss |",
    ):
        assert row in text, row
    with pytest.raises(TypeError, match="TrainingArguments or a mapping"):
        peft_ntk.record_training_settings(model, 3)


def test_explain_hub_error_ignores_other_errors():
    assert explain_hub_error(ValueError("something else"), "alice/x") is None
    assert explain_hub_error(KeyError("NTK_ATTENTION"), "alice/x") is None


def test_scorer_local_save_writes_and_updates_its_card(tmp_path):
    scorer = _tiny_scorer()
    scorer.save_pretrained(tmp_path)
    first = _read_card(tmp_path)
    assert first.data.library_name == "transformers" and first.data.pipeline_tag == "sentence-similarity"
    assert "rankgen" in first.data.tags and first.data.get("base_model") is None  # a scorer built from a config
    assert "---" not in first.text and "## About this scorer" in first.text
    (tmp_path / "README.md").write_text(first.content + "\nMine.\n")
    scorer.save_pretrained(tmp_path)
    second = _read_card(tmp_path)
    assert second.text.count("<!-- rankgen:begin") == 1 and second.text.rstrip().endswith("Mine.")


if __name__ == "__main__":
    _guard_network()
    torch.set_num_threads(1)
    enable_hub_integration(explain_load_errors=True)  # the scenarios check the explained load errors
    print("RESULT " + json.dumps(globals()["child_" + sys.argv[1]]()))
