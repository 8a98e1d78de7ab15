"""Tier maps: which blocks stay dense, go 2:4 or keep their top-K, and the masks they imply.

Format semantics, so a valid ``HybridWeight`` can be built from any weight with this package
alone: rank blocks into fixed tier fractions (``assign_tiers``), expand a block map to its
weights (``per_entry_tiers``), and mask a weight by a map (``tier_mask``, ``apply_tier_map``).
The ``pruning`` package decides the maps; these say what a map means.
"""
import torch

from ._ops import block_topk_mask, nm_mask
from .format import check_tier_map
from .rules import DEFAULT_BLOCK_SIZE, DEFAULT_TOPK, DENSE, RESEARCH_MIX, SPARSE_24, TOPK


def check_ratios(ratios) -> tuple[float, float, float]:
    """Validate (dense, 2:4, top-K) fractions: three numbers in [0, 1] summing to 1."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or any(not 0.0 <= r <= 1.0 for r in ratios) \
            or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"tier ratios must be three fractions (dense, 2:4, top-K) in [0, 1] "
                         f"summing to 1, got {ratios}")
    return ratios


def assign_tiers(block_scores: torch.Tensor, ratios=RESEARCH_MIX) -> torch.Tensor:
    """Tier map (int8, same shape as ``block_scores``) from block importance.

    Blocks are ranked by score, highest first (ties to the lower flat index): the first
    ``int(n * ratios[0])`` stay dense, the next ``int(n * ratios[1])`` go 2:4, the rest top-K.
    """
    r_dense, r_24, _ = check_ratios(ratios)
    n = block_scores.numel()
    n_dense, n_24 = int(n * r_dense), int(n * r_24)
    order = torch.sort(block_scores.flatten().float(), descending=True, stable=True).indices
    tiers = torch.full((n,), TOPK, dtype=torch.int8, device=block_scores.device)
    tiers[order[:n_dense]] = DENSE
    tiers[order[n_dense:n_dense + n_24]] = SPARSE_24
    return tiers.reshape(block_scores.shape)


def per_entry_tiers(tier_map: torch.Tensor, out_features: int, in_features: int,
                    block_size: int) -> torch.Tensor:
    """Each weight's entry of a block map: ``[out, in]`` from ``[ceil(out/B), ceil(in/B)]``."""
    return tier_map.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[
        :out_features, :in_features]


def tier_mask(scores: torch.Tensor, tier_map: torch.Tensor, topk: int = DEFAULT_TOPK,
              block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Bool mask [out, in] (True = kept) that ``tier_map`` implies for ``scores [out, in]``.

    Dense blocks keep everything, 2:4 blocks the 2 best of every 4 input columns of a row,
    top-K blocks their ``topk`` best entries.
    """
    out_f, in_f = scores.shape
    tiers = check_tier_map(tier_map, out_f, in_f, block_size).to(scores.device)
    per_entry = per_entry_tiers(tiers, out_f, in_f, block_size)
    return torch.where(per_entry == DENSE, True,
                       torch.where(per_entry == SPARSE_24, nm_mask(scores, 2, 4),
                                   block_topk_mask(scores, topk, block_size)))


def apply_tier_map(weight: torch.Tensor, tier_map: torch.Tensor, topk: int = DEFAULT_TOPK,
                   block_size: int = DEFAULT_BLOCK_SIZE,
                   scores: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` with everything outside ``tier_mask`` zeroed (scores default to ``|weight|``)."""
    if scores is None:
        scores = weight.detach().abs().float()
    mask = tier_mask(scores, tier_map, topk, block_size)
    return weight.masked_fill(~mask, 0)
