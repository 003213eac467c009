"""The RankGen scorer: a T5 v1.1 encoder plus a linear projection that embeds prefixes and continuations.

RankGen (Krishna et al., "RankGen: Improving Text Generation with Large Ranking Models", EMNLP 2022) scores a
continuation of a prefix by the dot product of two vectors: the prefix, formatted as ``"pre " + prefix``, and the
continuation, formatted as ``"suffi " + continuation``, each run through the same T5 encoder, pooled at the first
position and multiplied by a bias-free ``d x d`` projection. No normalisation is applied.

:class:`RankGenScorer` loads the official Hub checkpoints (``kalpeshk2011/rankgen-t5-{base,large,xl}-all``,
``kalpeshk2011/rankgen-t5-xl-pg19``) without their remote code, and its own ``save_pretrained`` output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedConfig, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5PreTrainedModel
from transformers.utils import logging

from .hub import not_cached_hint, push_scorer_to_hub, write_scorer_model_card

try:  # transformers >= 5: initialisers that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

__all__ = ["RankGenConfig", "RankGenScorer", "OFFICIAL_ARCHITECTURE", "T5_V1_1_TOKENIZERS"]

#: ``architectures`` entry of the official checkpoints' ``config.json`` (their remote-code class).
OFFICIAL_ARCHITECTURE = "T5EncoderWithProjection"

#: Tokenizer repository matching an official checkpoint, by ``d_model`` (RankGen checkpoints ship none).
T5_V1_1_TOKENIZERS = {
    768: "google/t5-v1_1-base",
    1024: "google/t5-v1_1-large",
    2048: "google/t5-v1_1-xl",
}

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# Official weights: a single file, else shards listed in an index.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder", "proxies")
# Official config keys that describe the remote-code model rather than the network.
_OFFICIAL_KEYS_TO_DROP = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path")


class RankGenConfig(T5Config):
    r"""Configuration of a :class:`RankGenScorer`: a :class:`~transformers.T5Config` (the encoder) plus RankGen's settings.

    Args:
        max_prefix_tokens (`int`, defaults to 512): the prefix encoder reads the first this many tokens of
            ``prefix_prompt + prefix`` (prompt and special tokens included).
        max_suffix_tokens (`int`, defaults to 128): the same for ``suffix_prompt + continuation``.
        prefix_prompt (`str`, defaults to ``"pre "``): text put in front of every prefix.
        suffix_prompt (`str`, defaults to ``"suffi "``): text put in front of every continuation.
        projection_dim (`int`, *optional*): output size of the projection; defaults to ``d_model``.

    Example:

    ```python
    >>> from rankgen_logits import RankGenConfig
    >>> config = RankGenConfig(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="gated-gelu")
    >>> config.projection_dim, config.max_suffix_tokens
    (32, 128)

    ```
    """

    model_type = "rankgen"

    max_prefix_tokens: int = 512
    max_suffix_tokens: int = 128
    prefix_prompt: str = "pre "
    suffix_prompt: str = "suffi "
    projection_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.projection_dim is None:
            self.projection_dim = self.d_model
        super().__post_init__(**kwargs)


def _own_config_fields() -> set[str]:
    """Config fields of T5 and RankGen (not the generic ``PreTrainedConfig`` ones such as ``dtype``)."""
    return {f.name for f in dataclasses.fields(RankGenConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _as_text_list(texts: str | Iterable[str], name: str) -> list[str]:
    if isinstance(texts, str):
        _check_encodable(texts, name)
        return [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"`{name}` must be a string or a list of strings, got an item of type {type(text).__name__}"
            )
        _check_encodable(text, f"{name}[{i}]")
    return texts


def _check_encodable(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates), which tokenizers cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        raise ValueError(
            f"{where} contains {bad!r} at position {err.start}: a lone surrogate, not valid Unicode, so it cannot be "
            "tokenised. Such text comes from decoding bytes with errors='surrogateescape' (e.g. os.fsdecode); decode "
            "with errors='replace' instead, or clean it first: text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None


class _Source:
    """Where a checkpoint lives (a local folder or a Hub repository) and how to fetch a file from it."""

    def __init__(self, path_or_repo: str | os.PathLike, hub_kwargs: dict[str, Any]):
        self.name = os.fspath(path_or_repo)
        self.subfolder = hub_kwargs.get("subfolder") or ""
        self.local = os.path.isdir(self.name)
        if not self.local:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.name)
            except HFValidationError as err:
                raise OSError(f"{self.name!r} is neither a local folder nor a Hub repository id") from err
        self.hub_kwargs = {k: v for k, v in hub_kwargs.items() if k != "subfolder" and v is not None}
        if _offline():
            self.hub_kwargs["local_files_only"] = True

    def get(self, filename: str) -> str | None:
        """The local path of ``filename``, or ``None`` where the checkpoint has no such file."""
        if self.local:
            path = os.path.join(self.name, self.subfolder, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return hf_hub_download(self.name, filename, subfolder=self.subfolder or None, **self.hub_kwargs)
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            # Offline (or local_files_only) and not cached: for optional files that is "absent"; callers that need
            # the file raise their own error.
            return None

    def has_tokenizer(self) -> bool:
        return any(self.get(name) is not None for name in _TOKENIZER_FILES)

    def weight_files(self) -> list[str]:
        """Local paths of the checkpoint's weights (safetensors preferred), or ``[]``."""
        for name in _WEIGHT_FILES:
            path = self.get(name)
            if path is not None:
                return [path]
        for name in _WEIGHT_INDEXES:
            index = self.get(name)
            if index is None:
                continue
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            paths = [self.get(shard) for shard in shards]
            missing = [shard for shard, path in zip(shards, paths) if path is None]
            if missing:
                raise OSError(f"{self.name!r}: {name} lists shards that cannot be found: {missing}")
            return paths
        return []


