"""Tier allocation under a byte budget: which blocks stay dense, go 2:4 or keep their top-K.

Every ``B x B`` block of a weight can be stored in three tiers. Tier ``t`` costs the block
``c_t`` bytes (:func:`sparse_kernels.rules.tier_block_nbytes`: exactly what ``HybridWeight``
stores, metadata and block index included) and loses ``L_t``: the estimated damage of the weights
that tier drops, the sum of a per-weight *loss proxy* over them (:func:`tier_losses`; for Wanda
the proxy is ``S^2 = W^2 * ||X_j||^2``, for SparseGPT the OBS saliency ``W^2 / [H^-1]_jj``).

Minimising the total loss under a byte budget is a multiple-choice knapsack. Its Lagrangian
relaxation - every block takes the tier minimising ``L_t + lambda * c_t``, ``lambda`` set so the
bytes meet the budget - is solved exactly here without searching for ``lambda``: every block
starts in its cheapest tier, and each step up its lower convex hull of ``(c_t, L_t)`` points
(top-K -> 2:4 -> dense, or top-K -> dense when 2:4 is not on the hull) is an *upgrade* that
saves ``rate`` loss per byte. Taking upgrades in order of falling rate until the next one would
overspend is the Lagrangian solution for ``lambda`` = the rate of the last upgrade taken, and the
bytes land within one upgrade (at most one block's dense bytes) below the budget. Because the
rates only fall along the order, a larger budget takes a longer prefix: the loss never rises with
the budget.

Several matrices share one budget (a decoder layer, or the whole model) when their proxies are
comparable: :func:`allocate` takes a list. Shapes: a proxy is ``[out, in]``, fp32, >= 0; tier
losses are ``[ceil(out/B), ceil(in/B), 3]`` float64 in the order of the tier codes
(dense, 2:4, top-K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_kernels.rules import (DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE, DEFAULT_TOPK, DENSE,
                                  SPARSE_24, TOPK, fixed_nbytes, packed_nbytes,
                                  tier_block_nbytes, tier_grid)

__all__ = ["MatrixCost", "tier_losses", "matrix_costs", "allocate", "choose_topk",
           "allocate_choices", "allocate_all", "minimum_budget", "budget_shares",
           "check_budget_value"]


@dataclass(frozen=True)
class MatrixCost:
    """What one matrix's allocation needs: its tier losses and what bytes it is measured in.

    losses: float64 ``[nbr, nbc, 3]`` (:func:`tier_losses`). out_features / in_features: the
    weight's shape. dtype: the float dtype the bytes are counted in (16-bit values, and the
    dense weight a budget is a fraction of). topk, block_size: the format's K and B. bits,
    group_size: the values' precision and (low-bit) the matrix's quantization group.
    best_tier: int8 ``[nbr, nbc]`` or None, the best tier each block may take (a progressive
    prune never promotes a block it demoted).
    """

    losses: torch.Tensor
    out_features: int
    in_features: int
    dtype: torch.dtype
    topk: int = DEFAULT_TOPK
    block_size: int = DEFAULT_BLOCK_SIZE
    best_tier: torch.Tensor | None = None
    bits: int = 16
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def block_costs(self) -> tuple[int, int, int]:
        return tier_block_nbytes(self.dtype, self.block_size, self.topk, self.bits)

    def nbytes(self, tier_map: torch.Tensor) -> int:
        """Packed bytes of this matrix with ``tier_map``."""
        return packed_nbytes(tier_map, self.out_features, self.in_features, self.dtype,
                             self.topk, self.block_size, self.bits, self.group_size)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the unpacked weight: what a budget fraction is a fraction of."""
        return self.out_features * self.in_features * torch.empty((), dtype=self.dtype
                                                                  ).element_size()

    @property
    def fixed_nbytes(self) -> int:
        return fixed_nbytes(self.out_features, self.in_features, self.block_size, self.bits,
                            self.group_size)


