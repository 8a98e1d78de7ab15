"""Pruning methods: pure functions from one weight matrix and its calibration statistics to a mask
(plus a tier map for tiered patterns, plus the updated weight for OBS methods).

Every method has the same interface (:class:`Method`); the layer-by-layer driver picks one by
name with :func:`get_method` and never needs to know which it has:

* ``needs_hessian`` / ``needs_activations`` tell the driver what to accumulate in
  :class:`pruning.statistics.LinearStats`;
* ``scores(weight, stats)`` is the importance the method ranks by (fp32 ``[out, in]``, >= 0),
  e.g. to rank blocks across matrices for ``ranking="layer"`` / ``"model"``;
* ``loss_proxy(weight, stats)`` is the estimated damage of dropping each weight (fp32
  ``[out, in]``, >= 0, ranked as ``scores``), summed over a block's dropped weights by the
  byte-budget allocation (:mod:`pruning.planning.allocation`);
* ``prune(weight, stats, pattern, tier_map=None)`` returns a :class:`LayerPruning`.

Methods never modify their inputs, work in fp32 and return new tensors. When the statistics
carry ``out_sensitivity`` (the gradient pass of :mod:`pruning.planning.sensitivity`), every score and
proxy weights output row ``i`` by it (:func:`weight_rows`); rankings inside a row do not change.

========== ===================================== ================= ============================
name       scores                                loss proxy        weight update
========== ===================================== ================= ============================
magnitude  ``|W|``                               ``scores^2``      none
wanda      ``|W| * sqrt(act_sq_norm)``           ``scores^2``      none
sparsegpt  ``W^2 / diag(U)^2`` (U = chol(H^-1))  ``W^2 H_jj / 2``   OBS sweep (SparseGPT)
wanda_obs  Wanda's                               Wanda's           OBS sweep, Wanda mask fixed
========== ===================================== ================= ============================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sparse_kernels.quant import round_to_grid

from ..patterns import Pattern, parse_pattern
from ..statistics.stats import LinearStats


@dataclass
class LayerPruning:
    """What a method decided for one weight matrix.

    mask: bool ``[out, in]``, True = kept.
    tier_map: int8 ``[ceil(out/B), ceil(in/B)]`` for tiered patterns (block, block_topk,
        three_tier), else None.
    weight: the updated weight of OBS methods, zeros already applied, in the input weight's
        dtype; None = "apply ``mask`` to the original weight".
    scales: low-bit patterns only: fp16 ``[out, ceil(in / G)]``, the group scales whose grid
        ``weight`` lies on (``sparse_kernels.quant``).
    """

    mask: torch.Tensor
    tier_map: torch.Tensor | None
    weight: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    def pruned_weight(self, original: torch.Tensor) -> torch.Tensor:
        """The weight to install: ``weight`` if the method updated it, else ``original`` masked."""
        if self.weight is not None:
            return self.weight
        return original.detach().masked_fill(~self.mask.to(original.device), 0)


@runtime_checkable
class Method(Protocol):
    name: str
    needs_hessian: bool
    needs_activations: bool

    def scores(self, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor: ...

    def loss_proxy(self, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor: ...

    def prune(self, weight: torch.Tensor, stats: LinearStats | None, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning: ...


# Shared input checks (used by the method modules, defined before they are imported).

def check_weight(weight: torch.Tensor) -> torch.Tensor:
    """A detached 2-D floating-point weight, or ValueError / TypeError."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    return weight.detach()


