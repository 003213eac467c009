"""Feature maps ``phi`` for NTK-Attention's virtual prefix.

NTK-Attention replaces the prefix kernel ``exp(q·k/√d)`` by ``phi(q)ᵀ phi(k)``. A feature map takes the last dimension
``d`` of its input to ``r`` non-negative features (the *feature dimension*; the adapter's ``Z`` is r×d and ``k`` has r
entries). Two kinds exist:

* fixed maps, registered by name in :data:`FEATURE_MAPS` (``"elu"``, the paper's ``elu(x/d^(1/4)) + 1`` with
  ``r = d``; ``"relu"``; your own via :func:`register_feature_map`);
* :class:`PositiveRandomFeatures` (``"favor"``, Performer's FAVOR+), ``phi(x) = exp(W x' − |x'|²/2) / √r`` with
  ``x' = x / d^(1/4)`` and the rows of ``W`` (r×d) drawn from N(0, I): ``E[phi(q)ᵀphi(k)] = exp(q·k/√d)``, an unbiased
  estimate of the softmax kernel whose error falls like ``1/√r``. ``W`` is data, not a name: the adapter keeps it as a
  non-trainable buffer that is saved and reloaded with the adapter.

Exponential features can leave float range for large inputs, so maps may also offer
``stabilized(x) -> (phi_tilde, log_scale)`` with ``phi(x) = e^log_scale · phi_tilde`` and ``log_scale`` of shape
``x.shape[:-1]``. A per-*query* scale is harmless in NTK-Attention: it only shifts the query's log-sum-exp (see
:func:`peft_ntk.ops.ntk_prefix_combine`). On the *key* side a scale cancels only if all keys of a head share it, so
prefix states are accumulated with one running scale per head (:class:`peft_ntk.ops.PrefixStateAccumulator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.nn.functional as F

FeatureMap = Callable[[torch.Tensor], torch.Tensor]

RANDOM_FEATURE_MAPS = ("favor",)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """The paper's feature map ``phi(x) = elu(x / d^(1/4)) + 1`` (Katharopoulos et al. 2020); always > 0."""
    return F.elu(x * x.shape[-1] ** -0.25) + 1.0


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = relu(x / d^(1/4))``: non-negative but can be exactly 0, so the prefix may drop out for a query."""
    return F.relu(x * x.shape[-1] ** -0.25)


FEATURE_MAPS: dict[str, FeatureMap] = {"elu": elu_feature_map, "relu": relu_feature_map}


def register_feature_map(name: str, fn: FeatureMap, *, overwrite: bool = False) -> None:
    """Make ``fn`` available as ``NTKAttentionConfig(feature_map=name)``.

    ``fn`` maps the query's last dimension ``d`` to ``r`` non-negative features. Adapters store the name only, so
    register the same function before loading an adapter that uses it.
    """
    if not callable(fn):
        raise TypeError(f"feature map {name!r} must be callable, got {type(fn).__name__}")
    if name in RANDOM_FEATURE_MAPS:
        raise ValueError(f"{name!r} is a built-in random-feature map and cannot be replaced; pick another name")
    if name in FEATURE_MAPS and FEATURE_MAPS[name] is not fn and not overwrite:
        raise ValueError(f"a feature map named {name!r} is already registered; pass overwrite=True to replace it")
    FEATURE_MAPS[name] = fn


def is_known_feature_map(name: str) -> bool:
    return isinstance(name, str) and (name in FEATURE_MAPS or name in RANDOM_FEATURE_MAPS)


def get_feature_map(feature_map: Union[str, FeatureMap]) -> FeatureMap:
    """The callable for a registered name; callables (e.g. a :class:`PositiveRandomFeatures`) pass through."""
    if callable(feature_map):
        return feature_map
    if feature_map in RANDOM_FEATURE_MAPS:
        raise ValueError(
            f"feature map {feature_map!r} needs its random projection: pass a PositiveRandomFeatures(projection) "
            "object (an NTK layer builds it from its saved ntk_projection buffer), not the name."
        )
    try:
        return FEATURE_MAPS[feature_map]
    except KeyError:
        raise ValueError(
            f"unknown feature map {feature_map!r}; registered: {sorted(FEATURE_MAPS)}. "
            "Add your own with peft_ntk.register_feature_map(name, fn)."
        ) from None


def feature_map_and_log_scale(
    feature_map: Union[str, FeatureMap], x: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(phi_tilde, log_scale)`` with ``phi(x) = e^log_scale · phi_tilde``; ``log_scale`` is None for plain maps."""
    fn = get_feature_map(feature_map)
    stabilized = getattr(fn, "stabilized", None)
    if stabilized is not None:
        return stabilized(x)
    return fn(x), None


def feature_dim_of(feature_map: Union[str, FeatureMap], head_dim: int) -> int:
    """Number of features ``r`` the map produces for inputs of size ``head_dim``."""
    return get_feature_map(feature_map)(torch.zeros(1, head_dim)).shape[-1]


