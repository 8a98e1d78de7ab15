"""Tier planners: what decides the tier map of every matrix before a method prunes it.

``prune`` builds one planner from its :class:`~pruning.patterns.Pattern` and
:class:`~pruning.planning.policy.TierPolicy` (:func:`make_planner`). The planner sees the model
once before the layer loop (``prepare``: model-wide work, such as scoring every matrix of the
unpruned model) and then each decoder layer in its turn (``for_layer``: ``{name in the layer:
MatrixPlan(tier map int8 [ceil(out/B), ceil(in/B)], K, bits)}``). A matrix it leaves out ranks
its own blocks by the pattern's rule inside the method (or has no tiers at all).

============  ==========================================  =======================================
planner       when                                        decides
============  ==========================================  =======================================
TierPlanner   fixed ratios per matrix or per block-row;    nothing: every matrix ranks its own
              patterns without tiers                      blocks
JointRanking  fixed ratios, ranking ``layer`` / ``model``   the blocks of a layer's / the model's
                                                          matrices ranked together by score
ByteBudget    a byte budget (per matrix, layer, model)    every block's tier at the least loss
                                                          for the bytes (allocation.py), below
                                                          an earlier prune's tiers if given
Demotion      fixed ratios after an earlier prune         each matrix's last map, demoted one
              (a progressive step)                        tier at a time (the research code's rule)
============  ==========================================  =======================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from sparse_kernels.rules import tier_grid

from ..methods import Method, get_method, quant_proxy
from ..models import decoder_layers, get_weight, layer_of, named_linears
from ..patterns import Pattern, block_scores, demote_tiers, kept_block_scores, rank_blocks_jointly
from ..statistics import LinearStats, layerwise
from .allocation import allocate_choices, budget_shares, matrix_costs
from .policy import TierPolicy

__all__ = ["PlanContext", "MatrixPlan", "TierPlanner", "JointRanking", "ByteBudget",
           "Demotion", "make_planner", "uncalibrated_stats"]


class MatrixPlan(NamedTuple):
    """What a planner decided for one matrix: its tier map, its K and its values' bits."""

    tier_map: torch.Tensor
    topk: int
    bits: int


# What a planner returns for one decoder layer: {name in the layer: MatrixPlan}.
LayerPlan = dict[str, MatrixPlan]


@dataclass
class PlanContext:
    """What a planner may use before the layer loop.

    batches: calibration token ids ``[batch, seqlen]`` (empty when the method needs none).
    row_weights: ``{full name: [out]}`` gradient sensitivity of each Linear, or None.
    unpruned: ``{full name: LinearStats}`` of the unpruned model (its activations, for a
    planner that ``wants_unpruned_activations``), empty when that pass did not run.
    """

    model: nn.Module
    method: Method
    batches: list[torch.Tensor]
    device: torch.device | str | None = None
    progress: bool = True
    row_weights: dict[str, torch.Tensor] | None = None
    unpruned: dict[str, LinearStats] = dataclasses.field(default_factory=dict)


def uncalibrated_stats(name: str, row_weights: dict | None) -> LinearStats:
    """The statistics of a Linear that saw no calibration: none, or its row sensitivity."""
    return LinearStats(out_sensitivity=None if row_weights is None else row_weights[name])


def _block_scores(method: Method, module: nn.Module, stats: LinearStats | None,
                  block_size: int) -> torch.Tensor:
    """Mean importance of each block of one weight, by the method's own scores."""
    return block_scores(method.scores(get_weight(module).detach(), stats), block_size)


def _joint(scores: dict[str, torch.Tensor], pattern: Pattern) -> dict[str, torch.Tensor]:
    """Tier maps with all the given matrices' blocks ranked together."""
    names = list(scores)
    return dict(zip(names, rank_blocks_jointly([scores[n] for n in names], pattern)))


class TierPlanner:
    """Decides nothing: every matrix ranks its own blocks by the pattern (the base of the
    others, and the planner of fixed ratios per matrix and of patterns without tiers)."""

    # Whether prepare() needs the unpruned model's statistics (PlanContext.unpruned).
    wants_unpruned_activations = False

    def __init__(self, pattern: Pattern, policy: TierPolicy):
        self.pattern, self.policy = pattern, policy
        self.method: Method | None = None

    def prepare(self, context: PlanContext) -> None:
        self.method = context.method

    def for_layer(self, layer_name: str, linears: dict[str, nn.Module],
                  stats: dict[str, LinearStats]) -> LayerPlan:
        return {}


