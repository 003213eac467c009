"""The PEFT tuner: finds attention modules, wraps them in NTK layers and routes the model's attention through ours."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .attention_hook import BASE_IMPLEMENTATIONS, NTK_IMPLEMENTATIONS
from .config import NTKAttentionConfig
from .layer import MERGE_ERROR, NTKAttentionLayer
from .peft_type import NTK_PREFIX

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity is ours

TESTED_ARCHITECTURES = ("Llama", "Mistral", "Qwen2", "GPT-2", "BERT", "ViT", "T5")


@functools.cache
def _class_calls_attention_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def is_attention_module(module: nn.Module) -> bool:
    """True for modules whose forward dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    if isinstance(module, NTKAttentionLayer):
        return True
    return _class_calls_attention_interface(type(module))


def is_cross_attention(name: str, module: nn.Module) -> bool:
    return (
        bool(getattr(module, "is_cross_attention", False))
        or re.search(r"cross|encdec", name, re.IGNORECASE) is not None
    )


def find_attention_modules(model: nn.Module, include_cross_attention: bool = False) -> list[str]:
    """Names of the attention modules; an already wrapped module is named by its NTK layer, not its base_layer."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and is_attention_module(module)
        and not name.endswith(".base_layer")
        and (include_cross_attention or not is_cross_attention(name, module))
    ]


def _matches(name: str, suffixes: set[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def default_target_modules(model: nn.Module) -> set[str]:
    """The shortest name suffixes that select exactly the self-attention modules (kept short for adapter configs)."""
    targets = find_attention_modules(model)
    if not targets:
        raise unsupported_model_error(model)
    all_names = [name for name, _ in model.named_modules() if name]
    target_set = set(targets)
    for depth in range(1, max(name.count(".") for name in targets) + 2):
        suffixes = {".".join(name.split(".")[-depth:]) for name in targets}
        if {name for name in all_names if _matches(name, suffixes)} == target_set:
            return suffixes
    return target_set


def unsupported_model_error(model: nn.Module) -> ValueError:
    architecture = type(model).__name__
    return ValueError(
        f"NTK-Attention cannot adapt {architecture}: none of its modules routes attention through transformers' "
        "AttentionInterface (ALL_ATTENTION_FUNCTIONS), which is where the adapter hooks in. Models that still hard-code "
        "their attention (e.g. Bloom, DeBERTa-v2, Falcon, GPT-Neo) are not supported. Tested architectures: "
        f"{', '.join(TESTED_ARCHITECTURES)}; other models whose attention modules call ALL_ATTENTION_FUNCTIONS work "
        "through the same code path."
    )


def _attention_summary(model: nn.Module) -> str:
    """The model's attention modules, for error messages: how many, their name endings, an example."""
    attention = find_attention_modules(model, include_cross_attention=True)
    if not attention:
        return "no attention modules"
    endings = ", ".join(repr(e) for e in sorted({name.split(".")[-1] for name in attention}))
    return f"{len(attention)} attention modules (e.g. {attention[0]!r}), whose names end in {endings}"


def _configs(model: nn.Module) -> list:
    """Every distinct config object of the model and its sub-models (T5, encoder-decoders share or nest them)."""
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


def route_attention_through_ntk(model: nn.Module) -> None:
    """Switch every config of ``model`` to the NTK twin of its attention implementation (idempotent)."""
    for config in _configs(model):
        current = config._attn_implementation
        if current in BASE_IMPLEMENTATIONS:
            continue
        if current not in NTK_IMPLEMENTATIONS:
            logger.warning_once(
                f"NTK-Attention computes attention itself and needs a padding mask in SDPA form; attn_implementation="
                f"{current!r} is replaced by 'sdpa' for the attention calls that carry no adapter."
            )
            current = "sdpa"
        config._attn_implementation_internal = NTK_IMPLEMENTATIONS[current]


def restore_attention_implementation(model: nn.Module) -> None:
    for config in _configs(model):
        current = config._attn_implementation
        if current in BASE_IMPLEMENTATIONS:
            config._attn_implementation_internal = BASE_IMPLEMENTATIONS[current]


