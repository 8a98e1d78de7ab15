"""Hybrid matmul in Triton: ``y = x @ W^T + bias`` straight from the packed three-tier weight.

Layout of the packed tensors: ``sparse_kernels/format.py``. Every program owns one block-row of
the weight (B output features) and walks that block-row's dense, 2:4 and top-K blocks in turn
through the per-tier CSR, so it reads only the kept bytes. Two kernels:

* decode (1-16 rows of x): no tensor cores; each block meets x by broadcast-multiply-and-sum,
  2:4 and top-K blocks by gathering the x entries their positions select. A loop step takes
  ``NB`` consecutive blocks of a tier at once, so several blocks' loads are in flight (decode is
  bound by memory latency and bandwidth, not arithmetic). A block-row of a 4096-wide weight is
  one program, too few to fill a GPU, so the block list of a row is split into ``split``
  contiguous chunks (split-K) whose fp32 partial sums the host adds.
* GEMM (more rows): a tile of ``BLOCK_M`` rows of x per program; each weight block is expanded
  to a dense B x B tile in registers (2:4 by its meta, top-K by its positions) and fed to
  ``tl.dot`` with fp32 accumulation.

Tile sides are powers of two >= 16 (``BP``, ``HP`` = half of it, ``KP``): smaller and ragged
block sizes are masked, edge blocks are zero-padded in the format and x columns past
``in_features`` are never read.
"""
import torch
import triton
import triton.language as tl

from ._launch import interpreting, launch, pow2_at_least, triton_op, tuned

DECODE_MAX_ROWS = 16


@triton.jit
def _tier_range(rowptr, r, s, split):
    """Chunk ``s`` of ``split`` of block-row ``r``'s entries in one tier's CSR."""
    start = tl.load(rowptr + r)
    end = tl.load(rowptr + r + 1)
    chunk = tl.cdiv(end - start, split)
    lo = start + s * chunk
    return lo, tl.minimum(lo + chunk, end)


# Each loader below takes the NB tier entries e0 .. e0 + NB - 1 (those below ``hi``) side by side
# along the last axis, so one loop step has NB blocks' loads in flight.

@triton.jit
def _dense_blocks(vals, cols, e0, hi, B: tl.constexpr, BP: tl.constexpr, NB: tl.constexpr):
    """Values [BP (out), NB*BP], their x columns [NB*BP] and valid mask [NB*BP]."""
    i = tl.arange(0, BP)
    k = tl.arange(0, NB * BP)
    e = e0 + k // BP
    j = k % BP
    ok = (e < hi) & (j < B)
    col = tl.load(cols + e, mask=ok, other=0) * B + j
    w = tl.load(vals + e[None, :] * (B * B) + i[:, None] * B + j[None, :],
                mask=(i < B)[:, None] & ok[None, :], other=0.0)
    return w, col, ok