class JointRanking(TierPlanner):
    """Fixed tier ratios over the blocks of a whole decoder layer (``ranking="layer"``) or of the
    whole model (``"model"``: scored on the unpruned model before any layer is pruned). The
    scores must be comparable across matrices: the method's, weighted by the gradient
    sensitivity where there is one."""

    def __init__(self, pattern: Pattern, policy: TierPolicy):
        super().__init__(pattern, policy)
        self.maps: dict[str, torch.Tensor] | None = None  # a model-wide ranking, by full name

    def prepare(self, context: PlanContext) -> None:
        super().prepare(context)
        if self.policy.ranking != "model":
            return
        b = self.pattern.block_size
        if not (self.method.needs_activations or self.method.needs_hessian):  # the weights alone
            self.maps = _joint({n: _block_scores(self.method, m,
                                                 uncalibrated_stats(n, context.row_weights), b)
                                for n, m in named_linears(context.model).items()}, self.pattern)
            return
        scores = {}

        def collect(layer_name, _layer, linears, stats):
            for name, module in linears.items():
                scores[f"{layer_name}.{name}"] = _block_scores(self.method, module, stats[name],
                                                               b).cpu()

        layerwise(context.model, context.batches, collect,
                  needs_hessian=self.method.needs_hessian, device=context.device,
                  progress=context.progress, desc="scoring layers",
                  sensitivity=context.row_weights)
        self.maps = _joint(scores, self.pattern)

    def for_layer(self, layer_name, linears, stats) -> LayerPlan:
        k, bits = self.pattern.topk, self.pattern.bits
        if self.maps is not None:
            prefix = layer_name + "."
            return {n[len(prefix):]: MatrixPlan(t, k, bits) for n, t in self.maps.items()
                    if n.startswith(prefix)}
        scores = {n: _block_scores(self.method, m, stats[n], self.pattern.block_size)
                  for n, m in linears.items()}
        return {n: MatrixPlan(t, k, bits) for n, t in _joint(scores, self.pattern).items()}