def draw_random_projection(
    feature_dim: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    seed: Optional[int] = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """An (r, d) projection for :class:`PositiveRandomFeatures`: rows ~ N(0, I_d), marginally.

    ``orthogonal=True`` draws blocks of ``d`` mutually orthogonal rows (FAVOR+'s variance reduction) and gives each row
    the norm of an independent N(0, I_d) sample, so every row is still N(0, I_d) and the estimator stays unbiased.
    Deterministic for a given ``seed`` (``None``: from torch's global generator).
    """
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    if not orthogonal:
        return torch.randn(feature_dim, head_dim, generator=generator, dtype=torch.float64).to(dtype)
    blocks = []
    for _ in range(math.ceil(feature_dim / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # a Haar-distributed orthogonal matrix (rows orthonormal)
        blocks.append(q)
    rows = torch.cat(blocks)[:feature_dim]
    norms = torch.randn(feature_dim, head_dim, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (rows * norms).to(dtype)


class PositiveRandomFeatures:
    """FAVOR+ positive random features: ``phi(x) = exp(W x' − |x'|²/2) / √r`` with ``x' = x / d^(1/4)``.

    ``phi(q)ᵀ phi(k)`` is an unbiased estimate of ``exp(q·k/√d)``, the kernel of softmax attention at the usual
    ``1/√d`` scaling. Calling the object returns the features at their true scale; :meth:`stabilized` returns them
    divided by ``e^c`` with ``c`` the row's largest log-feature (so the largest feature is 1), together with ``c``.

    Example::

        >>> import torch
        >>> from peft_ntk.ops.feature_maps import PositiveRandomFeatures, draw_random_projection
        >>> phi = PositiveRandomFeatures(draw_random_projection(4096, 8, seed=0))
        >>> q, k = torch.randn(8, dtype=torch.float64) / 2, torch.randn(8, dtype=torch.float64) / 2
        >>> estimate, exact = (phi(q) @ phi(k)).item(), torch.exp(q @ k / 8 ** 0.5).item()
        >>> abs(estimate / exact - 1) < 0.1
        True
    """

    def __init__(self, projection: torch.Tensor) -> None:
        if not isinstance(projection, torch.Tensor) or projection.dim() != 2:
            raise ValueError("projection must be an (r, d) tensor")
        self.projection = projection

    @property
    def feature_dim(self) -> int:
        return self.projection.shape[0]

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.projection.shape[1]:
            raise ValueError(
                f"inputs have size {x.shape[-1]} but the random projection was drawn for size "
                f"{self.projection.shape[1]}: the adapter does not fit this model's head size"
            )
        x = x * x.shape[-1] ** -0.25
        projection = self.projection.to(device=x.device, dtype=x.dtype)
        return x @ projection.T - 0.5 * (x * x).sum(-1, keepdim=True)

    def log_features(self, x: torch.Tensor) -> torch.Tensor:
        """``log phi(x)``, finite for every finite input."""
        return self._exponent(x) - 0.5 * math.log(self.feature_dim)

    def stabilized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_phi = self.log_features(x)
        # The shift does not need a gradient: phi = e^c · e^(log_phi - c) holds for any c, and torch's exp/sub
        # backward is exact either way; detaching keeps it out of the graph.
        shift = log_phi.detach().amax(dim=-1, keepdim=True)
        return torch.exp(log_phi - shift), shift.squeeze(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_features(x))

    def __repr__(self) -> str:
        return f"PositiveRandomFeatures(r={self.projection.shape[0]}, d={self.projection.shape[1]})"


def feature_map_has_trainable_state(feature_map: Union[str, FeatureMap], query: torch.Tensor) -> bool:
    """Whether ``phi`` depends on a tensor that requires grad besides its input (a learned map).

    The fused combines recompute ``phi`` in their backward and differentiate it with respect to the query only, so
    such a map must take the autograd path. The built-in maps and :class:`PositiveRandomFeatures` are answered from
    what they hold, as is an ``nn.Module`` (its parameters) or a callable with a ``has_trainable_state`` attribute;
    only any other callable is run on one query row to find out.
    """
    fn = get_feature_map(feature_map)
    if fn is elu_feature_map or fn is relu_feature_map:
        return False
    if isinstance(fn, PositiveRandomFeatures):
        return fn.projection.requires_grad
    if isinstance(fn, torch.nn.Module):
        return any(p.requires_grad for p in fn.parameters())
    declared = getattr(fn, "has_trainable_state", None)
    if declared is not None:
        return bool(declared)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    probe = query.detach().reshape(-1, query.shape[-1])[:1].to(work)
    with torch.enable_grad():
        phi, log_scale = feature_map_and_log_scale(fn, probe)
    return phi.requires_grad or (log_scale is not None and log_scale.requires_grad)
