"""Magnitude pruning: importance ``|W|``, no calibration data needed.

Unstructured uses one threshold over the whole matrix (the upstream rule), exactly
``int(numel * sparsity)`` weights pruned; N:M and tiered patterns select by ``|W|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import Pattern, build_mask
from ..statistics.stats import LinearStats
from . import LayerPruning, check_pattern, check_weight, rounded, weight_rows


@dataclass(frozen=True)
class Magnitude:
    name: ClassVar[str] = "magnitude"
    needs_hessian: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False

    def scores(self, weight: torch.Tensor, stats: LinearStats | None = None) -> torch.Tensor:
        """``|W|`` in fp32 (``stats`` may be None; only its ``out_sensitivity`` is used)."""
        return weight_rows(check_weight(weight).float().abs(), stats, 0.5)

    def loss_proxy(self, weight: torch.Tensor, stats: LinearStats | None = None) -> torch.Tensor:
        """``scores^2``: ``W^2`` (times the row's sensitivity)."""
        return self.scores(weight, stats).pow(2)

    def prune(self, weight: torch.Tensor, stats: LinearStats | None, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning:
        pattern = check_pattern(pattern, tier_map)
        if pattern.use_variant:
            raise ValueError("use_variant is Wanda's cumulative-score variant; magnitude "
                             "pruning does not support it (use method 'wanda')")
        weight = check_weight(weight)
        mask, tiers = build_mask(self.scores(weight, stats), pattern, unstructured="matrix",
                                 weight=weight, tier_map=tier_map)
        return rounded(weight, LayerPruning(mask, tiers, None), pattern)