def _check_proxy(proxy: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(proxy, torch.Tensor) or proxy.dim() != 2:
        raise ValueError(f"{name}: the loss proxy must be a 2-D tensor [out, in], got "
                         f"{tuple(proxy.shape) if isinstance(proxy, torch.Tensor) else proxy!r}")
    if not proxy.dtype.is_floating_point:
        raise TypeError(f"{name}: the loss proxy must be floating point, got {proxy.dtype}")
    proxy = proxy.detach().float()
    finite = torch.isfinite(proxy)
    if not bool(finite.all()):
        r, c = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{name}: the loss proxy has a non-finite entry {float(proxy[r, c])} at "
                         f"[{r}, {c}]; check the weight and its calibration statistics")
    if bool((proxy < 0).any()):
        r, c = (int(i) for i in (proxy < 0).nonzero()[0])
        raise ValueError(f"{name}: the loss proxy must be >= 0 (the damage of dropping a "
                         f"weight), got {float(proxy[r, c])} at [{r}, {c}]")
    return proxy


def _blocks(t: torch.Tensor, b: int) -> torch.Tensor:
    """``[out, in]`` -> ``[nbr, nbc, B*B]``, edge blocks zero-padded."""
    out_f, in_f = t.shape
    nbr, nbc = tier_grid(out_f, in_f, b)
    padded = torch.nn.functional.pad(t, (0, nbc * b - in_f, 0, nbr * b - out_f))
    return padded.reshape(nbr, b, nbc, b).permute(0, 2, 1, 3).reshape(nbr, nbc, b * b)


