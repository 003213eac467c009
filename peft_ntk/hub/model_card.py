"""Model cards for NTK-Attention adapters: written by every ``save_pretrained`` and ``push_to_hub``.

PEFT's ``PeftModel.save_pretrained`` calls ``create_or_update_model_card(folder)``, which writes ``README.md`` with
``library_name: peft``, the base model and a few tags. :func:`enable_ntk_model_cards` (run by ``import peft_ntk``)
wraps that method: for a model with NTK-Attention adapters it lets PEFT write its card, then adds

- metadata: the ``peft`` and ``ntk-attention`` tags, the ``pipeline_tag`` of the task type (when the card has none),
  and drops the empty ``base_model: ''`` / ``base_model:adapter:`` entries PEFT writes for a base model with no name;
- a section, between ``<!-- peft-ntk:begin -->`` and ``<!-- peft-ntk:end -->``, with what the adapter is, how to
  install and load it (``import peft_ntk`` first: PEFT cannot know the type otherwise), the trainable parameter
  count, the adapter settings, and the training settings when they are known (:func:`record_training_settings` or
  :class:`NTKModelCardCallback`).

A card the user wrote is updated, never replaced: text outside the markers and metadata the user set (license,
datasets, a ``base_model`` PEFT would blank out, a ``pipeline_tag``) are kept, and saving again rewrites only the
section between the markers. Because PEFT writes the card into the folder it saves to, an atomic save
(:mod:`peft_ntk.saving`) writes it in its staging folder, so the card is part of the same atomic save.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from transformers import TrainerCallback
from transformers.utils import logging

from .._patching import MethodPatch
from ..tuner.config import recommended_learning_rate
from ..tuner.peft_type import NTK_PEFT_TYPE

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = [
    "NTKModelCardCallback",
    "disable_ntk_model_cards",
    "enable_ntk_model_cards",
    "ntk_model_card_section",
    "record_training_settings",
    "update_ntk_model_card",
]

BEGIN = "<!-- peft-ntk:begin (written by peft_ntk on every save; edit outside these markers) -->"
END = "<!-- peft-ntk:end -->"
_SECTION = re.compile(r"<!-- peft-ntk:begin[^\n]*-->.*?<!-- peft-ntk:end -->\n?", re.DOTALL)
TAGS = ("peft", "ntk-attention")
PAPER_URL = "https://arxiv.org/abs/2406.14036"
PACKAGE = "peft-ntk-rankgen"
_SETTINGS_ATTRIBUTE = "_peft_ntk_training_settings"
#: Hub ``pipeline_tag`` for PEFT task types (``None``: no pipeline fits, the card gets none).
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}
# TrainingArguments fields shown on the card, in this order (those left at None are skipped).
_TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "seed",
    "bf16",
    "fp16",
)


# ------------------------------------------------------------------------------------------ training settings


def record_training_settings(model: PeftModel, settings: Any = None, **extra: Any) -> dict:
    """Remember how ``model`` was trained, for the "Training settings" table of the cards it saves from now on.

    Args:
        model: the PEFT model (its cards describe it).
        settings: a ``transformers.TrainingArguments``, or a mapping of setting names to values, or ``None``.
        extra: more settings (``dataset="..."``, ``train_loss=2.1``), added to or overriding ``settings``.

    Returns:
        The settings now recorded (a new dict; the inputs are not changed).

    Example:

    ```python
    >>> import peft_ntk
    >>> peft_ntk.record_training_settings(model, trainer.args, dataset="stdlib docstrings")  # doctest: +SKIP
    {'learning_rate': 0.001, ..., 'dataset': 'stdlib docstrings'}

    ```
    """
    recorded = dict(getattr(model, _SETTINGS_ATTRIBUTE, None) or {})
    if settings is not None:
        if isinstance(settings, Mapping):
            recorded.update(settings)
        elif hasattr(settings, "to_dict") and hasattr(settings, "learning_rate"):  # TrainingArguments
            values = settings.to_dict()
            for name in _TRAINING_FIELDS:
                value = values.get(name)
                if value is None or (name in ("max_steps",) and value <= 0) or (name == "warmup_steps" and not value):
                    continue
                if name in ("bf16", "fp16", "warmup_ratio") and not value:
                    continue
                recorded[name] = value.value if hasattr(value, "value") else value
            world = getattr(settings, "world_size", 1) or 1
            recorded["total_train_batch_size"] = (
                settings.per_device_train_batch_size * settings.gradient_accumulation_steps * world
            )
        else:
            raise TypeError(
                "record_training_settings takes transformers.TrainingArguments or a mapping of setting names to values,"
                f" got {type(settings).__name__}"
            )
    recorded.update(extra)
    object.__setattr__(model, _SETTINGS_ATTRIBUTE, recorded)  # PeftModel.__setattr__ would forward nn.Module rules
    return dict(recorded)


class NTKModelCardCallback(TrainerCallback):
    """A ``Trainer`` callback that records the training settings (and the final step, epoch and loss) on the model,
    so that the cards of the checkpoints and of the final ``save_model`` / ``push_to_hub`` list them.

    Example:

    ```python
    >>> trainer = Trainer(model=peft_model, args=args, train_dataset=data,
    ...                   callbacks=[peft_ntk.NTKModelCardCallback()])  # doctest: +SKIP

    ```
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if isinstance(model, PeftModel):
            record_training_settings(model, args)

    # The Trainer saves checkpoints after `on_step_end` and `on_log` of the same step: their cards are up to date.
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if isinstance(model, PeftModel):
            progress = {"trained_steps": state.global_step}
            if state.epoch is not None:
                progress["trained_epochs"] = round(float(state.epoch), 2)
            record_training_settings(model, progress)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if isinstance(model, PeftModel) and logs and "loss" in logs:
            record_training_settings(model, last_logged_train_loss=round(float(logs["loss"]), 4))

    on_train_end = on_step_end