def check_activations(method: str, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor:
    """``stats.act_sq_norm`` as fp32 on the weight's device, checked against the weight."""
    act = getattr(stats, "act_sq_norm", None)
    if act is None:
        raise ValueError(f"{method} needs LinearStats.act_sq_norm (calibration activations); "
                         f"got {'no stats' if stats is None else 'stats without it'}")
    if tuple(act.shape) != (weight.shape[1],):
        raise ValueError(f"{method}: act_sq_norm has shape {tuple(act.shape)}, the weight "
                         f"{tuple(weight.shape)} needs ({weight.shape[1]},)")
    return act.detach().to(device=weight.device, dtype=torch.float32)


def check_hessian(method: str, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor:
    """``stats.hessian`` as fp32 on the weight's device, checked against the weight (a copy
    is not made here; callers clone before modifying)."""
    hessian = getattr(stats, "hessian", None)
    if hessian is None:
        raise ValueError(f"{method} needs LinearStats.hessian: accumulate it "
                         f"(LinearStats.empty(in_features, hessian=True))")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"{method}: hessian has shape {tuple(hessian.shape)}, the weight "
                         f"{tuple(weight.shape)} needs ({n}, {n})")
    return hessian.detach().to(device=weight.device, dtype=torch.float32)


def weight_rows(scores: torch.Tensor, stats: LinearStats | None, power: float) -> torch.Tensor:
    """``scores [out, in]`` with row ``i`` times ``out_sensitivity_i ** power`` when ``stats``
    carry it (power 1 for scores in loss units, 0.5 for scores in square-root units like |W|)."""
    sensitivity = getattr(stats, "out_sensitivity", None)
    if sensitivity is None:
        return scores
    if tuple(sensitivity.shape) != (scores.shape[0],):
        raise ValueError(f"out_sensitivity has shape {tuple(sensitivity.shape)}, the weight "
                         f"{tuple(scores.shape)} needs ({scores.shape[0]},)")
    row = sensitivity.detach().to(device=scores.device, dtype=torch.float32)
    return scores * (row if power == 1 else row.pow(power)).unsqueeze(1)


def rounded(weight: torch.Tensor, pruning: LayerPruning, pattern: Pattern) -> LayerPruning:
    """``pruning`` with a low-bit pattern's values rounded to the nearest codes of their groups
    (the cheap baseline to the OBS methods' joint sweep); unchanged for 16 bits."""
    if pattern.bits == 16:
        return pruning
    kept = pruning.pruned_weight(weight)
    grid, scales = round_to_grid(kept, pattern.bits, pattern.group_for(weight.shape[1]))
    return LayerPruning(pruning.mask, pruning.tier_map, grid.to(weight.dtype), scales)


def quant_proxy(proxy: torch.Tensor, weight: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """The estimated loss of rounding each weight to its ``bits`` grid (groups of
    ``group_size``): ``proxy * (e / w)^2`` with ``e`` the rounding error, i.e. the method's
    per-weight loss of dropping the weight scaled to the error actually made (0 for 16 bits
    and for zeros)."""
    if bits == 16:
        return torch.zeros_like(proxy)
    w = weight.detach().float()
    error = w - round_to_grid(w, bits, group_size)[0]
    ratio = torch.where(w != 0, error / torch.where(w != 0, w, torch.ones_like(w)), 0.0)
    return proxy * ratio.pow(2)


def check_pattern(pattern: Pattern | str, tier_map: torch.Tensor | None) -> Pattern:
    """A Pattern from a Pattern or a pattern name (default settings); rejects a tier_map for a
    pattern without tiers."""
    pattern = parse_pattern(pattern)
    if tier_map is not None and not pattern.uses_tiers:
        raise ValueError(f"a tier_map was given but pattern {pattern.name!r} has no tiers")
    return pattern


from .magnitude import Magnitude  # noqa: E402
from .sparsegpt import SparseGPT  # noqa: E402
from .wanda import Wanda  # noqa: E402
from .wanda_obs import WandaOBS  # noqa: E402

METHODS: dict[str, Method] = {
    "magnitude": Magnitude(),
    "wanda": Wanda(),
    "sparsegpt": SparseGPT(),
    "wanda_obs": WandaOBS(),
}


def get_method(name: str | Method, **options) -> Method:
    """The method called ``name`` (case-insensitive, ``-`` reads as ``_``); a method object
    passes through (with ``options`` applied).

    ``options`` override the method's settings (e.g. ``blocksize=64, percdamp=0.05`` for the
    OBS methods) and return a new instance; ``ValueError`` for an unknown name or option.
    """
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        if key not in METHODS:
            raise ValueError(f"unknown pruning method {name!r}; choose one of "
                             f"{', '.join(METHODS)}")
        method = METHODS[key]
    elif isinstance(name, Method):
        key, method = name.name, name
    else:
        raise ValueError(f"method must be a name ({', '.join(METHODS)}) or a method object, "
                         f"got {name!r}")
    if not options:
        return method
    fields = {f.name for f in dataclasses.fields(method)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {key!r} has no option(s) {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(fields)) or 'none'}")
    return dataclasses.replace(method, **options)


__all__ = ["LayerPruning", "Method", "weight_rows", "METHODS", "get_method", "Magnitude", "Wanda",
           "SparseGPT", "WandaOBS", "rounded", "quant_proxy"]
