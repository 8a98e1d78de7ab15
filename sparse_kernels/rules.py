"""The packed format's rules, in one place: tier codes, block sizes, the default K, the research
tier mix, value precisions and quantization groups, and what each block costs in bytes. Pure
arithmetic, no tensors packed; every other module (the format, the kernels' Python side, the
pruning planners) takes these from here.

A weight ``W [out, in]`` is cut into ``B x B`` blocks (``B`` in ``BLOCK_SIZES``; ragged edge
blocks are zero-padded). Each block has a tier, a code in its tier map ``[ceil(out/B),
ceil(in/B)]`` (int8): ``DENSE`` keeps all ``B*B`` values, ``SPARSE_24`` at most 2 of every aligned
4 input columns of a row, ``TOPK`` at most ``K`` values anywhere in the block.

The kept values of every tier share one precision per matrix (``BITS``): 16 (the float dtype),
8 or 4. Low-bit values are symmetric integer codes ``q`` in ``[-qmax, qmax]`` (127, 7) times one
fp16 scale per output row per group of ``G`` input columns (``G`` a multiple of ``B``, so a block
lies in one group, and the tiers of a group share its scales): ``w = q * scale[row, col // G]``.
Int4 codes are stored two per byte, element ``2j`` in the low nibble.
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


BITS = (16, 8, 4)
QMAX = {8: 127, 4: 7}
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.float16


def check_bits(bits) -> int:
    """``bits`` if it is one of ``BITS``, else ``ValueError``."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (16: the float values "
                         f"as they are; 8 / 4: integer codes with group scales), got {bits!r}")
    return bits


def group_size_for(in_features: int, preferred: int = DEFAULT_GROUP_SIZE,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """The quantization group of a weight with ``in_features`` columns: the largest of
    ``preferred``, ``preferred / 2``, ... (multiples of ``block_size``) that divides
    ``in_features`` (64 on a 576-wide input when 128 is preferred); ``preferred`` with a ragged
    last group when none does."""
    if preferred < block_size or preferred % block_size:
        raise ValueError(f"group_size must be a positive multiple of the block size "
                         f"{block_size}, got {preferred!r}")
    g = preferred
    while g >= block_size and g % block_size == 0:
        if in_features % g == 0:
            return g
        g //= 2
    return preferred


def scale_nbytes(out_features: int, in_features: int, group_size: int) -> int:
    """Bytes of a low-bit weight's fp16 scales ``[out, ceil(in / G)]``."""
    return out_features * -(-in_features // group_size) * 2


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


def values_nbytes(count: int, bits: int, dtype: torch.dtype) -> int:
    """Bytes of ``count`` values of one stored row: ``dtype``'s for 16 bits, one byte per int8
    code, half a byte per int4 code (rounded up: a row of codes starts on a byte)."""
    if bits == 16:
        return count * torch.empty((), dtype=dtype).element_size()
    return count if bits == 8 else -(-count // 2)


def tier_block_nbytes(dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE,
                      topk: int = DEFAULT_TOPK, bits: int = 16) -> tuple[int, int, int]:
    """Bytes one block costs as ``(dense, 2:4, top-K)``, exactly as ``HybridWeight`` stores it.

    Each block stores its values (``dtype`` for 16 bits, else int8 / packed int4 codes: dense
    ``B*B``, 2:4 ``B*B/2``, top-K ``K``), its positions (2:4: one int16 metadata word per block
    row; top-K: one uint8 per slot), its block column (int32) and its tier-map entry (int8). The
    per-matrix row pointers and scales are :func:`index_nbytes` and :func:`scale_nbytes`.
    """
    b = block_size
    per_block = 4 + 1  # block column (int32) + tier-map entry (int8)
    return (b * values_nbytes(b, bits, dtype) + per_block,
            b * values_nbytes(b // 2, bits, dtype) + 2 * b + per_block,
            values_nbytes(topk, bits, dtype) + topk + per_block)


def scaled_topk(topk: int, bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """The K that costs low-bit values the same share of a 2:4 block's bytes as ``topk`` costs
    fp16 values (positions take a byte whatever the values: at the same K a low-bit top-K block
    is no longer much cheaper than a low-bit 2:4 one); ``topk`` itself for 16 bits."""
    if bits == 16:
        return topk
    fp16 = tier_block_nbytes(torch.float16, block_size, topk)
    share = fp16[2] / fp16[1]
    costs = tier_block_nbytes(torch.float16, block_size, 1, bits)
    best = 1
    for k in range(1, topk + 1):
        if tier_block_nbytes(torch.float16, block_size, k, bits)[2] <= share * costs[1]:
            best = k
    return best


def index_nbytes(out_features: int, in_features: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of the three tiers' int32 row pointers ``[ceil(out/B) + 1]``, whatever the tiers."""
    return 3 * 4 * (tier_grid(out_features, in_features, block_size)[0] + 1)


def fixed_nbytes(out_features: int, in_features: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 bits: int = 16, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes a packed matrix stores whatever its tiers: the row pointers, and the scales of
    low-bit values (``group_size``: the matrix's own G, :func:`group_size_for`)."""
    scales = 0 if bits == 16 else scale_nbytes(out_features, in_features, group_size)
    return index_nbytes(out_features, in_features, block_size) + scales


def packed_nbytes(tier_map: torch.Tensor, out_features: int, in_features: int,
                  dtype: torch.dtype, topk: int = DEFAULT_TOPK,
                  block_size: int = DEFAULT_BLOCK_SIZE, bits: int = 16,
                  group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """``HybridWeight.nbytes`` of a weight packed by ``tier_map``, without packing it."""
    costs = tier_block_nbytes(dtype, block_size, topk, bits)
    counts = [int((tier_map == code).sum()) for code in TIER_CODES]
    return sum(c * n for c, n in zip(costs, counts)) + fixed_nbytes(
        out_features, in_features, block_size, bits, group_size)