def tier_losses(proxy: torch.Tensor, topk: int = DEFAULT_TOPK,
                block_size: int = DEFAULT_BLOCK_SIZE, name: str = "weight",
                quant: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of each block in each tier: float64 ``[nbr, nbc, 3]`` (dense, 2:4, top-K).

    proxy: ``[out, in]``, the estimated damage of dropping each weight (>= 0, finite). Dense
    drops nothing (0); 2:4 drops the 2 smallest of every aligned group of 4 input columns of a
    row; top-K drops all but the ``topk`` largest of the block. These are exactly the weights
    ``pruning.tier_mask`` drops when it selects by the same proxy. Edge blocks are padded with
    zero-loss entries. quant: ``[out, in]``, the estimated damage of rounding each weight to a
    low-bit grid (``pruning.methods.quant_proxy``): every tier adds it over the weights it keeps.
    """
    proxy = _check_proxy(proxy, name)
    b = block_size
    blocks = _blocks(proxy, b)
    nbr, nbc = blocks.shape[:2]
    total = blocks.sum(-1, dtype=torch.float64)
    # The 2 smallest of each group of 4 (a, b, c, d), by a sorting network: the smallest is the
    # lower of min(a, b) and min(c, d); the second is the lower of the other of those two and
    # the smaller of the two maxima.
    a, b_, c, d = blocks.reshape(nbr, nbc, b * b // 4, 4).unbind(-1)
    low1, high1 = torch.minimum(a, b_), torch.maximum(a, b_)
    low2, high2 = torch.minimum(c, d), torch.maximum(c, d)
    two_smallest = (torch.minimum(low1, low2) + torch.minimum(torch.maximum(low1, low2),
                                                             torch.minimum(high1, high2)))
    loss_24 = two_smallest.sum(-1, dtype=torch.float64)
    # fp32 selection, fp64 sums: the difference keeps its precision when top-K holds most of it.
    best = blocks.topk(min(topk, b * b), dim=-1, sorted=False)
    kept = best.values.sum(-1, dtype=torch.float64)
    loss_topk = (total - kept).clamp_min(0)
    losses = torch.stack([torch.zeros_like(total), loss_24, loss_topk], dim=-1)
    if quant is None:
        return losses
    q = _blocks(_check_proxy(quant, name).to(proxy.device), b)
    # The 2 of each group of 4 that 2:4 keeps (the largest proxies) and the top-K kept above.
    kept_24 = blocks.reshape(nbr, nbc, -1, 4).argsort(dim=-1, descending=True, stable=True)[
        ..., :2]
    q_24 = q.reshape(nbr, nbc, -1, 4).gather(-1, kept_24).sum((-1, -2), dtype=torch.float64)
    q_topk = q.gather(-1, best.indices).sum(-1, dtype=torch.float64)
    return losses + torch.stack([q.sum(-1, dtype=torch.float64), q_24, q_topk], dim=-1)


def minimum_budget(matrices: list[MatrixCost], allow_topk: bool = True) -> float:
    """The smallest budget fraction these matrices can meet: every block in its cheapest tier."""
    cheapest = TOPK if allow_topk else SPARSE_24
    need = sum(m.losses[..., 0].numel() * m.block_costs[cheapest] + m.fixed_nbytes
               for m in matrices)
    return need / sum(m.dense_nbytes for m in matrices)


def _upgrades(losses: torch.Tensor, costs: tuple[int, int, int], allow_topk: bool,
              best: torch.Tensor | None = None):
    """Start tiers ``[n]`` and the upgrades of ``n`` blocks along their convex hulls.

    ``best`` (int8 ``[n]``, optional): the best tier each block may take (a block demoted
    earlier is never promoted); a block capped at 2:4 can only step up to 2:4, one capped at
    top-K not at all. Returns ``(start, block, to, extra_bytes, rate)``; the upgrades are listed
    first-steps first, so a stable sort by falling rate never puts a block's second step before
    its first.
    """
    n = losses.shape[0]
    l_dense, l_24, l_topk = losses.unbind(1)
    c_dense, c_24, c_topk = costs
    ids = torch.arange(n)
    best = torch.full((n,), DENSE, dtype=torch.int8) if best is None else best.flatten()
    if not allow_topk:
        start = torch.full((n,), SPARSE_24, dtype=torch.int8)
        free = best == DENSE
        return (start, ids[free], torch.full((int(free.sum()),), DENSE, dtype=torch.int8),
                torch.full((int(free.sum()),), c_dense - c_24, dtype=torch.int64),
                ((l_24 - l_dense) / (c_dense - c_24))[free])
    start = torch.full((n,), TOPK, dtype=torch.int8)
    rate_to_24 = (l_topk - l_24) / (c_24 - c_topk)
    rate_24_to_dense = (l_24 - l_dense) / (c_dense - c_24)
    # 2:4 is on the hull when stepping through it saves at least as much per byte first; a
    # block capped at 2:4 has it as its only step.
    hull = (rate_to_24 >= rate_24_to_dense) | (best == SPARSE_24)
    first_to = torch.where(hull, SPARSE_24, DENSE).to(torch.int8)
    first_bytes = torch.where(hull, c_24 - c_topk, c_dense - c_topk).to(torch.int64)
    first_rate = torch.where(hull, rate_to_24, (l_topk - l_dense) / (c_dense - c_topk))
    # A capped block's step to 2:4 may lose more than it saves (top-K keeps its best weights
    # better): never take a step that raises the loss.
    first = (best != TOPK) & (first_rate >= 0)
    second = ids[hull & (best == DENSE)]
    block = torch.cat([ids[first], second])
    to = torch.cat([first_to[first], torch.full((len(second),), DENSE, dtype=torch.int8)])
    extra = torch.cat([first_bytes[first], torch.full((len(second),), c_dense - c_24,
                                                      dtype=torch.int64)])
    rate = torch.cat([first_rate[first], rate_24_to_dense[second]])
    return start, block, to, extra, rate


def check_budget_value(budget) -> float:
    """``budget`` as a float if it is a finite fraction > 0 of the dense bytes, else
    ``ValueError`` saying so (every entry point that takes a budget checks it here)."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number (packed bytes / dense bytes, e.g. 0.62), "
                         f"got {budget!r}") from None
    if not 0.0 < value < float("inf"):  # also rejects NaN
        raise ValueError(f"budget must be a finite fraction > 0 of the dense bytes (e.g. "
                         f"0.62), got {budget!r}")
    return value


def _check_budget(matrices: list[MatrixCost], budget, allow_topk: bool) -> tuple[float, float]:
    """``(budget as a float, the floor of matrices)`` (:func:`minimum_budget`), or
    ``ValueError`` naming the floor when the budget is below it."""
    budget = check_budget_value(budget)
    floor = minimum_budget(matrices, allow_topk)
    if budget < floor * (1 - 1e-9):  # (a share computed from bytes may round just below)
        cheapest = f"top-K, K={min(m.topk for m in matrices)}" if allow_topk else "2:4"
        raise ValueError(f"budget {budget:g} is below the smallest these weights can be packed "
                         f"in: {floor:.4f} of the dense bytes (every block {cheapest}); raise "
                         f"the budget to at least {floor:.4f}")
    return budget, floor


