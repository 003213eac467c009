"""The NTK-Attention tuner layer: per-adapter Z and k around one attention module."""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..ops.feature_maps import (
    RANDOM_FEATURE_MAPS,
    FeatureMap,
    PositiveRandomFeatures,
    draw_random_projection,
    feature_dim_of,
)
from .config import NTKAttentionConfig

# The attention function receives the *base* attention module. While an NTK layer runs its base module, this
# variable holds (base module, NTK layer) so the function can find the adapter without a back-reference on the base
# module (which would be a reference cycle and would break deepcopy).
_RUNNING_LAYER: contextvars.ContextVar[Optional[tuple[nn.Module, NTKAttentionLayer, Any]]] = contextvars.ContextVar(
    "peft_ntk_running_layer", default=None
)


MERGE_ERROR = (
    "NTK-Attention cannot be merged into the base weights: its prefix term phi(q)ᵀZ / (Σ e^s + phi(q)ᵀk) depends "
    "non-linearly on each query, and no change of a weight matrix reproduces it. Keep the model as a PeftModel, or "
    "call unload() to get the base model back without the adapter."
)


def running_layer_for(module: nn.Module) -> Optional[NTKAttentionLayer]:
    """The NTK layer wrapping ``module`` if it is the one currently running, else None."""
    running = _RUNNING_LAYER.get()
    if running is not None and running[0] is module:
        return running[1]
    return None


def running_position_embeddings_for(module: nn.Module) -> Any:
    """The ``position_embeddings`` (cos, sin) the running NTK layer around ``module`` was called with, else None."""
    running = _RUNNING_LAYER.get()
    if running is not None and running[0] is module:
        return running[2]
    return None


