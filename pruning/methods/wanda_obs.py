"""Wanda mask + OBS update (the "ablate" method of the Wanda paper): the Wanda mask for the
pattern is computed first (per-row unstructured, its variant, N:M, or tiers by Wanda scores),
then SparseGPT's OBS sweep runs with that mask fixed (:func:`.sparsegpt.obs_update`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import Pattern
from ..statistics.stats import LinearStats
from . import LayerPruning, check_hessian, check_pattern, check_weight
from .sparsegpt import obs_update
from .wanda import Wanda


@dataclass(frozen=True)
class WandaOBS:
    """Wanda's mask, SparseGPT's weight update (``blocksize``, ``percdamp`` as SparseGPT)."""

    blocksize: int = 128
    percdamp: float = 0.01
    name: ClassVar[str] = "wanda_obs"
    needs_hessian: ClassVar[bool] = True
    needs_activations: ClassVar[bool] = True

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """Wanda's scores ``|W| * sqrt(act_sq_norm)`` (the mask is chosen by them)."""
        return Wanda().scores(weight, stats)

    def loss_proxy(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """Wanda's proxy (the mask is chosen by it; the update then lowers the real loss)."""
        return Wanda().loss_proxy(weight, stats)

    def prune(self, weight: torch.Tensor, stats: LinearStats, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning:
        pattern = check_pattern(pattern, tier_map)
        weight = check_weight(weight)
        hessian = check_hessian(self.name, weight, stats)
        chosen = Wanda().prune(weight, stats, dataclasses.replace(pattern, bits=16), tier_map)
        new, kept, scales = obs_update(weight, hessian, chosen.mask, blocksize=self.blocksize,
                                       percdamp=self.percdamp, nsamples=stats.nsamples,
                                       bits=pattern.bits,
                                       group_size=pattern.group_for(weight.shape[1]))
        return LayerPruning(kept, chosen.tier_map, new, scales)
