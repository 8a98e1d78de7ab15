"""Byte-budget tier allocation: exact byte counts, the optimum on planted and brute-forced cases,
monotone loss, and the errors bad budgets and proxies get."""
import itertools

import pytest
import torch

import sparse_kernels as sk
from pruning.planning.allocation import (MatrixCost, allocate, allocate_all, allocate_choices,
                                         budget_shares, matrix_costs, minimum_budget,
                                         tier_losses)
from sparse_kernels import DENSE, SPARSE_24, TOPK, apply_tier_map
from sparse_kernels.rules import packed_nbytes, tier_block_nbytes


def matrix_cost(proxy, dtype, name="weight", topk=15) -> MatrixCost:
    (cost,) = matrix_costs(proxy, (topk,), 16, dtype, name)
    return cost


def loss_of(cost: MatrixCost, tiers: torch.Tensor) -> float:
    return float(cost.losses.reshape(-1, 3).gather(1, tiers.reshape(-1, 1).long()).sum())


def llm_like_proxy(out_f, in_f, seed=0):
    """Heavy-tailed: a few outlier input columns and output rows, as in LLM layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    col = torch.rand(in_f, generator=g).pow(4) * 10 + 0.1
    row = torch.rand(out_f, generator=g).pow(4) * 10 + 0.1
    return w.pow(2) * col * row.unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size, topk", [(16, 15), (8, 5), (12, 30), (4, 3)])
def test_byte_count_matches_the_packed_format(dtype, block_size, topk):
    out_f, in_f = 37, 70
    tiers = torch.randint(0, 3, sk.rules.tier_grid(out_f, in_f, block_size), dtype=torch.int8)
    weight = apply_tier_map(torch.randn(out_f, in_f), tiers, topk, block_size).to(dtype)
    packed = sk.HybridWeight.from_dense(weight, tiers, topk, block_size)
    assert packed_nbytes(tiers, out_f, in_f, dtype, topk, block_size) == packed.nbytes


def test_fp16_block_costs():
    assert tier_block_nbytes(torch.float16) == (512 + 5, 256 + 32 + 5, 30 + 15 + 5)


def test_tier_losses_hand_computed():
    proxy = torch.zeros(16, 16)
    proxy[0, :4] = torch.tensor([4.0, 1.0, 3.0, 2.0])  # 2:4 drops 1 + 2
    proxy[5, 9] = 7.0                                   # its own group: 2:4 keeps it
    losses = tier_losses(proxy, topk=2)
    assert losses.shape == (1, 1, 3)
    assert losses[0, 0].tolist() == [0.0, 3.0, 1.0 + 2.0 + 3.0]  # top-2 keeps 7 and 4


def test_tier_losses_of_ragged_blocks_count_real_weights_only():
    proxy = torch.ones(20, 21)
    losses = tier_losses(proxy, topk=15)
    assert losses.shape == (2, 2, 3)
    # Block (1, 1) holds 4 x 5 real weights: its groups are 4 wide and 1 wide.
    assert losses[1, 1, 1] == 4 * 2  # the full group drops 2 per row, the 1-wide one nothing
    assert losses[1, 1, 2] == 20 - 15


@pytest.mark.parametrize("budget", [0.45, 0.5, 0.5625, 0.62, 0.7, 0.8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_bytes_meet_the_budget_within_one_percent(budget, dtype):
    out_f, in_f = 576, 1536
    proxy = llm_like_proxy(out_f, in_f)
    cost = matrix_cost(proxy, dtype)
    (tiers,) = allocate([cost], budget)
    # Prune a weight by the map and pack it: the bytes the kernels will read.
    weight = apply_tier_map(proxy.sqrt(), tiers, 15, 16, scores=proxy).to(dtype)
    nbytes = sk.HybridWeight.from_dense(weight, tiers, 15, 16).nbytes
    dense = out_f * in_f * weight.element_size()
    assert nbytes <= budget * dense
    assert nbytes >= 0.99 * budget * dense


def test_planted_blocks_get_the_known_optimal_tiers():
    # 2 x 3 blocks: two carry weight everywhere (must stay dense), two hold all their weight in
    # 15 entries (top-K loses nothing), two hold it in 2 of every 4 columns (2:4 loses little,
    # top-K nearly all). The budget is exactly the bytes of that allocation.
    proxy = torch.zeros(32, 48)
    planted = torch.full((2, 3), SPARSE_24, dtype=torch.int8)
    for br, bc, tier in ((0, 0, DENSE), (1, 2, DENSE), (0, 1, TOPK), (1, 0, TOPK)):
        planted[br, bc] = tier
    for br in range(2):
        for bc in range(3):
            block = proxy[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16]
            if planted[br, bc] == DENSE:
                block.fill_(100.0)
            elif planted[br, bc] == SPARSE_24:
                block.copy_(torch.tensor([10.0, 0.1, 10.0, 0.1]).repeat(16, 4))
            else:
                spots = torch.randperm(256, generator=torch.Generator().manual_seed(br + bc))[:15]
                block[spots // 16, spots % 16] = 50.0
    cost = matrix_cost(proxy, torch.float16)
    budget = packed_nbytes(planted, 32, 48, torch.float16) / cost.dense_nbytes
    (tiers,) = allocate([cost], budget)
    assert torch.equal(tiers, planted)
    # The two 2:4 blocks drop their 0.1 entries, nothing else is lost.
    assert abs(loss_of(cost, tiers) - 2 * 128 * 0.1) < 1e-4


def _brute_force(cost: MatrixCost, budget: float) -> float:
    costs = cost.block_costs
    losses = cost.losses.reshape(-1, 3)
    limit = budget * cost.dense_nbytes - cost.fixed_nbytes
    best = float("inf")
    for choice in itertools.product(range(3), repeat=losses.shape[0]):
        if sum(costs[t] for t in choice) <= limit:
            best = min(best, float(sum(losses[i, t] for i, t in enumerate(choice))))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_optimality_and_near_brute_force_optimum(seed):
    proxy = llm_like_proxy(32, 64, seed)  # 8 blocks: 3^8 allocations to brute-force
    cost = matrix_cost(proxy, torch.float16)
    costs = torch.tensor(cost.block_costs, dtype=torch.float64)
    floor = minimum_budget([cost])
    for budget in (floor + 0.05, 0.4, 0.55, 0.7, 0.9):
        (tiers,) = allocate([cost], budget)
        got = loss_of(cost, tiers)
        best = _brute_force(cost, budget)
        assert got >= best - 1e-9
        # The greedy is optimal up to the one upgrade that did not fit: its loss is within
        # the largest single-block loss step of the brute-force optimum.
        assert got - best <= float(cost.losses.reshape(-1, 3)[:, 2].max()) + 1e-9
        # Every block's tier minimises loss + lambda * bytes for some lambda >= 0 (all the
        # lambdas tried at once: [lambdas, blocks, tiers]).
        lambdas = torch.cat([torch.zeros(1, dtype=torch.float64),
                             torch.logspace(-6, 6, 2000, dtype=torch.float64)])
        penalised = cost.losses.reshape(1, -1, 3) + lambdas.view(-1, 1, 1) * costs
        chosen = penalised.gather(2, tiers.flatten().long().view(1, -1, 1).expand(
            len(lambdas), -1, 1)).squeeze(2)
        optimal = (chosen <= penalised.min(2).values + 1e-9).all(1)
        assert bool(optimal.any())


def test_loss_never_rises_with_the_budget():
    proxy = llm_like_proxy(96, 160, seed=3)
    cost = matrix_cost(proxy, torch.float32)
    previous = float("inf")
    for budget in torch.linspace(minimum_budget([cost]), 1.02, 60).tolist():
        (tiers,) = allocate([cost], budget)
        loss = loss_of(cost, tiers)
        assert loss <= previous + 1e-9
        previous = loss
    assert previous == 0.0  # at the all-dense bytes nothing is lost


def test_budget_below_the_cheapest_tier_raises_naming_the_minimum():
    cost = matrix_cost(llm_like_proxy(64, 64), torch.float16)
    floor = minimum_budget([cost])
    assert 0.09 < floor < 0.11  # every block top-15: 50 of 512 bytes, plus the row pointers
    with pytest.raises(ValueError, match=f"{floor:.4f}"):
        allocate([cost], floor - 0.01)
    two_tier_floor = minimum_budget([cost], allow_topk=False)
    with pytest.raises(ValueError, match=f"{two_tier_floor:.4f}"):
        allocate([cost], 0.5, allow_topk=False)
    for bad in (0, -0.5, float("nan"), float("inf"), "half"):
        with pytest.raises(ValueError, match="budget"):
            allocate([cost], bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_proxies_raise(bad):
    proxy = torch.rand(32, 32)
    proxy[3, 7] = bad
    with pytest.raises(ValueError, match=r"q_proj.*\[3, 7\]"):
        tier_losses(proxy, name="q_proj")


def test_two_tier_option_never_uses_top_k():
    cost = matrix_cost(llm_like_proxy(128, 256), torch.float16)
    for budget in (0.58, 0.6, 0.7, 0.9):
        (tiers,) = allocate([cost], budget, allow_topk=False)
        assert not bool((tiers == TOPK).any())
        assert bool((tiers == DENSE).any())


def test_shared_budget_moves_bytes_to_the_matrix_that_loses_more():
    candidates = {"a": matrix_costs(llm_like_proxy(128, 128, 1) * 100, (15,), 16, torch.float16),
                  "b": matrix_costs(llm_like_proxy(128, 128, 2), (15,), 16, torch.float16)}
    joint = allocate_choices(candidates, 0.6)
    shares = budget_shares(joint)
    assert shares["a"] > 0.6 > shares["b"]
    assert (shares["a"] + shares["b"]) / 2 <= 0.6  # equal sizes: the mean is the budget
    # Allocated one by one at their shares, they reproduce the joint allocation's loss.
    alone = {n: allocate_all({n: candidates[n]}, shares[n])[n] for n in candidates}
    total = lambda result: sum(loss_of(candidates[n][0], result[n][0])  # noqa: E731
                               for n in candidates)
    assert abs(total(joint) - total(alone)) <= 1e-6 * total(joint)


def test_each_matrix_gets_the_k_it_loses_least_with():
    # Matrix "a" keeps its weight in 32 entries per block, "b" in 8: a top-32 tier loses
    # nothing of "a", and for "b" top-8 loses nothing at fewer bytes.
    g = torch.Generator().manual_seed(0)
    proxies = {}
    for name, per_block in (("a", 32), ("b", 8)):
        proxy = torch.rand(64, 128, generator=g) * 1e-3
        for br in range(4):
            for bc in range(8):
                spots = torch.randperm(256, generator=g)[:per_block]
                proxy[br * 16 + spots // 16, bc * 16 + spots % 16] = 1.0
        proxies[name] = proxy
    candidates = {n: matrix_costs(p, (8, 15, 32), 16, torch.float16, n)
                  for n, p in proxies.items()}
    result = allocate_all(candidates, 0.3)
    assert {n: k for n, (_, k) in result.items()} == {"a": 32, "b": 8}
    spent = sum(packed_nbytes(t, 64, 128, torch.float16, k) for t, k in result.values())
    assert spent <= 0.3 * 2 * 64 * 128 * 2


def test_a_k_that_costs_as_much_as_2_4_is_refused():
    with pytest.raises(ValueError, match="K=96 costs 293 bytes.*choose K below 96"):
        matrix_costs(torch.rand(32, 32), (15, 96), 16, torch.float16)


def test_a_block_is_never_promoted_above_its_cap():
    import dataclasses

    proxy = llm_like_proxy(128, 256, seed=5)
    cost = matrix_cost(proxy, torch.float16)
    g = torch.Generator().manual_seed(0)
    caps = torch.randint(0, 3, cost.losses.shape[:2], generator=g, dtype=torch.int8)
    capped = dataclasses.replace(cost, best_tier=caps)
    for budget in (0.3, 0.6, 1.0, 1.1):
        (tiers,) = allocate([capped], budget)
        assert bool((tiers >= caps).all())  # codes: dense 0 < 2:4 1 < top-K 2
    (tiers,) = allocate([capped], 1.1)  # bytes to spare: every block at its cap, except ...
    better_kept = (tiers == caps) | ((caps == SPARSE_24) & (tiers == TOPK))
    assert bool(better_kept.all())  # ... a capped block whose top-K loses less than its 2:4
    with_zero_caps = dataclasses.replace(cost, best_tier=torch.zeros_like(caps))
    assert torch.equal(allocate([with_zero_caps], 0.6)[0], allocate([cost], 0.6)[0])
