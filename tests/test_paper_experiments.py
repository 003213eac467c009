"""The paper experiments: benchmarks/paper_prefix_length.py (Sec. 4.4) and benchmarks/paper_finetune.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_script, tiny_bert_encoder

import peft_ntk

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the plots are optional


def load(name: str):
    return load_script(BENCH / f"{name}.py", keep=True)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# Prefix-length experiment
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, chunk", [(37, 8), (5, 64), (64, 64)])
def test_streamed_prefix_attention_equals_the_materialised_softmax(m, chunk):
    pl = load("paper_prefix_length")
    dim, length, n = 16, 12, 3
    head = pl.Head.random(dim, seed=3)
    x = torch.randn(n, length, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, k, v = head.project(x)

    summary = pl.summarise_prefix(q.reshape(-1, dim), pl.prefix_chunks(head, m, 7, chunk), tail=6, query_block=5)
    in_out, in_lse = pl.input_attention(q, k, v)
    streamed, input_share = pl.combine_with_input(
        in_out, in_lse, summary.out.reshape(q.shape), summary.lse.reshape(q.shape[:2])
    )

    prefix = list(pl.prefix_chunks(head, m, 7, chunk))
    prefix_k = torch.cat([c[0] for c in prefix])
    prefix_v = torch.cat([c[1] for c in prefix])
    assert prefix_k.shape == (m, dim)
    exact = pl.exact_attention_materialised(q, k, v, prefix_k, prefix_v)
    torch.testing.assert_close(streamed, exact, rtol=1e-10, atol=1e-12)
    assert bool(((0 < input_share) & (input_share < 1)).all())

    # The compressed forms: closed-form Z, k over the whole prefix, and the last tokens.
    z, kvec = peft_ntk.prefix_state_from_keys_values(prefix_k[None], prefix_v[None])
    torch.testing.assert_close(summary.z, z[0])
    torch.testing.assert_close(summary.k, kvec[0])
    torch.testing.assert_close(summary.tail_keys, prefix_k[-6:])
    torch.testing.assert_close(summary.tail_values, prefix_v[-6:])
    # The prefix is a function of (seed, m, chunk): reading it again gives the same tokens.
    again = torch.cat([c[0] for c in pl.prefix_chunks(head, m, 7, chunk)])
    assert torch.equal(again, prefix_k)


def test_the_methods_compute_what_they_claim():
    pl = load("paper_prefix_length")
    dim, length = 8, 5
    head = pl.Head.random(dim, seed=1)
    x = torch.randn(2, length, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, k, v = head.project(x)
    prefix_k = torch.randn(4, dim, dtype=torch.float64)
    prefix_v = torch.randn(4, dim, dtype=torch.float64)

    # An explicit prefix through the (out, lse) pieces equals the (m + L)² softmax.
    torch.testing.assert_close(
        pl.prefix_output(q, k, v, prefix_k, prefix_v), pl.exact_attention_materialised(q, k, v, prefix_k, prefix_v)
    )
    # NTK with the closed form equals the phi-kernel prefix written out token by token.
    z, kvec = peft_ntk.prefix_state_from_keys_values(prefix_k[None], prefix_v[None])
    phi = peft_ntk.elu_feature_map
    kernel = phi(q) @ phi(prefix_k).T  # (2, L, m)
    scores = torch.exp(q @ k.transpose(1, 2) / math.sqrt(dim))
    expected = (scores @ v + kernel @ prefix_v) / (scores.sum(-1, keepdim=True) + kernel.sum(-1, keepdim=True))
    torch.testing.assert_close(pl.ntk_output(q, k, v, z[0], kvec[0]), expected)


def test_quick_prefix_length_run_writes_every_method_and_length(tmp_path):
    pl = load("paper_prefix_length")
    out = tmp_path / "pl.json"
    args = [
        "--quick",
        "--max-log2-m",
        "6",
        "--steps",
        "20",
        "--train-inputs",
        "8",
        "--val-inputs",
        "4",
        "--test-inputs",
        "4",
        "--dim",
        "16",
        "--length",
        "16",
        "--chunk",
        "24",
        "--out",
        str(out),
    ]
    report = pl.main(args)

    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() or not HAVE_MATPLOTLIB
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert list(saved["summary"]) == [str(2**i) for i in range(1, 7)]
    m_prime = saved["settings"]["truncated_tokens"]
    assert m_prime == (16 * 16 + 16) // 32 == 8 and saved["settings"]["ntk_params"] == 16 * 16 + 16
    for m, row in saved["summary"].items():
        assert set(pl.METHODS) <= set(row), row
        assert all(math.isfinite(row[method]["mean"]) and row[method]["mean"] >= 0 for method in pl.METHODS)
        if int(m) <= m_prime:  # the truncated prefix holds the whole prefix, so it is exact
            assert row["truncated_last"]["mean"] < 1e-5, (m, row)
        else:
            assert row["truncated_last"]["mean"] > 1e-3, (m, row)
        # The prefix's share of the attention mass grows with m; without a prefix the error is exactly that gap.
        assert 0 < row["prefix_mass_share"] < 1
    shares = [saved["summary"][m]["prefix_mass_share"] for m in saved["summary"]]
    assert shares == sorted(shares)
    seed_run = saved["per_seed"]["64"]["0"]["methods"]
    for method in pl.TRAINED_METHODS:  # the lr is chosen on validation, and the reported error is the test error
        per_lr = seed_run[method]["per_lr"]
        best = min(per_lr, key=lambda lr: per_lr[lr]["val"])
        assert float(best) == seed_run[method]["best_lr"]
        assert seed_run[method]["test"] == per_lr[best]["test"]
    # Training helps: NTK with trained Z, k is better than the untrained closed form at the longest prefix.
    last = saved["summary"]["64"]
    assert last["ntk_trained"]["mean"] < last["phi_closed_form"]["mean"]
    assert set(saved["verdict"]) >= {"ntk_error_falls_with_m", "m_where_ntk_beats_both_truncated_prefixes"}


def test_prefix_length_rejects_bad_sizes():
    pl = load("paper_prefix_length")
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        pl.main(["--quick", "--steps", "0"])


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning accuracy
# ----------------------------------------------------------------------------------------------------------------------


def test_stdlib_docstring_task_is_balanced_disjoint_and_deterministic():
    ft = load("paper_finetune")
    data = ft.stdlib_docstring_dataset(per_class=30)
    again = ft.stdlib_docstring_dataset(per_class=30)
    assert data.splits == again.splits
    assert data.labels == list(ft.STDLIB_PACKAGES)
    assert data.sizes() == {"train": 18 * 8, "validation": 6 * 8, "test": 6 * 8}
    texts = {split: set(x) for split, (x, _) in data.splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    for _, labels in data.splits.values():
        assert sorted(set(labels)) == list(range(8))
        assert len(set(labels.count(c) for c in range(8))) == 1  # balanced
    # A real text: first paragraphs of docstrings, no leftover line breaks.
    assert all(len(t) >= 40 and "\n" not in t for t in data.splits["train"][0])


def test_digits_tasks_do_not_share_classes_or_images():
    ft = load("paper_finetune")
    pre, down = ft.digits_datasets()
    assert pre.labels == ["0", "1", "2", "3", "4"] and down.labels == ["5", "6", "7", "8", "9"]
    assert down.sizes()["test"] == 250 and down.sizes()["validation"] == 150
    x = down.splits["train"][0][0]
    assert x.shape == (1, 8, 8) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT checkpoint with a word-level tokenizer, saved the way a Hub model is (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(path)
    tiny_bert_encoder(len(words)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "method",
    ["ntk", "ntk_favor_wide", "lora", "lora_r4", "lora_value", "prefix10", "prefix_matched", "full", "head"],
)
def test_every_method_trains_a_fresh_head_and_its_adapter(method, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    ft = load("paper_finetune")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = ft.apply_method(method, base, "text")
    head = ft.head_module(model.base_model if hasattr(model, "active_peft_config") else model)
    head = getattr(head, "modules_to_save", {"default": head})["default"]
    assert all(p.requires_grad for p in head.parameters())
    without_head, head_n = ft.count_trainable(model)
    assert head_n == 32 * 3 + 3
    expected = {
        "ntk": 2 * 4 * (8 * 8 + 8),
        "ntk_favor_wide": 2 * 4 * (16 * 8 + 16),  # feature_dim = 2 x head_dim 8
        "lora": 2 * 2 * (32 * 8 + 8 * 32),
        "lora_r4": 2 * 2 * (32 * 4 + 4 * 32),
        "lora_value": 2 * (32 * 8 + 8 * 32),
        "prefix10": 2 * 2 * 10 * 32,
        "prefix_matched": 2 * 2 * ft.prefix_tokens_matching_ntk(base.config) * 32,
        "full": sum(p.numel() for p in model.parameters()) - head_n,
        "head": 0,
    }[method]
    assert without_head == expected

    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    loss = torch.nn.functional.cross_entropy(
        ft.logits_of(model, {"input_ids": ids, "attention_mask": mask}), torch.tensor([0, 2])
    )
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("classifier" in n for n in changed), changed
    if method not in ("head",):
        assert any("classifier" not in n for n in changed), changed


def test_prefix_tuning_forward_uses_the_prefix_and_honours_padding(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    ft = load("paper_finetune")
    torch.manual_seed(0)
    model = ft.apply_method(
        "prefix10", AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3), "text"
    ).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    logits = ft.prefix_tuned_logits(model, ids, mask)
    # Padding: changing padded tokens changes nothing.
    other = ids.clone()
    other[0, 5:] = 9
    torch.testing.assert_close(ft.prefix_tuned_logits(model, other, mask), logits)
    # Positions are not shifted by the prefix: the pretrained position embeddings are read at 0..L-1.
    torch.testing.assert_close(ft.prefix_tuned_logits(model, ids[:, :5], mask[:, :5]), logits)
    positions = []
    pos_hook = model.base_model.bert.embeddings.position_embeddings.register_forward_hook(
        lambda mod, args, out: positions.append(args[0])
    )
    ft.prefix_tuned_logits(model, ids, mask)
    pos_hook.remove()
    assert positions and torch.equal(positions[0], torch.arange(7)[None])
    # The prefix matters, and each attention layer sees m + L keys.
    seen = []
    hook = [
        layer.attention.self.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
        for layer in model.base_model.bert.encoder.layer
    ]
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(3.0)
    assert not torch.allclose(ft.prefix_tuned_logits(model, ids, mask), logits)
    for h in hook:
        h.remove()
    assert len(seen) == 2
    caches = [s.get("cache", s.get("past_key_values")) for s in seen]
    assert all(c.get_seq_length(i) == 10 + 7 for i, c in enumerate(caches))


def test_lr_is_chosen_on_validation_and_test_is_read_at_the_end(monkeypatch):
    ft = load("paper_finetune")
    # lr 0.1 looks best on test but worst on validation: validation must win.
    table = {0.1: (0.2, 0.9), 0.01: (0.8, 0.5)}

    def fake_train_once(method, runtime, lr, seed, s, head_lr=None):
        val, test = table[lr]
        return {
            "method": method,
            "lr": lr,
            "head_lr": head_lr,
            "seed": seed,
            "curve": [{"step": 10, "loss": 1.0, "val_acc": val - 0.1}, {"step": 40, "loss": 0.5, "val_acc": val}],
            "val_acc": val,
            "test_acc": test + 0.01 * seed,
            "train_s": 1.0,
            "final_loss": 0.1,
            "trainable_params": 5,
            "trainable_params_without_head": 2,
        }

    monkeypatch.setattr(ft, "train_once", fake_train_once)
    s = ft.Settings(seeds=(0, 1, 2), lr_grid={"ntk": (0.1, 0.01)})
    res = ft.run_method("ntk", runtime=None, s=s, log=lambda _: None, head_lr=0.5)
    assert res["best_lr"] == 0.01 and res["head_lr"] == 0.5
    assert res["curve"] == [
        {"step": 10, "loss": 1.0, "val_acc": pytest.approx(0.7)},
        {"step": 40, "loss": 0.5, "val_acc": 0.8},
    ]
    assert res["val_gain_last_quarter"] == pytest.approx(0.1)
    assert [r["lr"] for r in res["runs"]] == [0.01, 0.01, 0.01] and [r["seed"] for r in res["runs"]] == [0, 1, 2]
    assert res["test_acc_mean"] == pytest.approx(0.51)
    assert res["test_acc_std"] == pytest.approx(0.01)


def test_the_head_has_its_own_learning_rate_tuned_once_on_the_probe_and_shared(monkeypatch, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    ft = load("paper_finetune")
    torch.manual_seed(0)
    model = ft.apply_method("ntk", AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3), "text")
    adapter, head = ft.parameter_groups(model, lr=0.01, head_lr=0.3)
    assert adapter["lr"] == 0.01 and head["lr"] == 0.3
    assert {id(p) for p in head["params"]} == ft.head_parameter_ids(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("ntk_" in names[id(p)] for p in adapter["params"]) and len(adapter["params"]) == 2 * 2
    probe = ft.apply_method("head", AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3), "text")
    (only_head,) = ft.parameter_groups(probe, lr=0.01, head_lr=0.3)
    assert only_head["lr"] == 0.3 and {id(p) for p in only_head["params"]} == ft.head_parameter_ids(probe)

    # The head's rate is chosen once, on the head-only probe's validation accuracy, then given to every method.
    calls = []

    def fake_run_method(method, runtime, s, log, head_lr=None):
        calls.append((method, head_lr, tuple(ft.learning_grid(method, s))))
        best = 0.1 if method == "head" else 0.01
        return {"best_lr": best, "trainable_params": 1, "train_s_mean": 1.0, "test_acc_mean": 0.5, "test_acc_std": 0.0}

    monkeypatch.setattr(ft, "run_method", fake_run_method)
    monkeypatch.setattr(ft, "print_table", lambda results: None)
    monkeypatch.setattr(ft.bench, "save_report", lambda *a, **k: None)
    args = ["--task", "text", "--model", tiny_bert, "--per-class", "10", "--methods", "ntk", "lora", "head"]
    report = ft.main(args)["text"]
    assert calls[0] == ("head", None, (1e-2, 3e-2, 1e-1))
    assert calls[1:] == [("ntk", 0.1, ft.CPU_LRS["ntk"]), ("lora", 0.1, ft.CPU_LRS["lora"])]
    assert list(report["results"]) == ["ntk", "lora", "head"] and report["head_lr"] == 0.1
    calls.clear()
    ft.main(args[:-4] + ["--methods", "ntk", "--head-lr", "0.2"])
    assert calls == [("ntk", 0.2, ft.CPU_LRS["ntk"])]  # given: not tuned, and no probe run unless asked for
    with pytest.raises(SystemExit, match="--head-lr must be a positive"):
        ft.main(args + ["--head-lr", "0"])


def test_hub_datasets_load_through_datasets_and_keep_the_official_split_for_test(monkeypatch):
    datasets = pytest.importorskip("datasets")
    ft = load("paper_finetune")
    calls = []

    def fake_load_dataset(path, name=None):
        calls.append((path, name))
        label = datasets.ClassLabel(names=["False", "True"])
        feats = datasets.Features(
            {"question": datasets.Value("string"), "passage": datasets.Value("string"), "label": label}
        )
        train = datasets.Dataset.from_dict(
            {
                "question": [f"q{i}" for i in range(20)],
                "passage": [f"p{i}" for i in range(20)],
                "label": [i % 2 for i in range(20)],
            },
            features=feats,
        )
        val = datasets.Dataset.from_dict(
            {"question": ["qa", "qb"], "passage": ["pa", "pb"], "label": [1, 0]}, features=feats
        )
        return datasets.DatasetDict({"train": train, "validation": val})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = ft.hub_dataset("super_glue/boolq", "text")
    assert calls == [("aps/super_glue", "boolq")]
    assert data.splits["test"] == ([("qa", "pa"), ("qb", "pb")], [1, 0])
    assert data.sizes() == {"train": 18, "validation": 2, "test": 2}
    assert not set(data.splits["train"][0]) & set(data.splits["validation"][0])
    assert data.labels == ["False", "True"]
    with pytest.raises(SystemExit, match="image dataset; pass --task image"):
        ft.hub_dataset("cifar100", "text")
    with pytest.raises(SystemExit, match="not known"):
        ft.hub_dataset("imdb", "text")


def test_quick_finetune_run_reports_every_method_offline(tmp_path, monkeypatch, tiny_bert):
    datasets = pytest.importorskip("datasets")
    ft = load("paper_finetune")

    def no_network(*args, **kwargs):
        raise AssertionError("the offline tasks must not call datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    common = ["--quick", "--steps", "3", "--seeds", "0", "1"]
    report = ft.main(
        common
        + [
            "--task",
            "text",
            "--per-class",
            "10",
            "--max-length",
            "16",
            "--model",
            tiny_bert,
            "--out",
            str(tmp_path / "ft_text.json"),
        ]
    )
    ft.main(common + ["--task", "image", "--pretrain-steps", "5", "--out", str(tmp_path / "ft_image.json")])
    text = json.loads((tmp_path / "ft_text.json").read_text())
    image = json.loads((tmp_path / "ft_image.json").read_text())
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "ft_text.png").is_file() and (tmp_path / "ft_image.png").is_file()
    assert set(text["results"]) == set(ft.TEXT_METHODS) and set(image["results"]) == set(ft.IMAGE_METHODS)
    assert report["text"]["results"]["ntk"]["test_acc_mean"] == text["results"]["ntk"]["test_acc_mean"]
    for saved in (text, image):
        for method, r in saved["results"].items():
            assert 0.0 <= r["test_acc_mean"] <= 1.0 and r["test_acc_std"] >= 0
            assert [run["seed"] for run in r["runs"]] == [0, 1]
            grid = saved["settings"]["head_lr_grid" if method == "head" else "lr_grid"]
            assert r["best_lr"] in (grid if method == "head" else grid[method])
            assert r["head_lr"] == saved["head_lr"] and r["curve"][-1]["step"] == 3
            assert [point["step"] for point in r["runs"][0]["curve"]] == [3]
            assert r["trainable_params"] > r["trainable_params_without_head"] or method == "head"
    for method, r in image["results"].items():  # the ViT's inputs never pad, so every NTK point has the share
        if method in ft.NTK_VARIANTS:
            assert all(
                0 <= point["prefix_share"] <= 1 and 0 <= point["prefix_share_p90_max"] <= 1 for point in r["curve"]
            )
        else:
            assert all("prefix_share" not in point for point in r["curve"])
    assert text["dataset"]["name"] == "stdlib-docstrings" and text["dataset"]["sizes"]["test"] == 2 * 8
    assert image["extra"]["pretraining"]["pretrain_steps"] == 5


def test_timing_only_measures_every_method_round_robin(tmp_path, tiny_bert):
    ft = load("paper_finetune")
    out = tmp_path / "timing.json"
    report = ft.main(["--task", "text", "--timing-only", "--model", tiny_bert, "--per-class", "10", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["timing"] == json.loads(json.dumps(report["text"]["timing"]))
    assert set(saved["timing"]) == set(ft.TEXT_METHODS)
    for t in saved["timing"].values():
        assert len(t["step_s_all"]) == 5 and all(x > 0 for x in t["step_s_all"])
        assert t["step_s"] == sorted(t["step_s_all"])[2]
        assert t["x_ntk"] == pytest.approx(t["step_s"] / saved["timing"]["ntk"]["step_s"])
    assert "results" not in saved  # no accuracy runs
