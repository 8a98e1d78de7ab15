"""Selection kernels in Triton: top-K per block and N best of every M columns.

Both follow the reference's rule (``reference.py``): higher score wins, ties go to the lower
index (row-major inside a block, column inside a group), NaN counts as -inf, padding of ragged
blocks and groups is never kept.
"""
import torch
import triton
import triton.language as tl

from ._launch import launch, pow2_at_least, triton_op, tuned


@triton.jit
def _order_key(s):
    """fp32 -> int32 whose signed order is the float order; NaN maps to the key of -inf."""
    s = tl.where(s != s, float("-inf"), s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


_TOPK_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]


@tuned(_TOPK_CONFIGS, key=["N", "K_in"])
@triton.jit
def block_topk_kernel(scores, mask, N, K_in, NBC, k,
                       B: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr):
    """Program (block-row r, group g): CB blocks, each as one row of BP*BP entries.

    The k-th best key of each block is found by bisection on int32 keys (at most 32 steps of a
    count), then entries above it are kept and ties at it are kept in index order.
    """
    r = tl.program_id(0)
    g = tl.program_id(1)
    p = tl.arange(0, BP * BP)[None, :]
    i = p // BP
    j = p % BP
    block_col = g * CB + tl.arange(0, CB)[:, None]
    row = r * B + i
    col = block_col * B + j
    valid = (i < B) & (j < B) & (row < N) & (col < K_in) & (block_col < NBC)
    offsets = row.to(tl.int64) * K_in + col
    key = _order_key(tl.load(scores + offsets, mask=valid, other=0.0).to(tl.float32))
    key = key.to(tl.int64)
    wanted = tl.minimum(tl.sum(valid.to(tl.int32), axis=1), k)[:, None]      # [CB, 1]

    # Largest threshold t with count(key >= t) >= wanted, searched between the block's smallest
    # and largest key; a threshold with exactly `wanted` keys above it ends a block's search
    # early (for untied scores typically after about half of the 32 steps).
    lo = tl.min(tl.where(valid, key, 2147483647), axis=1)[:, None]
    hi = tl.max(tl.where(valid, key, -2147483648), axis=1)[:, None]
    while tl.max(hi - lo) > 0:
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((valid & (key >= mid)).to(tl.int32), axis=1)[:, None]
        enough = count >= wanted
        lo = tl.where(enough, mid, lo)
        hi = tl.where(count == wanted, mid, tl.where(enough, hi, mid - 1))
    above = valid & (key > lo)
    tied = valid & (key == lo)
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=1) - tied.to(tl.int32)
    room = wanted - tl.sum(above.to(tl.int32), axis=1)[:, None]
    kept = above | (tied & (tie_rank < room))
    tl.store(mask + offsets, kept.to(tl.int8), mask=valid)


_NM_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]


@tuned(_NM_CONFIGS, key=["N", "K_in", "m"])
@triton.jit
def nm_kernel(scores, mask, N, K_in, n_groups, n, m,
               MP: tl.constexpr, GROUPS: tl.constexpr):
    """Program: GROUPS (row, group) pairs; an entry is kept if fewer than n beat it."""
    t = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    row = t // n_groups
    start = (t % n_groups) * m
    a = tl.arange(0, MP)
    col = start[:, None] + a[None, :]                                       # [GROUPS, MP]
    valid = (row[:, None] < N) & (a[None, :] < m) & (col < K_in)
    offsets = row.to(tl.int64)[:, None] * K_in + col
    s = tl.load(scores + offsets, mask=valid, other=0.0).to(tl.float32)
    s = tl.where(s != s, float("-inf"), s)
    # b beats a: valid and higher, or equal and earlier.
    sa = s[:, :, None]
    sb = s[:, None, :]
    earlier = a[None, None, :] < a[None, :, None]
    beats = valid[:, None, :] & ((sb > sa) | ((sb == sa) & earlier))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(mask + offsets, (valid & (rank < n)).to(tl.int8), mask=valid)


def _as_bool(mask_bytes: torch.Tensor) -> torch.Tensor:
    return mask_bytes.view(torch.bool)


@triton_op("sparse_kernels::triton_block_topk_mask")
def block_topk_mask(scores: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """The Triton ``block_topk_mask``: same contract as ``reference.block_topk_mask``."""
    scores = scores.contiguous()
    out_f, in_f = scores.shape
    nbr, nbc = triton.cdiv(out_f, block_size), triton.cdiv(in_f, block_size)
    kept = scores.new_empty((out_f, in_f), dtype=torch.int8)
    if kept.numel():
        side = pow2_at_least(block_size)
        per_program = max(1, 1024 // (side * side))  # about 1024 entries per program
        launch(block_topk_kernel)[(nbr, triton.cdiv(nbc, per_program))](
            scores, kept, out_f, in_f, nbc, k, B=block_size, BP=side, CB=per_program)
    return _as_bool(kept)


@triton_op("sparse_kernels::triton_nm_mask")
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The Triton ``nm_mask``: same contract as ``reference.nm_mask``."""
    scores = scores.contiguous()
    out_f, in_f = scores.shape
    n_groups = triton.cdiv(in_f, m)
    kept = scores.new_empty((out_f, in_f), dtype=torch.int8)
    if kept.numel():
        width = pow2_at_least(m)
        groups = max(16, 4096 // (width * width))  # the pairwise compare is groups x width^2
        launch(nm_kernel)[(triton.cdiv(out_f * n_groups, groups),)](
            scores, kept, out_f, in_f, n_groups, n, m, MP=width, GROUPS=groups)
    return _as_bool(kept)