# ------------------------------------------------------------------------------------------ the card


def _peft_type_name(config) -> str:
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "name", str(peft_type))


_selected_adapters: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "peft_ntk_selected_adapters", default=None
)


@contextlib.contextmanager
def saving_adapters(selected: Optional[list[str]]) -> Iterator[None]:
    """While a ``save_pretrained(..., selected_adapters=...)`` call runs: the adapters it writes (``None``: all).

    Set by the ``save_pretrained`` wrapper of :mod:`peft_ntk.saving`; the card then describes only those adapters.
    """
    token = _selected_adapters.set(tuple(selected) if selected is not None else None)
    try:
        yield
    finally:
        _selected_adapters.reset(token)


def _ntk_adapters(model: PeftModel) -> list[str]:
    selected = _selected_adapters.get()
    return [
        name
        for name, config in model.peft_config.items()
        if config.peft_type == NTK_PEFT_TYPE and (selected is None or name in selected)
    ]


def _partial_save(model: PeftModel) -> bool:
    """A save of some of the model's adapters only (``selected_adapters``), into a folder that has the others."""
    selected = _selected_adapters.get()
    return selected is not None and set(selected) != set(model.peft_config)


def _task_type(config) -> Optional[str]:
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


def _numel(param) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())  # DeepSpeed ZeRO-3 keeps the full size in ds_numel


def _count_adapter_parameters(model: PeftModel, adapter: str) -> int:
    """Parameters of ``adapter``: its ``Z`` and ``k`` everywhere, and the heads it saves whole (``modules_to_save``).

    Read from ``named_parameters`` rather than ``state_dict()``: this runs on the main process only, where a
    sharded model's ``state_dict()`` would wait forever for the other ranks.
    """
    total = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        is_ntk = any(p.startswith("ntk_") for p in parts) and parts[-1] == adapter
        is_saved_whole = "modules_to_save" in parts and parts[parts.index("modules_to_save") + 1 :][:1] == [adapter]
        if is_ntk or is_saved_whole:
            total += _numel(param)
    return total


def _count_base_parameters(model: PeftModel) -> int:
    # Adapter weights live under `ntk_*` attributes; a head saved whole has its trained copy under `modules_to_save`
    # (its `original_module` is the base model's).
    return int(
        sum(_numel(p) for name, p in model.named_parameters() if "ntk_" not in name and "modules_to_save" not in name)
    )


def _base_model_name(model: PeftModel) -> str:
    base = model.get_base_model()
    name = getattr(base, "name_or_path", "") or getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    return str(name)