class ByteBudget(TierPlanner):
    """Every block takes the tier that minimises the method's loss proxy plus lambda times its
    bytes, the bytes meeting ``policy.budget`` per matrix, per decoder layer, or over the whole
    model (each layer then gets the share an allocation over the unpruned model gives it, and
    its matrices share that share by their actual proxies in its turn). ``caps``: ``{full name:
    tier map}`` of an earlier prune; no block takes a better tier than it had there."""

    def __init__(self, pattern: Pattern, policy: TierPolicy,
                 caps: dict[str, torch.Tensor] | None = None):
        super().__init__(pattern, policy)
        self.caps = caps or {}
        self.wants_unpruned_activations = policy.ranking == "model"
        self.layer_budgets: dict[str, float] = {}

    def prepare(self, context: PlanContext) -> None:
        super().prepare(context)
        if self.policy.ranking == "model":
            self.layer_budgets = self._layer_budgets(context)

    def _candidates(self, method: Method, linears: dict, stats: dict, prefix: str = "") -> dict:
        """``{name: [MatrixCost per candidate K and bits]}`` by the method's loss proxy, a
        low-bit candidate adding the estimated loss of rounding the weights it keeps
        (``quant_proxy``: the round-to-nearest error at the group's scale, weighted as the
        proxy weights a dropped weight); ``prefix`` + name: the full name, for errors and
        caps."""
        pairs = self.policy.candidates(self.pattern)
        candidates = {}
        for name, module in linears.items():
            weight = get_weight(module).detach()
            proxy = method.loss_proxy(weight, stats[name]).cpu()
            group = self.pattern.group_for(weight.shape[1])
            quant = {b: None if b == 16 else quant_proxy(proxy, weight.cpu(), b, group)
                     for b in self.policy.candidate_bits(self.pattern)}
            costs = matrix_costs(proxy, pairs, self.pattern.block_size,
                                 self.policy.budget_dtype or weight.dtype, prefix + name,
                                 quant=quant, group_size=group)
            cap = self.caps.get(prefix + name)
            candidates[name] = costs if cap is None else \
                [dataclasses.replace(c, best_tier=cap.to(torch.int8).cpu()) for c in costs]
        return candidates

    def _layer_budgets(self, context: PlanContext) -> dict[str, float]:
        """Each decoder layer's budget fraction when the whole model shares the budget. Methods
        that need the Hessian are represented by Wanda's diagonal proxy here (every layer's
        Hessian at once would not fit a large model)."""
        proxy_method = get_method("wanda") if self.method.needs_hessian else self.method
        linears = named_linears(context.model)
        candidates = self._candidates(proxy_method, linears,
                                      {n: context.unpruned.get(n, LinearStats())
                                       for n in linears})
        shares = budget_shares(allocate_choices(candidates, self.policy.budget,
                                                allow_topk=self.policy.allow_topk))
        path = decoder_layers(context.model)[0]
        spent, dense = {}, {}
        for name, share in shares.items():
            layer = layer_of(name, path)
            size = candidates[name][0].dense_nbytes
            spent[layer] = spent.get(layer, 0.0) + share * size
            dense[layer] = dense.get(layer, 0) + size
        return {layer: spent[layer] / dense[layer] for layer in spent}

    def for_layer(self, layer_name, linears, stats) -> LayerPlan:
        budget = self.layer_budgets.get(layer_name, self.policy.budget)
        candidates = self._candidates(self.method, linears, stats, layer_name + ".")
        allow_topk = self.policy.allow_topk
        if self.policy.ranking == "matrix":
            chosen = {n: allocate_choices({n: c}, budget, allow_topk=allow_topk)[n]
                      for n, c in candidates.items()}
        else:
            chosen = allocate_choices(candidates, budget, allow_topk=allow_topk)
        return {n: MatrixPlan(t, cost.topk, cost.bits) for n, (t, cost) in chosen.items()}


class Demotion(TierPlanner):
    """A progressive step with fixed ratios: each matrix's last tier map (``previous``, by full
    name; all dense where there is none), its lowest-scoring dense blocks demoted to 2:4 and its
    2:4 blocks with the lowest score over their remaining weights to top-K, until the ratios
    hold (:func:`pruning.patterns.demote_tiers`)."""

    def __init__(self, pattern: Pattern, policy: TierPolicy, previous: dict[str, torch.Tensor]):
        super().__init__(pattern, policy)
        self.previous = previous

    def for_layer(self, layer_name, linears, stats) -> LayerPlan:
        b = self.pattern.block_size
        plan = {}
        for name, module in linears.items():
            weight = get_weight(module).detach()
            scores = self.method.scores(weight, stats[name])
            last = self.previous.get(f"{layer_name}.{name}",
                                     torch.zeros(tier_grid(*weight.shape, b), dtype=torch.int8))
            plan[name] = MatrixPlan(demote_tiers(last.cpu(), block_scores(scores, b).cpu(),
                                                 kept_block_scores(scores, weight, b).cpu(),
                                                 self.pattern.tier_ratios),
                                    self.pattern.topk, self.pattern.bits)
        return plan


def make_planner(pattern: Pattern, policy: TierPolicy,
                 previous: dict[str, torch.Tensor] | None = None) -> TierPlanner:
    """The planner of a prune (the table in the module docstring); ``previous``: the tier maps of
    an earlier prune of the model (a progressive step, three_tier only)."""
    if previous is not None and pattern.kind != "three_tier":
        raise ValueError(f"previous_tier_maps (a progressive step) applies to three_tier, got "
                         f"pattern {pattern.name!r}")
    if policy.budget is not None:
        return ByteBudget(pattern, policy, caps=previous)
    if previous is not None:
        if policy.ranking != "matrix" or pattern.per_row:
            raise ValueError("a progressive step with fixed ratios demotes per matrix "
                             "(ranking='matrix')")
        return Demotion(pattern, policy, previous)
    if pattern.uses_tiers and policy.ranking != "matrix":
        return JointRanking(pattern, policy)
    return TierPlanner(pattern, policy)