def _load_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without running pickled code (``weights_only=True`` for ``.bin`` files)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    extra = {"mmap": True} if zipfile.is_zipfile(path) else {}
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, **extra)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds pickled objects other than tensors; RankGenScorer only reads weights "
            f"(torch.load(weights_only=True)) and refuses to run pickled code. Cause: {err}"
        ) from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state_dict


class RankGenScorer(T5PreTrainedModel):
    r"""RankGen: scores continuations of prefixes by the dot product of their embeddings (higher is better).

    The model is a T5 encoder (``self.t5_encoder``, a :class:`~transformers.T5EncoderModel`) and a bias-free linear
    projection (``self.projection``); the state-dict layout (``t5_encoder.*``, ``projection.weight``) is that of the
    official checkpoints, which :meth:`from_pretrained` loads without ``trust_remote_code``. An embedding is the
    projected final hidden state at position 0 of ``prompt + text``, right padded and cut to the first
    ``max_prefix_tokens`` / ``max_suffix_tokens`` tokens (as the official RankGen code does: the first tokens of the
    tokenised text, special tokens included).

    It satisfies :class:`rankgen_logits.protocol.ContinuationScorer`: ``score(prefixes, continuations)`` returns the
    row-wise dot products, and ``encode_prefix`` / ``encode_suffix`` / ``max_suffix_tokens`` let generation encode
    each prompt once.

    The tokenizer lives in ``scorer.tokenizer``: :meth:`from_pretrained` sets it (``tokenizer=``, a tokenizer saved
    with the model, or ``google/t5-v1_1-{base,large,xl}`` for the official checkpoints), or assign one yourself.

    Example:

    ```python
    >>> import torch
    >>> from rankgen_logits import RankGenScorer
    >>> scorer = RankGenScorer.from_pretrained("kalpeshk2011/rankgen-t5-base-all")  # doctest: +SKIP
    >>> scorer = scorer.to("cuda", torch.bfloat16)  # optional  # doctest: +SKIP
    >>> prefix = "The wizard raised his staff and the cave filled with light."
    >>> scorer.score([prefix, prefix], ["The goblins fled, shielding their eyes.", "Stock prices fell sharply on Monday."])  # doctest: +SKIP
    tensor([...])
    >>> scorer.encode_prefix(prefix).shape  # doctest: +SKIP
    torch.Size([1, 768])

    ```
    """

    config_class = RankGenConfig
    config: RankGenConfig
    base_model_prefix = "t5_encoder"

    def __init__(self, config: RankGenConfig, tokenizer: Any | None = None):
        super().__init__(config)
        self.t5_encoder = T5EncoderModel(config)
        self.projection = nn.Linear(config.d_model, config.projection_dim, bias=False)
        self.post_init()
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ weights and forward

    def _init_weights(self, module):
        super()._init_weights(module)
        # Match the projection module itself: by the time the parent is visited, the generic Linear init has
        # already marked the projection's weight as initialised (std 1 instead of d_model**-0.5).
        if module is getattr(self, "projection", None):
            _init.normal_(module.weight, mean=0.0, std=self.config.initializer_factor * self.config.d_model**-0.5)

    def get_input_embeddings(self) -> nn.Module:
        return self.t5_encoder.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Module) -> None:
        self.t5_encoder.set_input_embeddings(new_embeddings)

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Embeddings ``(batch, projection_dim)`` of already tokenised (right-padded) inputs."""
        hidden = self.t5_encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = hidden[:, 0]
        weight = self.projection.weight
        return self.projection(pooled.to(device=weight.device, dtype=weight.dtype))

    # ------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> Any | None:
        """The tokenizer used by ``encode_prefix`` / ``encode_suffix`` / ``score`` (``None`` until set)."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any | None) -> None:
        self.__dict__["_tokenizer"] = tokenizer

    def _require_tokenizer(self):
        tokenizer = self.tokenizer
        if tokenizer is None:
            hint = T5_V1_1_TOKENIZERS.get(self.config.d_model, "google/t5-v1_1-base")
            raise ValueError(
                "RankGenScorer has no tokenizer. Pass one when loading, e.g. "
                f"`RankGenScorer.from_pretrained(path, tokenizer={hint!r})` (an object, a local path or a Hub id), "
                f"or set it afterwards: `scorer.tokenizer = AutoTokenizer.from_pretrained({hint!r})`."
            )
        return tokenizer

    # ------------------------------------------------------------------ encoding and scoring

    @property
    def max_suffix_tokens(self) -> int:
        """How many tokens of ``suffix_prompt + continuation`` the scorer reads (``config.max_suffix_tokens``)."""
        return self.config.max_suffix_tokens

    @property
    def max_continuation_tokens(self) -> int:
        """The longest continuation, in tokenizer tokens, that the suffix encoder reads whole.

        ``max_suffix_tokens`` counts ``suffix_prompt`` and special tokens too; this subtracts them as tokenised on
        their own (for T5: the tokens of ``"suffi "`` and ``</s>``). Equals ``max_suffix_tokens`` while no tokenizer
        is set.
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            return self.config.max_suffix_tokens
        overhead = len(tokenizer(self.config.suffix_prompt)["input_ids"])
        return max(1, self.config.max_suffix_tokens - overhead)

    @property
    def max_prefix_tokens(self) -> int:
        """How many tokens of ``prefix_prompt + prefix`` the scorer reads (``config.max_prefix_tokens``)."""
        return self.config.max_prefix_tokens

    def _tokenize(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        tokenizer = self._require_tokenizer()
        # Tokenise whole and keep the first `max_tokens` ids, as the official RankGen code does (its truncation
        # keeps no end-of-sequence token), independent of the tokenizer's truncation side.
        encoded = tokenizer(texts, add_special_tokens=True, padding=False, truncation=False, verbose=False)
        ids = [list(row[:max_tokens]) for row in encoded["input_ids"]]
        for text, row in zip(texts, ids):
            if not row:
                raise ValueError(f"The tokenizer produced no tokens for {text!r}")
        return ids

    def _encode(self, texts: list[str], prompt: str, max_tokens: int, batch_size: int) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        weight = self.projection.weight
        if not texts:
            return torch.empty(0, self.config.projection_dim, dtype=weight.dtype, device=weight.device)
        ids = self._tokenize([prompt + text for text in texts], max_tokens)
        pad_id = getattr(self._require_tokenizer(), "pad_token_id", None)
        pad_id = self.config.pad_token_id if pad_id is None else pad_id
        pad_id = 0 if pad_id is None else pad_id
        input_device = self.get_input_embeddings().weight.device
        # Longest first, so batches hold similar lengths and little padding; restored to input order at the end.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.config.projection_dim, dtype=weight.dtype, device=weight.device)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = len(ids[rows[0]])
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):  # right padding: position 0 is always the first real token
                    input_ids[j, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    attention_mask[j, : len(ids[i])] = 1
                embeddings = self(input_ids.to(input_device), attention_mask.to(input_device))
                out[torch.tensor(rows, device=out.device)] = embeddings.to(out.device)
        return out

    def encode_prefix(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embed prefixes: ``(len(texts), projection_dim)`` in the model's dtype, on the projection's device.

        Each text is encoded as ``config.prefix_prompt + text``, cut to the first ``config.max_prefix_tokens`` tokens.
        A single string counts as a list of one.
        """
        texts = _as_text_list(texts, "texts")
        return self._encode(texts, self.config.prefix_prompt, self.config.max_prefix_tokens, batch_size)

    def encode_suffix(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embed continuations: ``(len(texts), projection_dim)`` in the model's dtype, on the projection's device.

        Each text is encoded as ``config.suffix_prompt + text``, cut to the first ``config.max_suffix_tokens`` tokens.
        A single string counts as a list of one.
        """
        texts = _as_text_list(texts, "texts")
        return self._encode(texts, self.config.suffix_prompt, self.config.max_suffix_tokens, batch_size)

    def score(
        self, prefixes: str | Sequence[str], continuations: str | Sequence[str], batch_size: int = 32
    ) -> torch.Tensor:
        """RankGen scores ``(len(prefixes),)``: ``encode_prefix(prefixes[i]) . encode_suffix(continuations[i])``.

        Both arguments must have the same length (a string counts as a list of one). Repeated prefixes are encoded
        once. The dot products are taken in float32, on the projection's device.
        """
        prefixes = _as_text_list(prefixes, "prefixes")
        continuations = _as_text_list(continuations, "continuations")
        if len(prefixes) != len(continuations):
            raise ValueError(
                f"score() needs as many prefixes as continuations, got {len(prefixes)} prefixes and "
                f"{len(continuations)} continuations"
            )
        unique: dict[str, int] = {}
        index = [unique.setdefault(text, len(unique)) for text in prefixes]
        prefix_vectors = self.encode_prefix(list(unique), batch_size=batch_size)
        suffix_vectors = self.encode_suffix(continuations, batch_size=batch_size)
        prefix_vectors = prefix_vectors[torch.tensor(index, dtype=torch.long, device=prefix_vectors.device)]
        return (prefix_vectors.float() * suffix_vectors.float().to(prefix_vectors.device)).sum(-1)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save weights (safetensors) and config (``model_type: rankgen``), plus the tokenizer if one is set.

        With ``push_to_hub=True`` the folder is saved, then model and tokenizer are uploaded together through
        :meth:`push_to_hub` (``repo_id``, ``token``, ``private``, ``commit_message``, ``create_pr`` are passed on).
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "commit_message", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        write_scorer_model_card(self, save_directory)  # README.md: created, or updated keeping the user's text
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            if kwargs.get("token") is not None:
                hub_kwargs["token"] = kwargs["token"]
            self.push_to_hub(repo_id, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        """Upload weights, config, tokenizer and an updated model card in one commit (``rankgen_logits.hub``).

        Takes transformers' ``push_to_hub`` arguments (``private``, ``token``, ``revision``, ``create_pr``,
        ``commit_message``, ``commit_description``, ``tags``, ``max_shard_size``); returns the ``CommitInfo``.
        A model card already on the Hub is updated, not replaced.
        """
        return push_scorer_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        tokenizer: Any | str | os.PathLike | None = None,
        **kwargs,
    ) -> RankGenScorer:
        """Load a RankGen scorer from a local folder or a Hub repository, with its tokenizer.

        Two layouts are understood:

        * the official checkpoints (``config.json`` with ``model_type: "t5"`` and ``architectures:
          ["T5EncoderWithProjection"]``, weights in ``pytorch_model.bin`` with ``t5_encoder.*`` and
          ``projection.weight`` keys). Their remote code (``auto_map``) is never used: the weights are read with
          ``torch.load(..., weights_only=True)`` (or from ``model.safetensors`` where present) and the missing
          ``t5_encoder.encoder.embed_tokens.weight`` is tied to ``t5_encoder.shared.weight``;
        * what :meth:`save_pretrained` writes (``model_type: "rankgen"``, safetensors).

        Args:
            pretrained_model_name_or_path: a folder or a Hub repository id.
            tokenizer: a tokenizer object, or a path / Hub id for :class:`~transformers.AutoTokenizer`. Without it,
                a tokenizer saved with the checkpoint is used; failing that, for the official checkpoints,
                ``google/t5-v1_1-{base,large,xl}`` chosen from ``d_model`` (an error names it if it cannot be had,
                e.g. offline and not cached).
            kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``, ``subfolder``
                for the Hub; ``dtype`` / ``torch_dtype``, ``device_map``, ``attn_implementation`` and the other options of
                :meth:`~transformers.PreTrainedModel.from_pretrained`; config overrides such as
                ``max_suffix_tokens=256``.
        """
        if kwargs.pop("trust_remote_code", None):
            logger.info("RankGenScorer never runs remote code; ignoring trust_remote_code=True")
        source = _Source(pretrained_model_name_or_path, {k: kwargs.get(k) for k in _HUB_KWARGS})

        config = kwargs.get("config")
        config_file = None if isinstance(config, RankGenConfig) else source.get("config.json")
        if config_file is None and not isinstance(config, RankGenConfig):
            raise OSError(
                f"Cannot find config.json in {source.name!r}"
                + (f" (subfolder {source.subfolder!r})" if source.subfolder else "")
                + ": expected a RankGen checkpoint folder or Hub repository"
                + (not_cached_hint(source.name) if source.hub_kwargs.get("local_files_only") else "")
            )
        if config_file is not None:
            with open(config_file, encoding="utf-8") as f:
                config_dict = json.load(f)
        else:
            config_dict = {"model_type": RankGenConfig.model_type}

        if config_dict.get("model_type") == RankGenConfig.model_type:
            if _offline():
                kwargs["local_files_only"] = True
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            official = False
        else:
            model = cls._from_official(source, config_dict, model_args, kwargs)
            official = True

        model.tokenizer = cls._resolve_tokenizer(tokenizer, source, model.config, official)
        # where it came from, for RankGenSettings.to_dict (the official layout's config does not say)
        model.name_or_path = model.config._name_or_path = os.fspath(pretrained_model_name_or_path)
        return model

    @classmethod
    def _from_official(cls, source: _Source, config_dict: dict, model_args: tuple, kwargs: dict) -> RankGenScorer:
        architectures = config_dict.get("architectures") or []
        weight_files = source.weight_files()
        if not weight_files:
            raise OSError(
                f"{source.name!r} has neither model.safetensors nor pytorch_model.bin (nor a sharded index of either); "
                "a RankGen checkpoint in the "
                "official layout (architectures ['T5EncoderWithProjection']) is expected"
                + (not_cached_hint(source.name) if source.hub_kwargs.get("local_files_only") else "")
            )
        state_dict = {}
        for path in weight_files:
            state_dict.update(_load_official_state_dict(path))
        has_layout = "projection.weight" in state_dict and any(k.startswith("t5_encoder.") for k in state_dict)
        if not has_layout:
            what = (
                f"architectures {architectures}" if architectures else f"model_type {config_dict.get('model_type')!r}"
            )
            raise ValueError(
                f"{source.name!r} ({what}) is not a RankGen checkpoint: its weights have no "
                "'projection.weight' and 't5_encoder.*' keys"
            )
        if architectures and architectures != [OFFICIAL_ARCHITECTURE]:
            logger.warning(
                f"{source.name!r} declares architectures {architectures}; loading it as RankGen since its weights "
                "have the RankGen layout"
            )
        shared, embed = "t5_encoder.shared.weight", "t5_encoder.encoder.embed_tokens.weight"
        if shared in state_dict and embed not in state_dict:
            state_dict[embed] = state_dict[shared]
        elif embed in state_dict and shared not in state_dict:
            state_dict[shared] = state_dict[embed]

        fields = {k: v for k, v in config_dict.items() if k not in _OFFICIAL_KEYS_TO_DROP}
        own = _own_config_fields()
        fields.update({k: kwargs.pop(k) for k in list(kwargs) if k in own})
        projection = state_dict["projection.weight"]
        fields.setdefault("projection_dim", projection.shape[0])
        config = RankGenConfig(**fields)
        config.architectures = [cls.__name__]

        for key in (*_HUB_KWARGS, "config", "use_safetensors", "weights_only"):
            kwargs.pop(key, None)
        model = super().from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)
        model.config.name_or_path = source.name
        return model

    @staticmethod
    def _resolve_tokenizer(tokenizer: Any, source: _Source, config: RankGenConfig, official: bool):
        hub = {k: v for k, v in source.hub_kwargs.items() if k in ("token", "cache_dir", "local_files_only")}
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                return AutoTokenizer.from_pretrained(os.fspath(tokenizer), **hub)
            return tokenizer
        if source.has_tokenizer():
            if source.local:
                return AutoTokenizer.from_pretrained(os.path.join(source.name, source.subfolder))
            return AutoTokenizer.from_pretrained(
                source.name, subfolder=source.subfolder or "", **{**hub, "revision": source.hub_kwargs.get("revision")}
            )
        if not official:
            logger.warning(
                f"No tokenizer saved with {source.name!r}; set `scorer.tokenizer` (or pass `tokenizer=`) before "
                "encoding or scoring"
            )
            return None
        repo = T5_V1_1_TOKENIZERS.get(config.d_model)
        if repo is None:
            sizes = ", ".join(f"{name} (d_model {d})" for d, name in sorted(T5_V1_1_TOKENIZERS.items()))
            raise ValueError(
                f"{source.name!r} ships no tokenizer and its d_model ({config.d_model}) matches none of the T5 v1.1 "
                f"tokenizers RankGen uses: {sizes}. Pass the tokenizer it was trained with as `tokenizer=`."
            )
        try:
            return AutoTokenizer.from_pretrained(repo, **hub)
        except Exception as err:  # offline and not cached, no network, missing converter dependency, ...
            offline = " (offline mode: HF_HUB_OFFLINE is set)" if _offline() else ""
            raise OSError(
                f"RankGen checkpoints ship no tokenizer; the one matching {source.name!r} is {repo!r}, which could not "
                f"be loaded{offline}. Pass it explicitly: `RankGenScorer.from_pretrained({source.name!r}, "
                f"tokenizer={repo!r})` once it is cached (or a local copy, or a tokenizer object). Cause: "
                f"{type(err).__name__}: {err}"
            ) from err


def _register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know ``model_type: rankgen`` (idempotent)."""
    for register in (
        lambda: AutoConfig.register(RankGenConfig.model_type, RankGenConfig, exist_ok=True),
        lambda: AutoModel.register(RankGenConfig, RankGenScorer, exist_ok=True),
    ):
        try:
            register()
        except (ValueError, TypeError) as err:  # already registered by another copy of this module
            logger.debug(f"RankGen auto-class registration skipped: {err}")


_register()
