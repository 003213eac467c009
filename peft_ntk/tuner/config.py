"""Configuration of an NTK-Attention adapter."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..ops.feature_maps import FEATURE_MAPS, RANDOM_FEATURE_MAPS, is_known_feature_map
from ..ops.reference import PREFIX_MASSES
from .peft_type import NTK_PEFT_TYPE

# AdamW learning rates for Z and k by `prefix_mass` (zeros init, elu features), with a cosine or linear decay and ~10 %
# warm-up (docs/results.md). "relative": the best on SmolLM2-135M and MiniLM-L6, 3x below the best on the small ViT.
# "paper": the best on SmolLM2-135M; on the classification tasks its best rates were 30x and 100x higher.
RECOMMENDED_LEARNING_RATES = {"paper": 1e-3, "relative": 3e-3}
RECOMMENDED_LEARNING_RATE = RECOMMENDED_LEARNING_RATES["paper"]  # the default config's
# The same by (prefix_mass, feature_map) where the feature map changes the best rate: FAVOR+ features vary more with
# the query than elu's, and take a higher rate. ("relative", "favor"): the best of 3e-3 / 1e-2 / 3e-2 on SmolLM2-135M
# (3e-2 diverged); ("paper", "favor"): the best of 1e-3 / 1e-2 in 20-step runs there.
_RATES_BY_FEATURE_MAP = {("relative", "favor"): 1e-2, ("paper", "favor"): 1e-2}

INIT_CHOICES = ("small_random", "zeros", "random")
QUERY_FEATURES = ("post_rope", "pre_rope")
# PEFT's adapter weight files (peft.utils.constants SAFETENSORS_WEIGHTS_NAME / WEIGHTS_NAME).
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
ATTENTION_BACKENDS = ("auto", "fused", "reference")


@dataclass
class NTKAttentionConfig(PeftConfig):
    """Configuration of an NTK-Attention adapter ("Toward Infinite-Long Prefix in Transformer").

    Each adapted attention module gets, per query head, a trainable ``Z`` (r×d) and ``k`` (r) that stand in for an
    infinitely long prefix; r is the feature map's dimension (r = d for the default 'elu', ``feature_dim`` for
    'favor'). The adapter is added through transformers' attention interface, so every model whose attention goes
    through ``ALL_ATTENTION_FUNCTIONS`` is supported.

    Example::

        >>> import peft_ntk  # registers the NTK_ATTENTION type with PEFT
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> model = get_peft_model(base, peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM"))
        >>> model.print_trainable_parameters()  # 2 layers × 4 heads × (8² + 8)
        trainable params: 576 || all params: ... || trainable%: ...
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Attention modules to adapt: a list of names (exact, or a suffix after a '.') or a regex. Each must be "
                "a module that calls transformers' attention interface, e.g. 'self_attn' (Llama), 'attn' (GPT-2), "
                "'attention.self' (BERT), 'SelfAttention' (T5). Default: every self-attention module found; "
                "cross-attention is left alone unless named here."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or a regex of modules not to adapt, matched like target_modules."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Adapt only the layers with these indices (as in LoRA). Default: all layers."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the layer list that layers_to_transform indexes, e.g. 'layers' or 'h'; only needed "
            "when it cannot be guessed."
        },
    )
    feature_map: str = field(
        default="elu",
        metadata={
            "help": "Feature map phi applied to the post-RoPE query: 'elu' (the paper's elu(x/d^(1/4)) + 1), 'relu', "
            "'favor' (Performer's positive random features, an unbiased estimate of exp(q·k/√d), with feature_dim "
            "random features), or a name registered with peft_ntk.register_feature_map."
        },
    )
    feature_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "Feature dimension r of phi (Z is r x head_dim, k has r entries per head). Default: the map's own "
            "(r = head_dim for 'elu'/'relu', whose r is fixed; r = head_dim for 'favor'). For 'favor' larger r "
            "approximates exp(q·k/√d) better (error ~ 1/√r) at r·(head_dim+1) parameters per head."
        },
    )
    orthogonal_features: bool = field(
        default=True,
        metadata={"help": "'favor' only: draw the random projection in orthogonal blocks (FAVOR+), else i.i.d."},
    )
    feature_seed: int = field(
        default=0,
        metadata={
            "help": "'favor' only: seed of the random projection drawn when the adapter is created. The projection is "
            "saved with the adapter (ntk_projection) and the saved tensor, not the seed, is used on loading."
        },
    )
    init_weights: Union[bool, str] = field(
        default="zeros",
        metadata={
            "help": "Initial Z and k. 'zeros' or True (Z = 0, k = 0: exactly the base model, and it trains: |k| has "
            "a unit subgradient at 0), 'small_random' (the paper's N(0,1)·init_scale; on SmolLM2-135M it starts "
            "0.025 nats above the base and ends higher after the same training), False or 'random' (N(0, 1/d), "
            "an adapter with a visible effect, for tests)."
        },
    )
    init_scale: float = field(
        default=1e-4,
        metadata={"help": "Standard deviation of the 'small_random' initialisation (the paper divides randn by 1e4)."},
    )
    query_features: str = field(
        default="post_rope",
        metadata={
            "help": "What phi is applied to: 'post_rope', the query after its rotary embedding (the paper's), or "
            "'pre_rope', the query before it, so that the prefix term depends on no absolute position (a left-padded "
            "batch then gives the same logits without position ids). Models without rotary embeddings: the same."
        },
    )
    prefix_mass: str = field(
        default="paper",
        metadata={
            "help": "How the prefix's mass enters each row. 'paper': phi(q)ᵀk adds to the real keys' Σ e^s, as an "
            "infinitely long prefix would; a row whose keys have little mass (e.g. the first positions of a causal "
            "model) is then taken over by the prefix. 'relative': the real keys count as mass 1 and phi is normalised "
            "to sum 1, so the prefix's share φ̂ᵀk / (1 + φ̂ᵀk) is the same function of q in every row, and Adam moves "
            "it by about lr per step from the zeros init. Adapters saved without this field load as 'paper'."
        },
    )
    feature_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability on phi(query) during training; off in eval mode."},
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "How the adapted attention is computed. 'auto': the fused kernel path where it is exact and "
            "available (CPU today: (O, LSE) from torch's flash kernel, exact gradients, no Lq×Lk score tensor), else "
            "the reference, with a one-time warning saying why; 'fused': always the fused path, an error where it "
            "cannot serve; 'reference': the plain-torch reference op (materialises the scores)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules besides the NTK parameters to train and save, e.g. ['classifier'] or ['score'] for a "
            "freshly initialised classification head."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        self.peft_type = NTK_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not is_known_feature_map(self.feature_map):
            raise ValueError(
                f"feature_map={self.feature_map!r} is not registered; choose one of {sorted(FEATURE_MAPS)} or register "
                f"yours first with peft_ntk.register_feature_map(name, fn); random-feature maps: {RANDOM_FEATURE_MAPS}."
            )
        if self.feature_dim is not None:
            if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool) or self.feature_dim < 1:
                raise ValueError(f"feature_dim must be a positive integer or None, got {self.feature_dim!r}.")
            if self.feature_map not in RANDOM_FEATURE_MAPS:
                raise ValueError(
                    f"feature_dim={self.feature_dim} needs a map with a free feature dimension such as 'favor'; "
                    f"{self.feature_map!r} fixes r itself (r = head_dim for 'elu'). Leave feature_dim=None or set "
                    "feature_map='favor'."
                )
        if not isinstance(self.feature_seed, int) or isinstance(self.feature_seed, bool):
            raise ValueError(f"feature_seed must be an integer, got {self.feature_seed!r}.")
        if not (isinstance(self.init_weights, bool) or self.init_weights in INIT_CHOICES):
            raise ValueError(
                f"init_weights={self.init_weights!r} is not supported; use one of {INIT_CHOICES}, True (= 'zeros') or "
                "False (= 'random')."
            )
        if self.prefix_mass not in PREFIX_MASSES:
            raise ValueError(f"prefix_mass={self.prefix_mass!r} is not supported; use one of {PREFIX_MASSES}.")
        if self.query_features not in QUERY_FEATURES:
            raise ValueError(f"query_features={self.query_features!r} is not supported; use one of {QUERY_FEATURES}.")
        if not _is_number(self.feature_dropout) or not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(
                f"feature_dropout is a dropout probability and must be a number in [0, 1), got {self.feature_dropout!r}."
            )
        if not isinstance(self.attention_backend, str) or self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is not supported; use one of {ATTENTION_BACKENDS}."
            )
        if not _is_number(self.init_scale) or not 0.0 <= self.init_scale < math.inf:
            raise ValueError(
                f"init_scale is the standard deviation of the 'small_random' initialisation and must be a finite "
                f"number >= 0 (default 1e-4), got {self.init_scale!r}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config (``adapter_config.json``), as PEFT's ``PeftConfig.from_pretrained`` does.

        When PEFT calls this to load an adapter (``PeftModel.from_pretrained`` / ``load_adapter``) from a local
        folder, the weights file next to the config is checked first, because PEFT reports a missing local file as
        an invalid Hub repository id and a truncated one as a bare safetensors header error. Reading only the
        config (e.g. after ``config.save_pretrained``) checks nothing.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(folder) and _called_by_peft_adapter_loader():
            check_adapter_weights(folder)
        return config

    @classmethod
    def check_kwargs(cls, **kwargs):
        # Called by PeftConfig.from_pretrained with a saved adapter_config.json: one saved before prefix_mass
        # existed was trained with the paper's mass, whatever the default is now.
        kwargs = super().check_kwargs(**kwargs)
        if kwargs.get("peft_type") in (NTK_PEFT_TYPE, str(NTK_PEFT_TYPE)) and "prefix_mass" not in kwargs:
            kwargs["prefix_mass"] = "paper"
        return kwargs

    @property
    def init_mode(self) -> str:
        if self.init_weights is True:
            return "zeros"
        if self.init_weights is False:
            return "random"
        return self.init_weights


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _called_by_peft_adapter_loader() -> bool:
    """True when ``from_pretrained``'s caller is PEFT's adapter loading, which reads the weights right afterwards."""
    try:
        caller = sys._getframe(2)  # 0: here, 1: from_pretrained, 2: its caller
    except (AttributeError, ValueError):  # pragma: no cover - not CPython, or no such frame
        return False
    return caller.f_globals.get("__name__", "").startswith("peft.") and caller.f_code.co_name in (
        "from_pretrained",
        "load_adapter",
    )


def check_adapter_weights(folder: str) -> None:
    """Raise an ``OSError`` that says what to do when ``folder`` has no readable adapter weights file."""
    safetensors_file = os.path.join(folder, ADAPTER_SAFETENSORS)
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, framework="pt"):
                pass  # parsing the header also checks that the file is as long as the header says
        except Exception as err:  # safetensors raises its own SafetensorError
            raise OSError(
                f"{safetensors_file} is not a valid safetensors file ({err}): it is truncated or corrupted, e.g. by "
                "an interrupted save, copy or download. Save the adapter again (model.save_pretrained) or copy the "
                "whole folder again."
            ) from err
        return
    if os.path.isfile(os.path.join(folder, ADAPTER_BIN)):
        return
    raise FileNotFoundError(
        f"{folder} has an adapter_config.json but no adapter weights ({ADAPTER_SAFETENSORS} or {ADAPTER_BIN}). "
        "Copy the whole folder that save_pretrained wrote (both files), or point to the folder that holds them."
    )


def recommended_learning_rate(config: NTKAttentionConfig) -> float:
    """The AdamW learning rate for ``Z`` and ``k`` measured best for ``config``'s prefix mass and feature map.

    Measured on causal-LM domain adaptation of SmolLM2-135M (60 steps, cosine decay, 10 % warm-up; docs/results.md).
    A feature map without a measurement of its own (``"relu"``, a registered one) gets its prefix mass's elu rate. A
    new classification head trained beside the adapter wants its own, higher rate, and on the classification tasks
    measured the adapter's best rates were higher too.

    Example::

        >>> import peft_ntk
        >>> peft_ntk.recommended_learning_rate(peft_ntk.NTKAttentionConfig(prefix_mass="relative", feature_map="favor"))
        0.01
    """
    if not isinstance(config, NTKAttentionConfig):
        raise TypeError(f"recommended_learning_rate takes an NTKAttentionConfig, got {type(config).__name__}")
    feature_map = config.feature_map if isinstance(config.feature_map, str) else None
    measured = _RATES_BY_FEATURE_MAP.get((config.prefix_mass, feature_map))
    return measured if measured is not None else RECOMMENDED_LEARNING_RATES[config.prefix_mass]
