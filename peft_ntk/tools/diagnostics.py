"""What an NTK adapter is doing while it trains: per layer, the prefix's share of attention, |Z|, |k| and gradients.

The prefix's share of attention in a row is ``1 − w = a / (a + e^LSE)`` with ``a = φ(q)ᵀk`` (``prefix_mass="relative"``:
``a / (a + 1)`` with ``φ`` normalised to sum 1): the quantity that bounds how much the adapter can change the layer's
output, and how large its gradients are.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ..ops import compute_dtype_for, feature_map_and_log_scale, masked_scores
from ..tuner.attention_hook import capture_attention_inputs, query_before_rotary
from ..tuner.layer import NTKAttentionLayer, running_layer_for


def ntk_layers(model: torch.nn.Module) -> list[tuple[str, NTKAttentionLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, NTKAttentionLayer)]


@torch.no_grad()
def prefix_attention_share(model: torch.nn.Module, **inputs: Any) -> list[dict[str, float]]:
    """Run ``model(**inputs)`` and return, per adapted layer in order, statistics of the prefix's share ``1 − w``.

    Each entry has ``mean``, ``median``, ``p90`` and ``max`` over the rows of all heads (causal rows as the model
    computes them), ``lse_mean``, and ``feature_spread``: how far the normalised features ``φ(q) / Σφ(q)`` of a head's
    rows lie from their mean (total-variation distance, averaged over rows and heads; 0 to 1). The prefix's term is a
    function of these normalised features alone, so at 0 it adds the same vector to every row of a head, whatever
    ``Z`` and ``k`` learn. Pass unpadded inputs: the share is measured without a padding mask.
    """
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        raise ValueError(
            "prefix_attention_share measures without a padding mask; pass a probe batch without padding (rows of "
            "equal length, attention_mask all ones or omitted)."
        )
    shares: list[dict[str, float]] = []

    def record(module, query, key, value, scaling):
        layer = running_layer_for(module)
        state = layer.prefix_state() if layer is not None else None
        if state is None:
            return
        dtype = compute_dtype_for(query.dtype)
        q = query.to(dtype)
        causal = bool(getattr(module, "is_causal", False)) and q.shape[2] > 1
        scores = masked_scores(q, key.to(dtype), is_causal=causal, scaling=scaling)
        lse = torch.logsumexp(scores, dim=-1)
        features = query_before_rotary(module, query).to(dtype) if state.query_features == "pre_rope" else q
        phi, log_scale = feature_map_and_log_scale(state.feature_map, features)
        if state.prefix_mass == "relative":  # phi normalised to sum 1, the real keys' mass counted as 1
            phi, log_scale = phi / phi.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny), None
            real_log_mass = torch.where(torch.isneginf(lse), lse, torch.zeros_like(lse))
        else:
            real_log_mass = lse
        log_a = torch.log(torch.einsum("bhlr,hr->bhl", phi, state.k.to(dtype)))  # log 0 = -inf: share 0
        if log_scale is not None:
            log_a = log_a + log_scale
        share = torch.sigmoid(log_a - real_log_mass).flatten().float()
        finite = torch.isfinite(lse).flatten()
        share = share[finite] if finite.any() else share
        spread = _feature_spread(phi)
        shares.append(
            {
                "mean": share.mean().item(),
                "median": share.median().item(),
                "p90": torch.quantile(share, 0.9).item() if share.numel() <= 16_000_000 else math.nan,
                "max": share.max().item(),
                "lse_mean": lse[torch.isfinite(lse)].mean().item() if torch.isfinite(lse).any() else math.nan,
                "feature_spread": spread,
            }
        )

    was_training = model.training
    model.eval()
    try:
        with capture_attention_inputs(record):
            model(**inputs)
    finally:
        model.train(was_training)
    return shares


class NTKDiagnosticsCallback(TrainerCallback):
    """Logs, every ``every`` steps, per adapted layer: the prefix's share of attention on a fixed probe batch, the
    size of the effective ``Z`` and ``k``, and the gradient norms of the stored parameters.

    ``history`` holds one dict per measured step: ``{"step", "share_mean", "share_p90", "share_max", "lse_mean",
    "feature_spread", "z_abs", "k_abs", "grad_z", "grad_k"}``, each a list over layers (gradients are those of the step before it).

    Example::

        >>> probe = {"input_ids": blocks[:4]}  # doctest: +SKIP
        >>> diagnostics = peft_ntk.NTKDiagnosticsCallback(probe, every=10)  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=data, callbacks=[diagnostics]).train()  # doctest: +SKIP
        >>> diagnostics.history[-1]["share_mean"]  # doctest: +SKIP
    """

    def __init__(self, probe: dict[str, torch.Tensor], every: int = 10, adapter_name: str = "default") -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.probe, self.every, self.adapter_name = probe, every, adapter_name
        self.history: list[dict[str, Any]] = []
        self._grads: Optional[tuple[list[float], list[float]]] = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or (state.global_step + 1) % self.every:
            return
        layers = [layer for _, layer in ntk_layers(model)]
        self._grads = (
            [_norm(layer.ntk_z[self.adapter_name].grad) for layer in layers],
            [_norm(layer.ntk_k[self.adapter_name].grad) for layer in layers],
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every:
            return
        self.history.append(self.measure(model, state.global_step))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.history:
            self.history.append(self.measure(model, 0))

    def measure(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        device = next(model.parameters()).device
        probe = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.probe.items()}
        shares = prefix_attention_share(model, **probe)
        layers = [layer for _, layer in ntk_layers(model)]
        effective = [layer.effective_prefix(self.adapter_name) for layer in layers]
        grads = self._grads or ([math.nan] * len(layers), [math.nan] * len(layers))
        self._grads = None
        return {
            "step": step,
            "share_mean": [s["mean"] for s in shares],
            "share_p90": [s["p90"] for s in shares],
            "share_max": [s["max"] for s in shares],
            "lse_mean": [s["lse_mean"] for s in shares],
            "feature_spread": [s["feature_spread"] for s in shares],
            "z_abs": [z.detach().abs().mean().item() for z, _ in effective],
            "k_abs": [k.detach().abs().mean().item() for _, k in effective],
            "grad_z": grads[0],
            "grad_k": grads[1],
        }


def _feature_spread(phi: torch.Tensor) -> float:
    """Mean total-variation distance between each row's normalised features and its head's mean (rows of all
    sequences of the batch pooled per head)."""
    total = phi.sum(dim=-1, keepdim=True)
    normalised = phi / total.clamp_min(torch.finfo(phi.dtype).tiny)
    rows = normalised.transpose(0, 1).flatten(1, 2)  # (H, B·L, r)
    distance = 0.5 * (rows - rows.mean(dim=1, keepdim=True)).abs().sum(dim=-1)
    return distance.mean().item()


def _norm(grad: Optional[torch.Tensor]) -> float:
    return math.nan if grad is None else grad.detach().float().norm().item()
