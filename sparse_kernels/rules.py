"""The packed format's rules, in one place: tier codes, block sizes, the default K, the research
tier mix, and what each block costs in bytes. Pure arithmetic, no tensors packed; every other
module (the format, the kernels' Python side, the pruning planners) takes these from here.

A weight ``W [out, in]`` is cut into ``B x B`` blocks (``B`` in ``BLOCK_SIZES``; ragged edge
blocks are zero-padded). Each block has a tier, a code in its tier map ``[ceil(out/B),
ceil(in/B)]`` (int8): ``DENSE`` keeps all ``B*B`` values, ``SPARSE_24`` at most 2 of every aligned
4 input columns of a row, ``TOPK`` at most ``K`` values anywhere in the block.
"""
from __future__ import annotations

import torch

DENSE, SPARSE_24, TOPK = 0, 1, 2
TIER_CODES = (DENSE, SPARSE_24, TOPK)
TIER_NAMES = {DENSE: "dense", SPARSE_24: "2:4", TOPK: "top-K"}
# A multiple of 4 so 2:4 groups align; at most 16 so a top-K position (row * B + col) fits a byte.
BLOCK_SIZES = (4, 8, 12, 16)
DEFAULT_BLOCK_SIZE = 16
# K of a top-K block when nothing chooses it (the research code's scripts use 15).
DEFAULT_TOPK = 15
# The research code's fixed tier fractions (dense, 2:4, top-K).
RESEARCH_MIX = (0.35, 0.45, 0.20)


def check_block_size(block_size) -> int:
    """``block_size`` if it is one of ``BLOCK_SIZES``, else ``ValueError`` saying why not."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        allowed = ", ".join(map(str, BLOCK_SIZES[:-1])) + f" or {BLOCK_SIZES[-1]}"
        raise ValueError(f"block_size must be {allowed} (a multiple of 4 so 2:4 groups align, "
                         f"at most 16 so a top-K position fits a byte), got {block_size!r}")
    return block_size


def check_topk(topk, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """``topk`` if it is an integer in ``1..block_size^2``, else ``ValueError``."""
    bb = block_size * block_size
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= bb:
        raise ValueError(f"topk must be in 1..{bb} (block_size^2 for block_size {block_size}), "
                         f"got {topk!r}")
    return topk


def tier_grid(out_features: int, in_features: int, block_size: int) -> tuple[int, int]:
    """Shape of the tier map of a ``[out_features, in_features]`` weight."""
    return -(-out_features // block_size), -(-in_features // block_size)


def tier_block_nbytes(dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE,
                      topk: int = DEFAULT_TOPK) -> tuple[int, int, int]:
    """Bytes one block costs as ``(dense, 2:4, top-K)``, exactly as ``HybridWeight`` stores it.

    Each block stores its values in ``dtype`` (dense ``B*B``, 2:4 ``B*B/2``, top-K ``K``), its
    positions (2:4: one int16 metadata word per block row; top-K: one uint8 per slot), its block
    column (int32) and its tier-map entry (int8). The per-matrix row pointers are
    :func:`index_nbytes`.
    """
    es = torch.empty((), dtype=dtype).element_size()
    b = block_size
    per_block = 4 + 1  # block column (int32) + tier-map entry (int8)
    return (b * b * es + per_block, b * b // 2 * es + 2 * b + per_block,
            topk * (es + 1) + per_block)


def index_nbytes(out_features: int, in_features: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of the three tiers' int32 row pointers ``[ceil(out/B) + 1]``, whatever the tiers."""
    return 3 * 4 * (tier_grid(out_features, in_features, block_size)[0] + 1)


def packed_nbytes(tier_map: torch.Tensor, out_features: int, in_features: int,
                  dtype: torch.dtype, topk: int = DEFAULT_TOPK,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """``HybridWeight.nbytes`` of a weight packed by ``tier_map``, without packing it."""
    costs = tier_block_nbytes(dtype, block_size, topk)
    counts = [int((tier_map == code).sum()) for code in TIER_CODES]
    return sum(c * n for c, n in zip(costs, counts)) + index_nbytes(out_features, in_features,
                                                                     block_size)