@triton.jit
def _s24_blocks(vals, meta, cols, e0, hi, B: tl.constexpr, BP: tl.constexpr, HP: tl.constexpr,
                NB: tl.constexpr):
    """Kept values [BP (out), NB*HP], their column inside the block, the block's first x column,
    and the valid mask (all [BP, NB*HP])."""
    i = tl.arange(0, BP)[:, None]
    k = tl.arange(0, NB * HP)[None, :]
    e = e0 + k // HP
    h = k % HP
    ok = (e < hi) & (h < B // 2) & (i < B)
    v = tl.load(vals + e * (B * B // 2) + i * (B // 2) + h, mask=ok, other=0.0)
    bits = tl.load(meta + e * B + i, mask=ok, other=0).to(tl.int32) & 0xFFFF
    inner = 4 * (h // 2) + ((bits >> (2 * h)) & 3)
    first = tl.load(cols + e, mask=ok, other=0) * B
    return v, inner, first, ok


@triton.jit
def _topk_blocks(vals, pos, cols, e0, hi, B: tl.constexpr, TOPK: tl.constexpr,
                 KP: tl.constexpr, NB: tl.constexpr):
    """Values [NB*KP], their row and column inside the block, the block's first x column, and
    the valid mask."""
    k = tl.arange(0, NB * KP)
    e = e0 + k // KP
    t = k % KP
    ok = (e < hi) & (t < TOPK)
    v = tl.load(vals + e * TOPK + t, mask=ok, other=0.0)
    p = tl.load(pos + e * TOPK + t, mask=ok, other=0).to(tl.int32)
    first = tl.load(cols + e, mask=ok, other=0) * B
    return v, p // B, p % B, first, ok


@triton.jit
def _decode_kernel(x, out, bias,
                   d_rowptr, d_cols, d_vals, s_rowptr, s_cols, s_vals, s_meta,
                   t_rowptr, t_cols, t_vals, t_pos,
                   M, N, K_in, stride_xm, split,
                   B: tl.constexpr, BP: tl.constexpr, HP: tl.constexpr, TOPK: tl.constexpr,
                   KP: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   FINAL: tl.constexpr, NB: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.arange(0, BM)
    m_ok = m < M
    x_rows = x + m.to(tl.int64) * stride_xm
    i = tl.arange(0, BP)
    acc = tl.zeros([BM, BP], dtype=tl.float32)

    lo, hi = _tier_range(d_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        w, col, ok = _dense_blocks(d_vals, d_cols, e0, hi, B, BP, NB)
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & (ok & (col < K_in))[None, :], other=0.0)
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    lo, hi = _tier_range(s_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        v, inner, first, ok = _s24_blocks(s_vals, s_meta, s_cols, e0, hi, B, BP, HP, NB)
        col = first + inner
        xg = tl.load(x_rows[:, None, None] + col[None, :, :],
                     mask=m_ok[:, None, None] & (ok & (col < K_in))[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)

    lo, hi = _tier_range(t_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        v, rows, inner, first, ok = _topk_blocks(t_vals, t_pos, t_cols, e0, hi, B, TOPK, KP, NB)
        col = first + inner
        xg = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & (ok & (col < K_in))[None, :], other=0.0)
        contrib = xg.to(tl.float32) * v.to(tl.float32)[None, :]             # [BM, NB*KP]
        to_row = (rows[:, None] == i[None, :]).to(tl.float32)               # [NB*KP, BP]
        acc += tl.sum(contrib[:, :, None] * to_row[None, :, :], axis=1)

    out_col = r * B + i
    o_ok = m_ok[:, None] & ((i < B) & (out_col < N))[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias + out_col, mask=(i < B) & (out_col < N), other=0.0)[None, :]
        dest = out + m.to(tl.int64)[:, None] * N + out_col[None, :]
        tl.store(dest, acc.to(out.dtype.element_ty), mask=o_ok)
    else:
        dest = out + (s * M + m).to(tl.int64)[:, None] * N + out_col[None, :]
        tl.store(dest, acc, mask=o_ok)


@triton.jit
def _dot_block(acc, xt, w, DOT_FP32: tl.constexpr):
    """acc [BLOCK_M, BP] += xt [BLOCK_M, BP] @ w^T, w a [BP (out), BP (in)] weight tile."""
    if DOT_FP32:
        return tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=2),
]


@tuned(_GEMM_CONFIGS, key=["M", "N", "K_in"])
@triton.jit
def _gemm_kernel(x, out, bias,
                 d_rowptr, d_cols, d_vals, s_rowptr, s_cols, s_vals, s_meta,
                 t_rowptr, t_cols, t_vals, t_pos,
                 M, N, K_in, stride_xm,
                 B: tl.constexpr, BP: tl.constexpr, HP: tl.constexpr, TOPK: tl.constexpr,
                 KP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x + m.to(tl.int64) * stride_xm
    i = tl.arange(0, BP)
    acc = tl.zeros([BLOCK_M, BP], dtype=tl.float32)

    # One block per step (NB = 1): the block is the K = BP slice of one tl.dot.
    lo, hi = _tier_range(d_rowptr, r, 0, 1)
    for e in range(lo, hi):
        w, col, ok = _dense_blocks(d_vals, d_cols, e, hi, B, BP, 1)
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & (ok & (col < K_in))[None, :], other=0.0)
        acc = _dot_block(acc, xt, w, DOT_FP32)

    lo, hi = _tier_range(s_rowptr, r, 0, 1)
    for e in range(lo, hi):
        v, inner, first, ok = _s24_blocks(s_vals, s_meta, s_cols, e, hi, B, BP, HP, 1)
        # Expand to [BP, BP]: each kept value lands on its column, exactly (one non-zero term).
        hit = (inner[:, :, None] == i[None, None, :]) & ok[:, :, None]
        w = tl.sum(tl.where(hit, v.to(tl.float32)[:, :, None], 0.0), axis=1)
        col = tl.load(s_cols + e) * B + i
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & ((i < B) & (col < K_in))[None, :], other=0.0)
        acc = _dot_block(acc, xt, w, DOT_FP32)

    lo, hi = _tier_range(t_rowptr, r, 0, 1)
    for e in range(lo, hi):
        v, rows, inner, first, ok = _topk_blocks(t_vals, t_pos, t_cols, e, hi, B, TOPK, KP, 1)
        hit = ((rows[:, None, None] == i[None, :, None]) & (inner[:, None, None] == i[None, None, :])
               & ok[:, None, None])
        w = tl.sum(tl.where(hit, v.to(tl.float32)[:, None, None], 0.0), axis=0)
        col = tl.load(t_cols + e) * B + i
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & ((i < B) & (col < K_in))[None, :], other=0.0)
        acc = _dot_block(acc, xt, w, DOT_FP32)

    out_col = r * B + i
    c_ok = (i < B) & (out_col < N)
    if HAS_BIAS:
        acc += tl.load(bias + out_col, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    dest = out + m.to(tl.int64)[:, None] * N + out_col[None, :]
    tl.store(dest, acc.to(out.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# NB: blocks per loop step. The first config (the interpreter's) has NB = 4, so the tests reach
# the masking of a last, partial step.
_DECODE_CONFIGS = [
    triton.Config({"NB": 4}, num_warps=4, num_stages=2),
    triton.Config({"NB": 1}, num_warps=2, num_stages=3),
    triton.Config({"NB": 2}, num_warps=4, num_stages=3),
    triton.Config({"NB": 8}, num_warps=8, num_stages=2),
]
_decode = tuned(_DECODE_CONFIGS, key=["M", "N", "K_in"])(_decode_kernel)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_split(block_rows: int, block_cols: int, device: torch.device) -> int:
    """Chunks per block-row so the decode grid has about 4 programs per multiprocessor.

    Each chunk keeps at least 8 blocks, so the partial sums (split x rows x out fp32) stay
    small beside the weight bytes the chunk streams.
    """
    wanted = -(-4 * _multiprocessors(device) // max(block_rows, 1))
    return max(1, min(wanted, block_cols // 8))


def run(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
        topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias=None, split=None):
    """Host side of both kernels; ``split`` overrides ``decode_split`` (decode only)."""
    x = x.contiguous()
    rows, in_features = x.shape
    block = dense_vals.shape[1]
    topk = topk_vals.shape[1]
    block_rows = dense_rowptr.shape[0] - 1
    packed = (dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
              topk_rowptr, topk_cols, topk_vals, topk_pos)
    tiles = dict(B=block, BP=pow2_at_least(block, 16), HP=pow2_at_least(block, 16) // 2,
                 TOPK=topk, KP=pow2_at_least(topk), HAS_BIAS=bias is not None)
    y = x.new_empty((rows, out_features))
    if rows == 0:
        return y
    bias_arg = bias if bias is not None else y

    if rows > DECODE_MAX_ROWS:
        dot_fp32 = x.dtype == torch.float32 or interpreting()
        launch(_gemm_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), block_rows)](
            x, y, bias_arg, *packed, rows, out_features, in_features, x.stride(0),
            DOT_FP32=dot_fp32, **tiles)
        return y

    if split is None:
        split = decode_split(block_rows, -(-in_features // block), x.device)
    final = split == 1
    partial = y if final else x.new_empty((split, rows, out_features), dtype=torch.float32)
    launch(_decode)[(block_rows, split)](
        x, partial, bias_arg, *packed, rows, out_features, in_features, x.stride(0), split,
        BM=pow2_at_least(rows), FINAL=final, **tiles)
    if final:
        return y
    total = partial.sum(0)
    if bias is not None:
        total = total + bias.float()
    return total.to(x.dtype)


@triton_op("sparse_kernels::triton_hybrid_linear")
def hybrid_linear(x: torch.Tensor, dense_rowptr: torch.Tensor, dense_cols: torch.Tensor,
                  dense_vals: torch.Tensor, s24_rowptr: torch.Tensor, s24_cols: torch.Tensor,
                  s24_vals: torch.Tensor, s24_meta: torch.Tensor, topk_rowptr: torch.Tensor,
                  topk_cols: torch.Tensor, topk_vals: torch.Tensor, topk_pos: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton ``hybrid_linear``: same contract as ``reference.hybrid_linear``."""
    return run(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
               s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias)
