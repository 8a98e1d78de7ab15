"""Wanda (Sun et al., 2023): importance ``S_ij = |W_ij| * sqrt(act_sq_norm_j)``, no update.

Unstructured prunes per output row the ``int(in * sparsity)`` lowest scores (stable sort), or,
with ``pattern.use_variant``, the per-row cumulative-score variant; N:M and tiered patterns
select by ``S`` (tiers: blocks ranked by mean ``S``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import sparse_kernels as sk

from ..patterns import Pattern, build_mask
from ..statistics.stats import LinearStats
from . import (LayerPruning, check_activations, check_pattern, check_weight, rounded,
               weight_rows)


@dataclass(frozen=True)
class Wanda:
    name: ClassVar[str] = "wanda"
    needs_hessian: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """``|W| * sqrt(stats.act_sq_norm)`` in fp32 ``[out, in]`` (times the square root of the
        row's sensitivity)."""
        weight = check_weight(weight)
        act = check_activations(self.name, weight, stats)
        return weight_rows(sk.wanda_scores(weight, act, 16)[0], stats, 0.5)

    def loss_proxy(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """``scores^2 = W^2 * act_sq_norm``: the squared output error of dropping each weight,
        summed over a sample's tokens, when the inputs are uncorrelated."""
        return self.scores(weight, stats).pow(2)

    def prune(self, weight: torch.Tensor, stats: LinearStats, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning:
        pattern = check_pattern(pattern, tier_map)
        weight = check_weight(weight)
        mask, tiers = build_mask(self.scores(weight, stats), pattern, unstructured="row",
                                 weight=weight, tier_map=tier_map)
        return rounded(weight, LayerPruning(mask, tiers, None), pattern)
