"""How much each unit matters: one pass over the calibration samples, four importance measures.

:func:`unit_statistics` runs every calibration sample through the model forward and backward
(batch 1, the LM loss averaged over the sample's tokens) and keeps, for every weight of every
projection the units live in, the sum of the gradients ``G = sum_s dL_s/dW``, the sum of their
squares ``F = sum_s (dL_s/dW)^2`` (the diagonal Fisher, which stands in for the Hessian's
diagonal; only its per-unit sums ``sum_unit W^2 F`` are kept, so the pass holds one fp32 copy of
the weights, not two) and, per input column, the squared norm of the inputs (Wanda's statistic).

:func:`unit_importance` then sums over each unit's weights (its q/k/v or gate/up rows and its
o/down columns):

* ``magnitude``: ``|W|``;
* ``wanda``: ``|W_ij| * ||X_j||``;
* ``taylor``: ``|W * G|`` (first-order estimate of the loss change when the weight goes);
* ``taylor_2nd``: ``|W * G| + 0.5 * |W^2 * F|`` (adds the second-order term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from torch import nn

from ..models import decoder_layers, module_device, next_token_loss, statistics_pass
from .units import ATTENTION, MLP, LayerUnits

__all__ = ["IMPORTANCES", "UnitStatistics", "unit_statistics", "unit_importance"]

IMPORTANCES = ("taylor", "taylor_2nd", "wanda", "magnitude")


@dataclass
class UnitStatistics:
    """Per projection (full module name): ``grad`` ``[out, in]`` fp32, the gradients summed over
    samples, and ``act_sq`` ``[in]`` fp32, the summed squared inputs; per ``(layer, kind)``:
    ``fisher_units`` ``[units]`` fp32, ``sum over samples and the unit's weights of
    W^2 (dL_s/dW)^2``; ``samples`` counted."""

    grad: dict[str, torch.Tensor]
    fisher_units: dict[tuple[int, str], torch.Tensor]
    act_sq: dict[str, torch.Tensor]
    samples: int
    # The same sums over the first samples only (``unit_statistics(..., halfway=True)``): with
    # :meth:`minus` the statistics of two independent halves, whose rankings must agree.
    first_half: UnitStatistics | None = None

    def minus(self, other: UnitStatistics) -> UnitStatistics:
        """The statistics of the samples in ``self`` but not in ``other`` (sums subtract)."""
        return UnitStatistics({n: g - other.grad[n] for n, g in self.grad.items()},
                              {k: f - other.fisher_units[k] for k, f in self.fisher_units.items()},
                              {n: a - other.act_sq[n] for n, a in self.act_sq.items()},
                              self.samples - other.samples)


def _projections(model: nn.Module, units: list[LayerUnits]) -> dict[str, nn.Linear]:
    path, layers = decoder_layers(model)
    out = {}
    for u in units:
        for name in (u.q, u.k, u.v, u.o, u.contract, *u.expand):
            out[f"{path}.{u.index}.{name}"] = layers[u.index].get_submodule(name)
    return out


def unit_statistics(model: nn.Module, units: list[LayerUnits], batches: list[torch.Tensor], *,
                    gradients: bool = True, halfway: bool = False,
                    progress: bool = True) -> UnitStatistics:
    """The statistics of the module docstring. ``batches``: token ids ``[batch, seqlen]``, each
    row one sample with its own backward. Without ``gradients`` only the inputs are recorded
    (enough for ``wanda`` and ``magnitude``); with ``halfway`` the result also holds, as
    ``first_half``, the sums over the first half of the samples. Parameters' ``requires_grad``
    and the training flag are restored; weights are not changed."""
    projections = _projections(model, units)
    device = module_device(model.get_input_embeddings())
    act_sq = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
              for n, m in projections.items()}
    grad = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in projections.items()} \
        if gradients else {}
    fisher = {}

    def record_input(name):
        def hook(_module, args):
            x = args[0].detach().float()
            act_sq[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        return hook

    handles = [m.register_forward_pre_hook(record_input(n)) for n, m in projections.items()]
    samples = [row[None] for ids in batches for row in ids]
    weights = [m.weight for m in projections.values()] if gradients else []
    first_half = None
    with statistics_pass(model, handles, trainable=weights):
        for i, ids in enumerate(tqdm(samples, desc="unit statistics", disable=not progress)):
            if halfway and i == len(samples) // 2:
                first_half = UnitStatistics(_copy(grad), _copy(fisher), _copy(act_sq), i)
            ids = ids.to(device)
            if not gradients:
                with torch.no_grad():
                    model(ids, use_cache=False)
                continue
            with torch.enable_grad():
                next_token_loss(model, ids).backward()
            for n, m in projections.items():
                grad[n] += m.weight.grad.float()
            sample = _unit_sums(model, units, lambda name, w: (w.detach().float()
                                                              * w.grad.float()).pow(2))
            for key, value in sample.items():
                fisher[key] = fisher.get(key, 0) + value
            for m in projections.values():
                m.weight.grad = None
    return UnitStatistics(grad, fisher, act_sq, len(samples), first_half)


def _copy(sums: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sums.items()}


def _unit_sums(model: nn.Module, units: list[LayerUnits], per_weight) -> dict:
    """``{(layer, kind): [units] fp32}``: ``per_weight(full name, weight) -> [out, in]`` summed
    over each unit's rows of q/k/v (gate/up) and columns of o (down)."""
    path, layers = decoder_layers(model)
    out = {}
    for u in units:
        layer = layers[u.index]

        def values(name):
            return per_weight(f"{path}.{u.index}.{name}", layer.get_submodule(name).weight)

        d, gs = u.head_dim, u.group_size
        rows = (values(u.q).sum(1).reshape(u.groups, gs * d).sum(1)
                + values(u.k).sum(1).reshape(u.groups, d).sum(1)
                + values(u.v).sum(1).reshape(u.groups, d).sum(1))
        out[(u.index, ATTENTION)] = rows + values(u.o).sum(0).reshape(u.groups, gs * d).sum(1)
        out[(u.index, MLP)] = sum(values(n).sum(1) for n in u.expand) \
            + values(u.contract).sum(0)
    return out


def unit_importance(model: nn.Module, units: list[LayerUnits], method: str,
                    stats: UnitStatistics | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): importance [units] fp32}`` for every layer's attention groups and MLP
    channels (see the module docstring)."""
    if method not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {method!r}")
    if method != "magnitude" and stats is None:
        raise ValueError(f"importance {method!r} needs calibration statistics (unit_statistics)")
    if method.startswith("taylor") and not stats.grad:
        raise ValueError(f"importance {method!r} needs the gradient statistics "
                         "(unit_statistics(..., gradients=True))")

    def per_weight(name, weight):
        w = weight.detach().float()
        if method == "magnitude":
            return w.abs()
        if method == "wanda":
            return w.abs() * stats.act_sq[name].to(w.device).sqrt()[None, :]
        return (w * stats.grad[name].to(w.device)).abs()

    sums = _unit_sums(model, units, per_weight)
    if method == "taylor_2nd":
        sums = {key: value + 0.5 * stats.fisher_units[key].to(value.device)
                for key, value in sums.items()}
    return sums
