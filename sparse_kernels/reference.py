"""Pure-torch references of every kernel.

Each function here is the semantic definition of one op in ``_ops.py``: it is the fallback that
serves the op when no compiled backend is present, and the oracle every backend is tested
against. They favour clarity over speed, but stay traceable by ``torch.compile`` (no Python
loops over data, no data-dependent output shapes).

Tie-breaking rule shared by every selection op (and by every backend): among equal scores the
entry with the lower index wins, where the index is row-major inside a block (top-K) or the
column inside a group (N:M). NaN scores count as ``-inf``. Entries in the padding of ragged edge
blocks or groups are never selected.
"""
import torch
import torch.nn.functional as F

from .quant import expand_scales, unpack_int4

__all__ = [
    "wanda_scores", "block_topk_mask", "nm_mask", "compress_24", "decompress_24",
    "unpack_blocks", "hybrid_linear", "unpack_blocks_q", "hybrid_linear_q",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def _to_blocks(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """[R*B, C*B] -> [R, C, B*B], each block flattened row-major."""
    r, c = t.shape[0] // block_size, t.shape[1] // block_size
    return t.reshape(r, block_size, c, block_size).permute(0, 2, 1, 3).reshape(
        r, c, block_size * block_size)


def _from_blocks(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[R, C, B*B] -> [R*B, C*B] (inverse of ``_to_blocks``)."""
    r, c = blocks.shape[:2]
    return blocks.reshape(r, c, block_size, block_size).permute(0, 2, 1, 3).reshape(
        r * block_size, c * block_size)


def _select_top(scores: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask over the last axis keeping the ``count`` best valid entries.

    Best = highest score, ties to the lower index; invalid entries are never kept, so fewer
    than ``count`` survive where fewer are valid.
    """
    key = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"),
                           neginf=float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # A second stable sort moves valid entries ahead without disturbing their order.
    valid_in_order = torch.gather(valid, -1, order)
    order = torch.gather(order, -1,
                         torch.sort(valid_in_order.to(torch.int8), dim=-1, descending=True,
                                    stable=True).indices)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < count
    kept = torch.zeros_like(valid).scatter(-1, order, rank_kept.expand_as(order))
    return kept & valid


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor, block_size: int):
    """Wanda importance ``S = |W| * sqrt(act_sq_norm)`` and its mean over each block.

    weight: [out, in] (fp32 / bf16 / fp16); act_sq_norm: [in], the per-input-column mean squared
    activation norm. Returns ``(scores [out, in] fp32, block_scores [ceil(out/B), ceil(in/B)]
    fp32)``; a ragged edge block is averaged over its real entries only.
    """
    out_f, in_f = weight.shape
    scores = weight.float().abs() * act_sq_norm.float().sqrt()
    nbr, nbc = _ceil_div(out_f, block_size), _ceil_div(in_f, block_size)
    padded = _pad_to(scores, nbr * block_size, nbc * block_size)
    sums = _to_blocks(padded, block_size).sum(-1)
    ones = _pad_to(torch.ones_like(scores), nbr * block_size, nbc * block_size)
    counts = _to_blocks(ones, block_size).sum(-1)
    return scores, sums / counts


def block_topk_mask(scores: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Bool mask [out, in] keeping exactly ``min(k, entries in block)`` highest scores per block."""
    out_f, in_f = scores.shape
    nbr, nbc = _ceil_div(out_f, block_size), _ceil_div(in_f, block_size)
    rows, cols = nbr * block_size, nbc * block_size
    blocks = _to_blocks(_pad_to(scores.float(), rows, cols), block_size)
    valid = _to_blocks(_pad_to(torch.ones_like(scores, dtype=torch.bool), rows, cols, False),
                       block_size)
    kept = _select_top(blocks, valid, k)
    return _from_blocks(kept, block_size)[:out_f, :in_f]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask [out, in] keeping the ``n`` highest scores of every ``m`` consecutive input columns.

    Groups start at column 0; a ragged last group keeps ``min(n, its width)``.
    """
    out_f, in_f = scores.shape
    groups = _ceil_div(in_f, m)
    padded = _pad_to(scores.float(), out_f, groups * m).reshape(out_f, groups, m)
    valid = _pad_to(torch.ones_like(scores, dtype=torch.bool), out_f, groups * m,
                    False).reshape(out_f, groups, m)
    return _select_top(padded, valid, n).reshape(out_f, groups * m)[:, :in_f]


def compress_24(blocks: torch.Tensor):
    """Compact 2:4 blocks to their kept half and 2-bit positions.

    blocks: [n, B, B] with at most 2 non-zeros in every group of 4 columns (B a multiple of 4,
    B <= 16). Returns ``values [n, B, B/2]`` (same dtype) and ``meta [n, B]`` int16.

    Layout: kept slot ``j`` of a row belongs to column group ``j // 2``; its position ``p`` in
    0..3 inside that group sits in bits ``2j..2j+1`` of the row's meta, so its column in the
    block is ``4 * (j // 2) + p``. The two slots of a group hold the group's non-zeros in
    ascending column order; a group with fewer than 2 non-zeros fills the rest with its
    lowest-index zero columns (value 0). A group with more than 2 non-zeros keeps its first two
    (``HybridWeight.from_dense`` rejects such weights before they get here).
    """
    n, b, _ = blocks.shape
    groups = blocks.reshape(n, b, b // 4, 4)
    nonzero = (groups != 0).to(torch.int8)
    slots = torch.sort(nonzero, dim=-1, descending=True, stable=True).indices[..., :2]
    slots = torch.sort(slots, dim=-1).values
    values = torch.gather(groups, -1, slots).reshape(n, b, b // 2)
    shifts = 2 * torch.arange(b // 2, device=blocks.device, dtype=torch.int32)
    meta = (slots.reshape(n, b, b // 2).to(torch.int32) << shifts).sum(-1)
    meta = torch.where(meta >= 1 << 15, meta - (1 << 16), meta)  # 16 bits into a signed int16
    return values, meta.to(torch.int16)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``compress_24``: [n, B, B/2] values + [n, B] meta -> [n, B, B] blocks."""
    n, b, half = values.shape
    shifts = 2 * torch.arange(half, device=values.device, dtype=torch.int32)
    pos = (meta.to(torch.int32).unsqueeze(-1) >> shifts) & 3
    cols = pos + 4 * (torch.arange(half, device=values.device) // 2)
    return torch.zeros(n, b, b, dtype=values.dtype, device=values.device).scatter(
        -1, cols.long(), values)


def expand_topk(topk_vals: torch.Tensor, topk_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Top-K blocks [n, K] values + positions -> [n, B*B] dense blocks (row-major)."""
    dense = topk_vals.new_zeros((topk_vals.shape[0], block_size * block_size))
    return dense.scatter_(1, topk_pos.long(), topk_vals)


def block_ids(rowptr: torch.Tensor, cols: torch.Tensor, n_block_cols: int) -> torch.Tensor:
    """Flat block index (block_row * n_block_cols + block_col) of each entry of a tier's CSR."""
    nbr = rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(nbr, device=cols.device),
                                   (rowptr[1:] - rowptr[:-1]).long(), output_size=cols.numel())
    return rows * n_block_cols + cols.long()


def unpack_blocks(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
                  topk_rowptr, topk_cols, topk_vals, topk_pos,
                  out_features: int, in_features: int) -> torch.Tensor:
    """The dense [out, in] weight a packed hybrid weight stands for (see ``format.py``)."""
    b = dense_vals.shape[1]
    nbr, nbc = dense_rowptr.numel() - 1, _ceil_div(in_features, b)
    blocks = torch.zeros(nbr * nbc, b * b, dtype=dense_vals.dtype, device=dense_vals.device)
    blocks.index_copy_(0, block_ids(dense_rowptr, dense_cols, nbc),
                       dense_vals.reshape(-1, b * b))
    blocks.index_copy_(0, block_ids(s24_rowptr, s24_cols, nbc),
                       decompress_24(s24_vals, s24_meta).reshape(-1, b * b))
    blocks.index_copy_(0, block_ids(topk_rowptr, topk_cols, nbc),
                       expand_topk(topk_vals, topk_pos, b))
    return _from_blocks(blocks.reshape(nbr, nbc, b * b), b)[:out_features, :in_features]


def hybrid_linear(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
                  s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos,
                  out_features: int, bias=None) -> torch.Tensor:
    """``x @ W^T + bias`` for x [M, in] and the packed weight, accumulated in fp32.

    Compiled backends multiply only the kept weights, so an inf or NaN in x reaches their output
    only through kept weights; here the pruned zeros multiply it too (0 * inf = NaN). Outputs
    agree for finite x.
    """
    weight = unpack_blocks(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
                           s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos,
                           out_features, x.shape[-1])
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def value_codes(values: torch.Tensor, count: int) -> torch.Tensor:
    """A low-bit tier's stored values as fp32 codes: int8 as they are, uint8 as packed int4
    (``count`` codes per row)."""
    return unpack_int4(values, count).float() if values.dtype == torch.uint8 else values.float()


def unpack_blocks_q(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
                    s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, scales,
                    group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """The fp32 [out, in] weight a low-bit packed weight stands for: its codes (int8, or int4
    two per byte) times ``scales [out, ceil(in / group_size)]`` (``quant.py``), exactly."""
    b = dense_vals.shape[1]
    codes = unpack_blocks(dense_rowptr, dense_cols, value_codes(dense_vals, b), s24_rowptr,
                          s24_cols, value_codes(s24_vals, b // 2), s24_meta, topk_rowptr,
                          topk_cols, value_codes(topk_vals, topk_pos.shape[1]), topk_pos,
                          out_features, in_features)
    return codes * expand_scales(scales, group_size, in_features)


def hybrid_linear_q(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
                    s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, scales,
                    group_size: int, out_features: int, bias=None) -> torch.Tensor:
    """``x @ W^T + bias`` for x [M, in] (fp32, bf16 or fp16) and a low-bit packed weight,
    accumulated in fp32, returned in x's dtype (see :func:`hybrid_linear` on non-finite x)."""
    weight = unpack_blocks_q(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols,
                             s24_vals, s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos,
                             scales, group_size, out_features, x.shape[-1])
    y = F.linear(x.float(), weight, None if bias is None else bias.float())
    return y.to(x.dtype)
