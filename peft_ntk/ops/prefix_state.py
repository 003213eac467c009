"""The prefix state ``(Z, k)`` of an explicit prefix of keys and values, in one pass or streamed in chunks."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .feature_maps import FeatureMap, feature_map_and_log_scale, get_feature_map


class PrefixStateAccumulator:
    """Streaming ``Z = Σ_p phi(k_p) v_pᵀ`` and ``k = Σ_p phi(k_p)`` over chunks of prefix keys and values.

    Adding the chunks of a prefix one by one gives the same ``(Z, k)`` as one pass over the whole prefix (up to float64
    rounding), with memory independent of the prefix length. Sums are kept in float64. For maps with a ``stabilized``
    form (exponential features) each head keeps one running log-scale ``c_h`` shared by *all* its keys, so
    ``Z_h = e^{c_h} Σ_p phi_tilde(k_p) v_pᵀ`` stays exact: a per-key scale would not cancel in the sum. When a chunk
    raises ``c_h`` the sums so far are rescaled, as in online softmax.

    Example::

        >>> import torch
        >>> from peft_ntk.ops import PrefixStateAccumulator, prefix_state_from_keys_values
        >>> keys, values = torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 10, 4, dtype=torch.float64)
        >>> acc = PrefixStateAccumulator("elu")
        >>> acc.add(keys[:, :6], values[:, :6]); acc.add(keys[:, 6:], values[:, 6:])
        >>> z, k = acc.state()
        >>> torch.allclose(z, prefix_state_from_keys_values(keys, values)[0])
        True
    """

    def __init__(self, feature_map: Union[str, FeatureMap] = "elu") -> None:
        self.feature_map = feature_map
        self.z: Optional[torch.Tensor] = None  # (H, r, dv) float64, in units of e^{log_scale}
        self.k: Optional[torch.Tensor] = None  # (H, r)
        self.log_scale: Optional[torch.Tensor] = None  # (H,) or None for plain maps
        self.count = 0

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add prefix rows: ``keys`` (H, m, d) and ``values`` (H, m, dv); a leading batch dim is summed over too."""
        if keys.dim() == 4:
            keys, values = keys.transpose(0, 1).flatten(1, 2), values.transpose(0, 1).flatten(1, 2)
        if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != values.shape[:2]:
            raise ValueError(
                f"prefix keys (H, m, d) and values (H, m, dv) must agree in heads and length; got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}"
            )
        keys, values = keys.to(torch.float64), values.to(torch.float64)
        phi, log_scale = feature_map_and_log_scale(self.feature_map, keys)
        if log_scale is not None:
            chunk_scale = log_scale.amax(dim=1)  # (H,): one scale for all keys of a head
            phi = phi * torch.exp(log_scale - chunk_scale[:, None])[..., None]
        z = torch.einsum("hmr,hmd->hrd", phi, values)
        k = phi.sum(dim=1)
        self.count += keys.shape[1]
        if self.z is None:
            self.z, self.k, self.log_scale = z, k, (chunk_scale if log_scale is not None else None)
            return
        if (self.log_scale is None) != (log_scale is None) or self.z.shape != z.shape:
            raise ValueError(
                f"this chunk gives a prefix state of shape {tuple(z.shape)}, earlier chunks {tuple(self.z.shape)}"
            )
        if log_scale is not None:
            new_scale = torch.maximum(self.log_scale, chunk_scale)
            old_factor, new_factor = torch.exp(self.log_scale - new_scale), torch.exp(chunk_scale - new_scale)
            self.z = self.z * old_factor[:, None, None] + z * new_factor[:, None, None]
            self.k = self.k * old_factor[:, None] + k * new_factor[:, None]
            self.log_scale = new_scale
        else:
            self.z, self.k = self.z + z, self.k + k

    def state(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z (H, r, dv), k (H, r))`` at their true scale, as float64 unless ``dtype`` is given."""
        if self.z is None:
            raise ValueError("no prefix rows were added")
        z, k = self.z, self.k
        if self.log_scale is not None:
            factor = torch.exp(self.log_scale)
            z, k = z * factor[:, None, None], k * factor[:, None]
        if dtype is not None:
            z, k = z.to(dtype), k.to(dtype)
        if not (torch.isfinite(z).all() and torch.isfinite(k).all()):
            raise ValueError(
                "the prefix state overflows (Z or k is not finite): the features of these keys are too large for "
                f"{dtype or torch.float64}. Use fewer or smaller keys, or a bounded feature map such as 'elu'."
            )
        return z, k


def prefix_state_from_keys_values(
    prefix_keys: torch.Tensor, prefix_values: torch.Tensor, feature_map: Union[str, FeatureMap] = "elu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse an explicit prefix (H, m, d) / (H, m, dv) to ``Z = Σ phi(k_p) v_pᵀ`` (H, r, dv) and ``k = Σ phi(k_p)``.

    Differentiable for plain maps (computed in the keys' dtype, as before). Maps with a ``stabilized`` form are
    accumulated in float64 with a shared per-head scale (:class:`PrefixStateAccumulator`) and cast back.
    """
    fn = get_feature_map(feature_map)
    if getattr(fn, "stabilized", None) is None:
        phi = fn(prefix_keys)
        return torch.einsum("hmr,hmd->hrd", phi, prefix_values), phi.sum(dim=1)
    accumulator = PrefixStateAccumulator(fn)
    accumulator.add(prefix_keys, prefix_values)
    return accumulator.state(dtype=prefix_keys.dtype)