class NTKAttentionModel(BaseTuner):
    """Adds NTK-Attention ("Toward Infinite-Long Prefix in Transformer") to a transformers model.

    Each targeted attention module is wrapped in an :class:`NTKAttentionLayer` holding per-adapter ``Z`` (H×d×d) and
    ``k`` (H×d), and the model's ``attn_implementation`` becomes ``ntk_sdpa`` (or ``ntk_eager``): transformers then calls
    :func:`peft_ntk.attention.ntk_attention_forward`, which adds the virtual prefix inside wrapped modules and computes
    plain SDPA (or eager) attention everywhere else. ``unload()`` restores the original implementation.

    Use it through PEFT::

        >>> import peft_ntk
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(base_model, peft_ntk.NTKAttentionConfig())  # doctest: +SKIP
    """

    prefix: str = NTK_PREFIX
    tuner_layer_cls = NTKAttentionLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: NTKAttentionConfig, model_config: dict) -> NTKAttentionConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(self.model)
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict] = None,
        **kwargs,
    ) -> None:
        if state_dict is None:
            # Before PEFT changes anything (attention routing, wrapped modules): a bad target list must leave the
            # model as it was, and the error should say which modules would work.
            self._check_targets(model, self.peft_config[adapter_name])
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
            **kwargs,
        )

    def _check_targets(self, model: nn.Module, config: NTKAttentionConfig) -> None:
        """Raise unless ``config.target_modules`` selects at least one module and only attention modules."""
        targets = config.target_modules
        if targets is None or targets == DUMMY_TARGET_MODULES:
            return  # the default (every self-attention module) is resolved in _prepare_adapter_config
        if not find_attention_modules(model, include_cross_attention=True):
            raise unsupported_model_error(model)
        # Like PEFT, skip the insides of modules that already carry an adapter (their base_layer and its children).
        wrapped = tuple(name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
        matched, excluded = [], []
        for name, module in model.named_modules():
            if not name or (wrapped and name.startswith(wrapped)):
                continue
            result = self._check_target_module_exists(config, name)
            if isinstance(result, _ExcludedModule):
                excluded.append(name)
            elif result:
                matched.append((name, module))
        if not matched:
            shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            why = f"target_modules={shown!r} matches no module of {type(model).__name__}"
            if excluded:
                why += f" that exclude_modules={config.exclude_modules!r} leaves in"
            if config.layers_to_transform is not None:
                why += f" within layers_to_transform={config.layers_to_transform!r}"
            raise NoMatchingPeftModuleError(
                f"{why}. NTK-Attention adapts whole attention modules; this model has {_attention_summary(model)}. "
                "Name those modules (a full name, a suffix such as the name ending, or a regex), or leave "
                "target_modules unset to adapt every self-attention module."
            )
        for name, module in matched:
            if not is_attention_module(module):
                raise ValueError(
                    f"target module {name!r} ({type(module).__name__}) is not an attention module: NTK-Attention "
                    "adapts whole attention modules, those whose forward calls transformers' ALL_ATTENTION_FUNCTIONS. "
                    f"This model has {_attention_summary(model)}. Fix target_modules, or leave target_modules unset "
                    "to adapt every self-attention module."
                )

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Activate the adapter(s) ``adapter_name`` (a name or a list of names); refuse unknown or incompatible ones.

        Checked before anything changes, so a refused call leaves the active adapters as they were.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [name for name in names if name not in self.peft_config]
        if missing:
            raise ValueError(
                f"no adapter named {', '.join(map(repr, missing))}; this model has {sorted(self.peft_config)}. Load it "
                "first (model.load_adapter(path, adapter_name=...) or model.add_adapter(name, config)) or pick one "
                "of those."
            )
        feature_maps = {name: getattr(self.peft_config[name], "feature_map", None) for name in names}
        if len(set(feature_maps.values())) > 1:
            raise ValueError(
                f"adapters {names} cannot be active together: they use different feature maps {feature_maps}, so "
                "their prefixes cannot be combined. Activate one of them, or only adapters with the same feature_map."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _prepare_model(self, peft_config: NTKAttentionConfig, model: nn.Module) -> None:
        if not find_attention_modules(model, include_cross_attention=True):
            raise unsupported_model_error(model)
        route_attention_through_ntk(model)

    def _create_and_replace(
        self,
        peft_config: NTKAttentionConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, NTKAttentionLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not is_attention_module(target):  # normally caught earlier, by _check_targets
            raise ValueError(
                f"target module {current_key!r} ({type(target).__name__}) is not an attention module: NTK-Attention "
                "adapts whole attention modules, those whose forward calls transformers' ALL_ATTENTION_FUNCTIONS. "
                f"This model has {_attention_summary(self.model)}. Fix target_modules, or leave target_modules "
                "unset to adapt every self-attention module."
            )
        new_module = NTKAttentionLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            raise ValueError(MERGE_ERROR)
        # BaseTuner's version assumes the unwrapped module has a `.weight`; attention modules do not.
        wrapped = [name for name, module in self.model.named_modules() if isinstance(module, NTKAttentionLayer)]
        for name in tqdm(wrapped, disable=not progressbar, desc="Unloading model"):
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            setattr(parent, child_name, getattr(parent, child_name).get_base_layer())
        restore_attention_implementation(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        for key, tensor in remapped.items():
            if key in own and NTK_PREFIX in key and own[key].shape != tensor.shape:
                raise ValueError(
                    f"the NTK adapter does not fit this model: {key} has shape {tuple(tensor.shape)} in the adapter "
                    f"but {tuple(own[key].shape)} here. The adapter was trained on a base model with a different number of "
                    "attention heads or head size (or its adapter_config.json gives another feature_dim than its "
                    "weights); load it on that model, with the adapter_config.json saved next to its weights."
                )
        return remapped