def _is_hub_id(name: str) -> bool:
    """A name that can stand as ``base_model`` on the Hub (not a local path, not empty)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        return False
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) is not None


def ntk_model_card_section(model: PeftModel, repo_id: Optional[str] = None) -> str:
    """The card section (between the markers) that describes ``model``'s NTK-Attention adapters.

    ``repo_id`` goes into the loading snippet (a placeholder when it is not known, as for a local save).
    """
    adapters = _ntk_adapters(model)
    base_name = _base_model_name(model)
    where = repo_id or "<this repo id or folder>"
    first = model.peft_config[adapters[0]]
    task = _task_type(first)
    auto_class = _AUTO_CLASSES.get(task)
    base_total = _count_base_parameters(model)

    lines = [
        BEGIN,
        "## NTK-Attention adapter",
        "",
        f'An [NTK-Attention]({PAPER_URL}) adapter ("Toward Infinite-Long Prefix in Transformer") made with the '
        f"`{PACKAGE}` package, which adds NTK-Attention to PEFT as a new adapter type. Each adapted attention layer "
        "has, per query head, a trainable `Z` (d×d) and `k` (d) that stand in for an infinitely long prefix.",
        "",
        f"- **Base model:** {'`' + base_name + '`' if base_name else 'not recorded'}",
    ]
    for name in adapters:
        config = model.peft_config[name]
        count = _count_adapter_parameters(model, name)
        share = f" ({100.0 * count / base_total:.2f} % of the base model's {base_total:,})" if base_total else ""
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        lines += [
            f"- **Adapter `{name}`:** {count:,} trainable parameters{share}; task type `{_task_type(config)}`; "
            f"target modules `{targets}`; feature map `{config.feature_map}`; "
            f"init `{getattr(config, 'init_weights', None)}`; prefix mass `{getattr(config, 'prefix_mass', 'paper')}`"
            + (f"; modules saved whole `{sorted(config.modules_to_save)}`" if config.modules_to_save else ""),
        ]
    lines += [
        "",
        "### How to use",
        "",
        "```bash",
        f"pip install {PACKAGE}",
        "```",
        "",
        "```python",
        "import peft_ntk  # registers the NTK_ATTENTION adapter type with PEFT: needed before loading",
    ]
    if auto_class:
        lines += [
            f"from peft import {auto_class}",
            "",
            f"model = {auto_class}.from_pretrained({where!r})",
        ]
    else:
        lines += [
            "from peft import PeftModel",
            "",
            "base = ...  # the base model, loaded with transformers",
            f"model = PeftModel.from_pretrained(base, {where!r})",
        ]
    lines += [
        "```",
        "",
        "Without `import peft_ntk` (from `pip install peft-ntk-rankgen`), PEFT stops with "
        "``KeyError: 'NTK_ATTENTION'``: the import registers the adapter type. The adapter cannot be merged into the base "
        "weights (`merge_and_unload` refuses): the prefix term is a non-linear function of the query.",
    ]
    lines += ["", "### Training notes", ""] + _training_notes([model.peft_config[name] for name in adapters])
    settings = getattr(model, _SETTINGS_ATTRIBUTE, None)
    if settings:
        lines += ["", "### Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in settings.items()]
    lines += [END, ""]
    return "\n".join(lines)


def _training_notes(configs: list) -> list[str]:
    """What the package's measurements say about training adapters configured like ``configs`` (generic advice,
    the same on every card with these settings; the settings actually used are the "Training settings" table)."""
    by_form = {(config.prefix_mass, _feature_map_name(config)): config for config in configs}
    rates = ", ".join(
        f"{recommended_learning_rate(config):g} for prefix mass `{mass}` with the `{name}` feature map"
        for (mass, name), config in sorted(by_form.items(), key=lambda item: item[0])
    )
    notes = [
        f"- **Learning rate** of `Z` and `k` (AdamW, cosine or linear decay, about 10 % warm-up): {rates} "
        "(`peft_ntk.recommended_learning_rate(config)`, measured with the zeros init on causal-LM adaptation). "
        "The `paper` mass's best rate depends on the task far more than the `relative` mass's: 1e-3 on a causal LM, "
        "30-100x higher on the classification tasks measured. With the `relative` mass and FAVOR+ features it was "
        "1e-2 on the causal LM and on a text classifier, 0.3 on a small ViT (where 1e-2 did as well with 3x the steps).",
        "- **A new task head** (`modules_to_save`) wants a rate of its own, 10-100x the adapter's: give it its own "
        "parameter group (the adapter's rate alone leaves the head under-trained).",
        "- **Where it falls short:** on a small ViT adapted to new classes, LoRA on q,v with NTK's parameter count "
        "fitted the training set within the budget and NTK needed 3x the steps; LoRA on the value projection alone, "
        "which like a prefix keeps the base model's query and key projections, scored about as NTK did at 3x the "
        "steps, and 5 points below LoRA on q,v. The prefix adds a function of each token's own query to its head's "
        "output; it changes neither what the real tokens pass to each other nor how they attend to each other. "
        "Prefer LoRA on q,v where the task needs attention re-routed.",
    ]
    if any(getattr(config, "feature_map", "elu") != "favor" for config in configs):
        notes.append(
            '- **Feature map:** `feature_map="favor"` scored above the default elu map on every task measured: with '
            "the `relative` mass on SmolLM2-135M domain adaptation 17.64 against 19.11 held-out perplexity (LoRA r=8 "
            "on q,v: 17.46), and 4-5 points on two classification tasks (a text encoder and a small ViT). Normalised "
            "elu features barely differ between queries, so an elu prefix adds nearly the same vector to every row of "
            "a head."
        )
    inits = {str(getattr(config, "init_weights", "zeros")) for config in configs}
    if inits <= {"zeros", "True"}:
        notes.append(
            "- **Start:** `Z = 0`, `k = 0`, so before training the model's outputs are exactly the base model's."
        )
    notes.append(
        "- Measured results and the commands that produced them: `docs/results.md` of the `peft-ntk-rankgen` package."
    )
    return notes


def _feature_map_name(config) -> str:
    return config.feature_map if isinstance(config.feature_map, str) else type(config.feature_map).__name__


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def update_ntk_model_card(
    model: PeftModel, folder: str, *, repo_id: Optional[str] = None, previous: Optional[ModelCardData] = None
) -> None:
    """Add the NTK-Attention metadata and section to ``folder/README.md`` (created if missing).

    ``previous`` is the card's metadata before PEFT rewrote it: what the user set there that PEFT replaced (the
    tags) or blanked out (``base_model``) is put back.
    """
    adapters = _ntk_adapters(model)
    if not adapters:
        return  # nothing of NTK-Attention in this save
    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard.from_template(ModelCardData())
    data = card.data
    base_name = _base_model_name(model)

    if not data.get("base_model"):
        kept = previous.get("base_model") if previous is not None else None
        if kept:
            data["base_model"] = kept
        elif _is_hub_id(base_name):
            data["base_model"] = base_name
        else:
            data.pop("base_model", None)  # PEFT writes '' for an unnamed base: not a valid Hub reference
    # PEFT replaces the tags with its own: the user's come back first.
    tags = list(previous.get("tags") or []) if previous is not None else []
    tags += list(data.get("tags") or [])
    tags = [t for t in tags if t != "base_model:adapter:" and t != f"base_model:adapter:{base_name}"]
    if _is_hub_id(base_name):
        tags.append(f"base_model:adapter:{base_name}")
    for tag in TAGS:
        if tag not in tags:
            tags.append(tag)
    data["tags"] = sorted(set(tags), key=tags.index)
    data["library_name"] = data.get("library_name") or "peft"
    task = _task_type(model.peft_config[adapters[0]])
    if not data.get("pipeline_tag") and PIPELINE_TAGS.get(task):
        data["pipeline_tag"] = PIPELINE_TAGS[task]

    section = ntk_model_card_section(model, repo_id=repo_id or _current_repo_id())
    text = card.text
    if _SECTION.search(text) and _partial_save(model):
        pass  # the folder's other adapters stay as they were on disk, and so does their description
    elif _SECTION.search(text):
        text = _SECTION.sub(lambda _: section, text, count=1)
    else:
        # New section right after the title line when there is one, so it is what a reader sees first.
        match = re.search(r"^# .*\n", text, flags=re.MULTILINE)
        at = match.end() if match else 0
        text = text[:at] + "\n" + section + "\n" + text[at:]
    card.text = text
    card.save(path)


# ------------------------------------------------------------------------------------------ the PEFT hook

_repo_id_for_cards: list[str] = []  # set while a push writes its card (see peft_ntk.hub)


def _current_repo_id() -> Optional[str]:
    return _repo_id_for_cards[-1] if _repo_id_for_cards else None


def _make_ntk_model_card(original):
    def create_or_update_model_card(self, output_dir: str):
        if not _ntk_adapters(self):
            return original(self, output_dir)
        path = os.path.join(output_dir, "README.md")
        previous = None
        if os.path.isfile(path):
            try:
                previous = ModelCard.load(path).data
            except Exception as err:  # a card PEFT itself cannot parse fails in PEFT's call below, with its error
                logger.debug(f"Could not read the existing model card {path}: {err}")
        result = original(self, output_dir)
        update_ntk_model_card(self, output_dir, previous=previous)
        return result

    return create_or_update_model_card


_CARD_PATCH = MethodPatch(PeftModel, "create_or_update_model_card", _make_ntk_model_card)


def enable_ntk_model_cards() -> None:
    """Make ``PeftModel.create_or_update_model_card`` add the NTK-Attention card content (idempotent).

    Models without NTK-Attention adapters get PEFT's card unchanged. Undo with :func:`disable_ntk_model_cards`.
    """
    _CARD_PATCH.apply()


def disable_ntk_model_cards() -> None:
    """Put PEFT's own ``create_or_update_model_card`` back (a no-op when the NTK card hook is not installed)."""
    _CARD_PATCH.revert()
