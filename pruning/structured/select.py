"""Which units go: one global list of every unit, cheapest score first.

``score = importance / parameter cost`` (times the H-GSP prior when it is on). The longest prefix
of the ascending list whose cost fits ``ratio * total parameters`` is removed, with two guards:

* a block never loses its last unit (a layer keeps at least one attention group and one MLP
  channel), except that
* with ``epsilon > 0`` a layer whose kept fraction of unit parameters falls below ``epsilon``
  is **collapsed**: all of its units go and the layer becomes the identity (it is deleted from
  the model). The parameters a collapse frees count against the budget, and the prefix is
  recomputed over the remaining units until no further layer collapses; one layer always
  stays. A collapse can overshoot the budget by what the layer still kept (< epsilon of it).

``uniform``: every layer removes the same number of attention groups and of MLP channels (the
global list decides the two numbers and, in each layer, which units), so one config describes
every layer and stock ``from_pretrained`` can load the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .units import ATTENTION, MLP

__all__ = ["Plan", "select_units"]


@dataclass
class Plan:
    """``removed[(layer, kind)]``: sorted unit indices that go; ``collapsed``: layers deleted
    whole; ``removed_params`` out of ``total_params`` (the model's parameter count)."""

    removed: dict[tuple[int, str], list[int]]
    collapsed: list[int] = field(default_factory=list)
    removed_params: int = 0
    total_params: int = 0

    @property
    def fraction(self) -> float:
        return self.removed_params / self.total_params


def _check(ratio: float, epsilon: float) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"ratio is the fraction of the parameters to remove: 0 < ratio < 1, "
                         f"got {ratio}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon is a kept fraction below which a layer collapses: "
                         f"0 <= epsilon < 1 (0: never), got {epsilon}")


def _ascending(scores: dict, skip: set) -> list[tuple[float, int, str, int]]:
    order = [(float(s), layer, kind, i) for (layer, kind), values in scores.items()
             if layer not in skip for i, s in enumerate(values.tolist())]
    order.sort()
    return order


def _greedy(scores, costs, counts, budget, skip):
    """Units taken in ascending order while they fit, keeping one unit per block."""
    removed = {key: [] for key in scores if key[0] not in skip}
    spent = 0
    for _, layer, kind, i in _ascending(scores, skip):
        key = (layer, kind)
        if len(removed[key]) + 1 >= counts[key]:
            continue  # the block's last unit stays
        if spent + costs[key] > budget:
            break  # the longest prefix that fits
        removed[key].append(i)
        spent += costs[key]
    return removed, spent


def _uniform(scores, costs, counts, budget):
    layers = sorted({layer for layer, _ in scores})
    prefix, _ = _greedy(scores, costs, counts, budget, set())
    per_kind = {kind: round(sum(len(prefix[(l, kind)]) for l in layers) / len(layers))
                for kind in (ATTENTION, MLP)}
    per_kind = {kind: min(n, min(counts[(l, kind)] for l in layers) - 1)
                for kind, n in per_kind.items()}

    def cost(n_attention, n_mlp):
        return sum(n_attention * costs[(l, ATTENTION)] + n_mlp * costs[(l, MLP)] for l in layers)

    # Whole groups are coarse: fit the budget with the channels, the fine unit.
    n_att = per_kind[ATTENTION]
    while n_att > 0 and cost(n_att, 0) > budget:
        n_att -= 1
    mlp_cost = sum(costs[(l, MLP)] for l in layers)
    n_mlp = max(0, int((budget - cost(n_att, 0)) // mlp_cost))
    n_mlp = min(n_mlp, min(counts[(l, MLP)] for l in layers) - 1)
    removed = {}
    for l in layers:
        for kind, n in ((ATTENTION, n_att), (MLP, n_mlp)):
            removed[(l, kind)] = torch.argsort(scores[(l, kind)])[:n].tolist()
    return removed, cost(n_att, n_mlp)


def select_units(scores: dict[tuple[int, str], torch.Tensor], costs: dict[tuple[int, str], int],
                 ratio: float, total_params: int, *, epsilon: float = 0.0,
                 uniform: bool = False) -> Plan:
    """The :class:`Plan` for removing ``ratio * total_params`` parameters.

    scores: ``{(layer, kind): [units]}`` (lower goes first); costs: parameters per unit of each
    ``(layer, kind)``. Raises when the budget exceeds what the guards let go.
    """
    _check(ratio, epsilon)
    if uniform and epsilon:
        raise ValueError("uniform keeps every layer the same size: it cannot collapse layers "
                         "(give epsilon=0)")
    for key, s in scores.items():
        if not torch.isfinite(s).all():
            raise ValueError(f"layer {key[0]} {key[1]}: the unit scores have NaN or infinite "
                             "values")
    counts = {key: len(s) for key, s in scores.items()}
    budget = int(ratio * total_params)
    removable = sum((counts[k] - 1) * costs[k] for k in scores)
    if budget > removable and not epsilon:
        raise ValueError(f"ratio {ratio} asks for {budget:,} of {total_params:,} parameters but "
                         f"the units hold {removable:,} that can go with one unit kept per block "
                         f"(at most ratio {removable / total_params:.3f}; epsilon > 0 lets whole "
                         "layers collapse)")
    if uniform:
        removed, spent = _uniform(scores, costs, counts, budget)
        return Plan({k: sorted(v) for k, v in removed.items()}, [], spent, total_params)
    layers = sorted({layer for layer, _ in scores})
    layer_params = {l: sum(counts[(l, k)] * costs[(l, k)] for k in (ATTENTION, MLP))
                    for l in layers}
    collapsed: set[int] = set()
    while True:
        freed = sum(layer_params[l] for l in collapsed)
        removed, spent = _greedy(scores, costs, counts, budget - freed, collapsed)
        kept = {l: 1 - sum(len(removed[(l, k)]) * costs[(l, k)] for k in (ATTENTION, MLP))
                / layer_params[l] for l in layers if l not in collapsed}
        newly = {l for l, fraction in kept.items() if fraction < epsilon}
        if len(newly) == len(kept):  # one layer always stays: the one that keeps the most
            newly.discard(max(kept, key=kept.get))
        if not newly:
            break
        collapsed |= newly
    for l in collapsed:
        for kind in (ATTENTION, MLP):
            removed[(l, kind)] = list(range(counts[(l, kind)]))
    return Plan({k: sorted(v) for k, v in removed.items()}, sorted(collapsed),
                spent + sum(layer_params[l] for l in collapsed), total_params)