def allocate(matrices: list[MatrixCost], budget: float, *, allow_topk: bool = True
             ) -> list[torch.Tensor]:
    """Tier maps (int8 ``[nbr, nbc]``, one per matrix) minimising the summed loss of all the
    matrices with their packed bytes together at most ``budget`` x their dense bytes.

    ``allow_topk=False`` keeps every block dense or 2:4 (two tiers). Raises ``ValueError`` when
    ``budget`` is below :func:`minimum_budget`, naming it; a budget at or above the all-dense
    packed bytes (a little over 1: the block index) keeps every block dense.
    """
    if not matrices:
        return []
    return _allocate(matrices, *_check_budget(matrices, budget, allow_topk), allow_topk)


def _allocate(matrices: list[MatrixCost], budget: float, floor: float,
              allow_topk: bool) -> list[torch.Tensor]:
    """:func:`allocate` once the budget is known to be at least ``floor``."""
    starts, blocks, tos, extras, rates, firsts = [], [], [], [], [], []
    offset = 0
    for m in matrices:
        losses = m.losses.reshape(-1, 3).double().cpu()
        start, block, to, extra, rate = _upgrades(losses, m.block_costs, allow_topk,
                                                  m.best_tier)
        starts.append(start)
        blocks.append(block + offset)
        tos.append(to)
        extras.append(extra)
        rates.append(rate)
        # A block's second step (2:4 -> dense) is the later of its two entries.
        order = torch.arange(len(block))
        earliest = torch.full((losses.shape[0],), len(block), dtype=torch.int64)
        earliest.scatter_reduce_(0, block, order, reduce="amin")
        firsts.append(earliest[block] == order)
        offset += losses.shape[0]
    total_dense = sum(m.dense_nbytes for m in matrices)
    spare = max(int(budget * total_dense) - round(floor * total_dense), 0)
    # First steps of every matrix before any second step, so a stable sort keeps each block's
    # steps in hull order even between equal rates.
    tiers = torch.cat(starts)
    order_key = torch.cat(rates)
    block, to, extra = torch.cat(blocks), torch.cat(tos), torch.cat(extras)
    first = torch.cat(firsts)
    block, to, extra, order_key = (torch.cat([t[first], t[~first]])
                                   for t in (block, to, extra, order_key))
    order = torch.sort(order_key, descending=True, stable=True).indices
    spent = torch.cumsum(extra[order], 0)
    taken = order[: int((spent <= spare).sum())]
    tiers = tiers.scatter_reduce(0, block[taken], to[taken], reduce="amin")
    maps, offset = [], 0
    for m in matrices:
        n = m.losses.shape[0] * m.losses.shape[1]
        maps.append(tiers[offset:offset + n].reshape(m.losses.shape[:2]).contiguous())
        offset += n
    return maps


def _lagrangian(m: MatrixCost, lam: float, allow_topk: bool) -> tuple[float, int]:
    """``(min over tiers of loss + lam * bytes, summed over blocks; the bytes of that choice)``."""
    costs = torch.tensor(m.block_costs, dtype=torch.float64)
    penalised = m.losses.reshape(-1, 3).double().cpu() + lam * costs
    if not allow_topk:
        penalised[:, TOPK] = float("inf")
    best, tier = penalised.min(1)
    return float(best.sum()), int(costs[tier].sum()) + m.fixed_nbytes


