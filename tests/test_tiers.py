"""Tier maps from block scores, and the masks they imply."""
import pytest
import torch

from sparse_kernels import DENSE, SPARSE_24, TOPK, apply_tier_map, assign_tiers, tier_mask


@pytest.mark.parametrize("ratios", [(0.35, 0.45, 0.20), (0.4, 0.4, 0.2), (1, 0, 0), (0, 0, 1)])
def test_assign_tiers_counts_and_ranking(ratios):
    scores = torch.rand(13, 29)
    tiers = assign_tiers(scores, ratios)
    n = scores.numel()
    n_dense, n_24 = int(n * ratios[0]), int(n * ratios[1])
    assert int((tiers == DENSE).sum()) == n_dense
    assert int((tiers == SPARSE_24).sum()) == n_24
    assert int((tiers == TOPK).sum()) == n - n_dense - n_24
    # Every dense block outranks every 2:4 block, which outranks every top-K block.
    for high, low in ((DENSE, SPARSE_24), (SPARSE_24, TOPK), (DENSE, TOPK)):
        if (tiers == high).any() and (tiers == low).any():
            assert scores[tiers == high].min() >= scores[tiers == low].max()


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.5, 0.6, -0.1), (0.3, 0.3, 0.3)])
def test_assign_tiers_rejects_bad_ratios(ratios):
    with pytest.raises(ValueError, match="three fractions"):
        assign_tiers(torch.rand(4, 4), ratios)


@pytest.mark.parametrize("block_size", [8, 16])
def test_tier_mask_invariants(block_size):
    torch.manual_seed(0)
    out_f, in_f, k = 45, 64, 7
    scores = torch.rand(out_f, in_f)
    tiers = assign_tiers(torch.rand(-(-out_f // block_size), in_f // block_size))
    mask = tier_mask(scores, tiers, k, block_size)
    for br in range(tiers.shape[0]):
        for bc in range(tiers.shape[1]):
            blk = mask[br * block_size:(br + 1) * block_size,
                       bc * block_size:(bc + 1) * block_size]
            if tiers[br, bc] == DENSE:
                assert bool(blk.all())
            elif tiers[br, bc] == SPARSE_24:
                assert bool((blk.reshape(blk.shape[0], -1, 4).sum(-1) == 2).all())
            else:
                assert int(blk.sum()) == k


def test_apply_tier_map_keeps_the_highest_scores():
    weight = torch.arange(1.0, 17.0).repeat(16, 1)  # column j holds j + 1
    tiers = torch.tensor([[SPARSE_24]], dtype=torch.int8)
    pruned = apply_tier_map(weight, tiers)
    kept_cols = (pruned[0] != 0).nonzero().flatten().tolist()
    assert kept_cols == [2, 3, 6, 7, 10, 11, 14, 15]