class _AbsWithUnitSubgradient(torch.autograd.Function):
    """|x| whose gradient at x = 0 is +1 instead of torch's 0.

    The official code keeps k >= 0 with abs() and initialises k at 0 for ViT, where abs' zero subgradient leaves k
    untrained forever. Taking +1 at 0 lets the first step move k either way; from then on it is the ordinary |x|.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.abs()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.where(x < 0, -grad, grad)


def nonnegative(x: torch.Tensor) -> torch.Tensor:
    return _AbsWithUnitSubgradient.apply(x)


@dataclass
class PrefixState:
    """What the attention function needs from the active adapters of one layer."""

    z: torch.Tensor  # (H, r, dv)
    k: torch.Tensor  # (H, r), non-negative
    feature_map: Union[str, FeatureMap]  # a registered name, or a PositiveRandomFeatures on the adapter's projection
    feature_dropout: float
    attention_backend: str
    query_features: str = "post_rope"  # what phi sees: the query after ("post_rope") or before ("pre_rope") RoPE
    prefix_mass: str = "paper"  # "paper": phi(q)ᵀk adds to Σ e^s; "relative": the real keys count as mass 1


def _attention_shape(module: nn.Module) -> tuple[int, int]:
    """(number of query heads, head dim) of a transformers attention module."""
    config = getattr(module, "config", None)
    heads = None
    for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        if isinstance(getattr(module, name, None), int):
            heads = getattr(module, name)
            break
    if heads is None and config is not None:
        heads = getattr(config, "num_attention_heads", None)
    head_dim = None
    for name in ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size"):
        if isinstance(getattr(module, name, None), int):
            head_dim = getattr(module, name)
            break
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None
        )
    if not heads or not head_dim:
        raise ValueError(
            f"cannot tell the number of heads and the head size of {type(module).__name__}: it has none of the "
            "attributes num_heads/num_attention_heads/n_heads and head_dim/attention_head_size/key_value_proj_dim."
        )
    return heads, head_dim


class NTKAttentionLayer(nn.Module, BaseTunerLayer):
    """Wraps an attention module and adds NTK-Attention's virtual prefix to it.

    The wrapped module runs unchanged; the model's attention implementation (set by the tuner to ``ntk_sdpa`` or
    ``ntk_eager``) reads the active adapters' ``Z`` and ``k`` from this layer while it runs.
    """

    adapter_layer_names = ("ntk_z", "ntk_k")
    # ntk_projection: the random projection of 'favor' adapters, a non-trainable buffer saved with the adapter.
    other_param_names = (
        "ntk_projection",
        "ntk_feature_map",
        "ntk_feature_dropout",
        "ntk_attention_backend",
        "ntk_query_features",
        "ntk_prefix_mass",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NTKAttentionConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_heads, self.head_dim = _attention_shape(base_layer)
        self.ntk_z = nn.ParameterDict({})
        # Raw parameter; the effective k is |ntk_k| (see _AbsWithUnitSubgradient).
        self.ntk_k = nn.ParameterDict({})
        self.ntk_projection = BufferDict({}, persistent=True)
        self.ntk_feature_map: dict[str, str] = {}
        self.ntk_feature_dropout: dict[str, float] = {}
        self.ntk_attention_backend: dict[str, str] = {}
        self.ntk_query_features: dict[str, str] = {}
        self.ntk_prefix_mass: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        # Code around the attention module reads its attributes (layer_idx, is_causal, config, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def update_layer(self, adapter_name: str, config: NTKAttentionConfig) -> None:
        if config.feature_map in RANDOM_FEATURE_MAPS:
            feature_dim = config.feature_dim or self.head_dim
            self.ntk_projection[adapter_name] = draw_random_projection(
                feature_dim, self.head_dim, orthogonal=config.orthogonal_features, seed=config.feature_seed
            )
        else:
            feature_dim = feature_dim_of(config.feature_map, self.head_dim)
            if adapter_name in self.ntk_projection:
                del self.ntk_projection[adapter_name]
        self.ntk_z[adapter_name] = nn.Parameter(torch.zeros(self.num_heads, feature_dim, self.head_dim))
        self.ntk_k[adapter_name] = nn.Parameter(torch.zeros(self.num_heads, feature_dim))
        self.ntk_feature_map[adapter_name] = config.feature_map
        self.ntk_feature_dropout[adapter_name] = config.feature_dropout
        self.ntk_attention_backend[adapter_name] = config.attention_backend
        self.ntk_query_features[adapter_name] = config.query_features
        self.ntk_prefix_mass[adapter_name] = config.prefix_mass
        self.reset_ntk_parameters(adapter_name, config.init_mode, config.init_scale)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_ntk_parameters(self, adapter_name: str, init_mode: str, init_scale: float) -> None:
        z, k = self.ntk_z[adapter_name], self.ntk_k[adapter_name]
        if init_mode == "zeros":
            z.zero_()
            k.zero_()
        elif init_mode == "small_random":
            z.normal_(0.0, init_scale)
            k.normal_(0.0, init_scale)
        elif init_mode == "random":
            z.normal_(0.0, 1.0 / math.sqrt(self.head_dim))
            k.normal_(0.0, 1.0 / math.sqrt(self.head_dim))
        else:
            raise ValueError(f"unknown init mode {init_mode!r}")

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # Attention modules have no `.weight`: their first floating-point parameter gives device and dtype. PEFT then
        # upcasts float16/bfloat16 adapters to float32 unless `autocast_adapter_dtype=False` keeps the base's dtype.
        param = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        if param is None:
            param = next(base_layer.parameters(), None)
            return (param.device if param is not None else None), None
        return param.device, param.dtype

    def prefix_state(self) -> Optional[PrefixState]:
        """The combined prefix of the active adapters, or None when no adapter applies to this layer.

        Several active adapters are several prefixes side by side, so their Z and k add up.
        """
        if self.disable_adapters:
            return None
        names = [name for name in self.active_adapters if name in self.ntk_z]
        if not names:
            return None
        feature_maps = {self.ntk_feature_map[name] for name in names}
        if len(feature_maps) > 1:
            raise ValueError(
                f"active NTK adapters {names} use different feature maps {sorted(feature_maps)}; their prefixes cannot "
                "be combined. Activate one of them with set_adapter(name)."
            )
        feature_map = feature_maps.pop()
        if feature_map in RANDOM_FEATURE_MAPS:
            projections = [self.ntk_projection[name] for name in names]
            if any(not torch.equal(p, projections[0]) for p in projections[1:]):
                raise ValueError(
                    f"active NTK adapters {names} use different random projections (ntk_projection); their prefixes "
                    "cannot be combined. Activate one of them with set_adapter(name)."
                )
            feature_map = PositiveRandomFeatures(projections[0])
        if len(names) == 1:  # the usual case; sum() would add a zero tensor first
            z, k = self.effective_prefix(names[0])
        else:
            pairs = [self.effective_prefix(name) for name in names]
            z, k = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        dropout = max(self.ntk_feature_dropout[name] for name in names)
        backend = self.ntk_attention_backend[names[0]]
        query_features = {self.ntk_query_features[name] for name in names}
        if len(query_features) > 1:
            raise ValueError(
                f"active NTK adapters {names} apply phi to different queries ({sorted(query_features)}); their "
                "prefixes cannot be combined. Activate one of them with set_adapter(name)."
            )
        prefix_masses = {self.ntk_prefix_mass.get(name, "paper") for name in names}
        if len(prefix_masses) > 1:
            raise ValueError(
                f"active NTK adapters {names} use different prefix_mass settings ({sorted(prefix_masses)}); their "
                "prefixes cannot be combined. Activate one of them with set_adapter(name)."
            )
        return PrefixState(
            z=z,
            k=k,
            feature_map=feature_map,
            feature_dropout=dropout,
            attention_backend=backend,
            query_features=query_features.pop(),
            prefix_mass=prefix_masses.pop(),
        )

    def effective_prefix(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z, k)`` of one adapter as the attention uses them: ``(Z, |k|)``, differentiable in the parameters."""
        return self.ntk_z[adapter_name], nonnegative(self.ntk_k[adapter_name])

    def adapter_feature_map(self, adapter_name: str) -> Union[str, FeatureMap]:
        """The feature map of one adapter: its registered name, or a PositiveRandomFeatures on its projection."""
        name = self.ntk_feature_map[adapter_name]
        if name in RANDOM_FEATURE_MAPS:
            return PositiveRandomFeatures(self.ntk_projection[adapter_name])
        return name

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged (see merge)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1 and isinstance(args[1], tuple):
            position_embeddings = args[1]  # Llama-style forward(hidden_states, position_embeddings, ...)
        token = _RUNNING_LAYER.set((self.base_layer, self, position_embeddings))
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            _RUNNING_LAYER.reset(token)

    def __repr__(self) -> str:
        return "ntk." + super().__repr__()