def choose_topk(candidates: list[list[MatrixCost]], budget: float, *,
                allow_topk: bool = True) -> list[MatrixCost]:
    """For each matrix, which of its candidates (the same weight with different K and / or
    value precision) to allocate.

    Every matrix takes the K whose allocation is cheapest in ``loss + lambda * bytes``, with one
    ``lambda`` for all of them, found by bisection as the smallest that meets ``budget`` (the
    Lagrangian of the choice of K); :func:`allocate` then spends the budget exactly with those
    K. Matrices with one candidate keep it; without a top-K tier K does not matter.
    """
    if all(len(c) == 1 for c in candidates) or not allow_topk:
        return [c[0] for c in candidates]
    limit = budget * sum(c[0].dense_nbytes for c in candidates)

    def choice(lam):
        picked = [min(c, key=lambda m: _lagrangian(m, lam, allow_topk)[0]) for c in candidates]
        return picked, sum(_lagrangian(m, lam, allow_topk)[1] for m in picked)

    picked, spent = choice(0.0)
    if spent <= limit:  # everything fits dense: K does not matter
        return picked
    low, high = 0.0, 1.0
    while choice(high)[1] > limit and high < 1e300:
        low, high = high, high * 16
    for _ in range(64):  # bytes(lambda) only falls as lambda grows
        middle = (low + high) / 2 if low == 0.0 else (low * high) ** 0.5
        if choice(middle)[1] > limit:
            low = middle
        else:
            high = middle
    return choice(high)[0]


def matrix_costs(proxy: torch.Tensor, topks, block_size: int, dtype: torch.dtype,
                 name: str = "weight", *, quant: dict[int, torch.Tensor | None] | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE) -> list[MatrixCost]:
    """One :class:`MatrixCost` per candidate of a weight with loss proxy ``proxy [out, in]``:
    ``topks`` the candidate K (every one with every precision of ``quant``) or ``(K, bits)``
    pairs; bytes counted in ``dtype`` (16-bit values) or the codes' (low bits, in groups of
    ``group_size``). ``quant``: ``{bits: the weights' rounding loss [out, in], None for 16}``,
    default 16 bits only. A candidate whose top-K block is no cheaper than its 2:4 block is
    refused naming the K that would do, except at low bits while other candidates remain (a K
    meant for 16-bit values: low-bit values need a smaller one)."""
    out_f, in_f = proxy.shape
    quant = quant or {16: None}
    pairs = [p if isinstance(p, tuple) else None for p in topks]
    pairs = [p for p in pairs if p] or [(k, b) for b in quant for k in topks]
    costs, refused = [], ""
    for k, bits in pairs:
        cost = MatrixCost(tier_losses(proxy, k, block_size, name, quant[bits]), out_f, in_f,
                          dtype, k, block_size, bits=bits, group_size=group_size)
        _, two_four, topk = cost.block_costs
        if topk >= two_four:
            below = next(j for j in range(k, 0, -1)
                         if tier_block_nbytes(dtype, block_size, j, bits)[2] < two_four) + 1
            refused = (f"a top-K block with K={k} costs {topk} bytes in "
                       f"{dtype if bits == 16 else f'int{bits}'}, no less than a 2:4 block "
                       f"({two_four}): the top-K tier must be the cheapest; choose K below "
                       f"{below}")
            if bits == 16:
                raise ValueError(refused)
            continue
        costs.append(cost)
    if not costs:
        raise ValueError(refused)
    return costs


def allocate_choices(candidates: dict[str, list[MatrixCost]], budget: float, *,
                     allow_topk: bool = True) -> dict[str, tuple[torch.Tensor, MatrixCost]]:
    """``{name: (tier map, the candidate chosen)}``: the matrices share ``budget``, each with the
    candidate (K, precision) :func:`choose_topk` picks (:func:`matrix_costs`)."""
    names = list(candidates)
    cheapest = [min(candidates[n], key=lambda m: minimum_budget([m], allow_topk))
                for n in names]
    budget, _ = _check_budget(cheapest, budget, allow_topk)
    chosen = choose_topk([candidates[n] for n in names], budget, allow_topk=allow_topk)
    maps = _allocate(chosen, budget, minimum_budget(chosen, allow_topk), allow_topk)
    return {n: (t, m) for n, t, m in zip(names, maps, chosen)}


def allocate_all(candidates: dict[str, list[MatrixCost]], budget: float, *,
                 allow_topk: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (tier map, K)}`` of :func:`allocate_choices`."""
    return {n: (t, m.topk) for n, (t, m) in
            allocate_choices(candidates, budget, allow_topk=allow_topk).items()}


def budget_shares(choices: dict[str, tuple[torch.Tensor, MatrixCost]]) -> dict[str, float]:
    """Each matrix's packed bytes / dense bytes in an :func:`allocate_choices` result."""
    return {name: cost.nbytes(tiers) / cost.dense_nbytes
            for name, (tiers, cost) in choices.items()}
