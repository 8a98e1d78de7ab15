"""Hybrid matmul in Triton: ``y = x @ W^T + bias`` straight from the packed three-tier weight.

Layout of the packed tensors: ``sparse_kernels/format.py``. Both kernels read only the kept bytes
of each block. Two kernels:

* decode (1-16 rows of x): a program owns one block-row (B output features) and walks its
  dense, 2:4 and top-K blocks in turn through the per-tier CSR. No tensor cores; each block
  meets x by broadcast-multiply-and-sum, 2:4 and top-K blocks by gathering the x entries their positions select. A loop step takes
  ``NB`` consecutive blocks of a tier at once, so several blocks' loads are in flight (decode is
  bound by memory latency and bandwidth, not arithmetic). A block-row of a 4096-wide weight is
  one program, too few to fill a GPU, so the block list of a row is split into ``split``
  contiguous chunks (split-K); the last chunk of a block-row to finish adds the others' fp32
  partial sums and writes y, in the same launch.
* GEMM (more rows): a program owns ``BLOCK_M`` rows of x and ``G`` block-rows and walks the block
  columns; at each it expands the G blocks to a dense tile in registers (2:4 by its meta; top-K
  blocks are expanded once per call beforehand), each under its own tier's mask, and feeds
  ``tl.dot`` with fp32 accumulation. A per-call block index (``block_index``: tier and slot of every block) lets the
  G block-rows step together although their CSR lists differ.

Tile sides are powers of two >= 16 (``BP``, ``HP`` = half of it): smaller and ragged
block sizes are masked, edge blocks are zero-padded in the format and x columns past
``in_features`` are never read.
"""
import torch
import triton
import triton.language as tl

from .. import reference
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


@triton.jit
def _values(vals, elem, mask, BITS: tl.constexpr):
    """Elements ``elem`` of a tier's values as fp32: float values or int8 codes as stored, int4
    codes from their byte (element 2j in the low nibble; ``(n ^ 8) - 8`` signs it)."""
    if BITS == 4:
        pair = tl.load(vals + elem // 2, mask=mask, other=0).to(tl.int32)
        nibble = (pair >> ((elem % 2) * 4)) & 15
        return ((nibble ^ 8) - 8).to(tl.float32)
    else:
        return tl.load(vals + elem, mask=mask, other=0).to(tl.float32)


@triton.jit
def _dequant(w, scales, row, col, ok, N, N_GROUPS, GS, BITS: tl.constexpr):
    """Low-bit codes ``w`` at (``row``, ``col``) of the weight times their group's fp16 scale
    (``scales [N, N_GROUPS]``, groups of ``GS`` columns); float values unchanged."""
    if BITS < 16:
        s = tl.load(scales + row * N_GROUPS + col // GS, mask=ok & (row < N), other=0.0)
        w = w * s.to(tl.float32)
    return w


# Each loader below takes the NB tier entries e0 .. e0 + NB - 1 (those below ``hi``) side by side
# along the last axis, so one loop step has NB blocks' loads in flight.

@triton.jit
def _dense_blocks(vals, cols, e0, hi, B: tl.constexpr, BP: tl.constexpr, NB: tl.constexpr,
                  BITS: tl.constexpr):
    """Values (fp32; codes when low-bit) [BP (out), NB*BP], their x columns [NB*BP] and valid
    mask [NB*BP]."""
    i = tl.arange(0, BP)
    k = tl.arange(0, NB * BP)
    e = e0 + k // BP
    j = k % BP
    ok = (e < hi) & (j < B)
    col = tl.load(cols + e, mask=ok, other=0) * B + j
    w = _values(vals, e[None, :] * (B * B) + i[:, None] * B + j[None, :],
                (i < B)[:, None] & ok[None, :], BITS)
    return w, col, ok


@triton.jit
def _s24_blocks(vals, meta, cols, e0, hi, B: tl.constexpr, BP: tl.constexpr, HP: tl.constexpr,
                NB: tl.constexpr, BITS: tl.constexpr):
    """Kept values (fp32; codes when low-bit) [BP (out), NB*HP], their column inside the block, the block's first x column,
    and the valid mask (all [BP, NB*HP])."""
    i = tl.arange(0, BP)[:, None]
    k = tl.arange(0, NB * HP)[None, :]
    e = e0 + k // HP
    h = k % HP
    ok = (e < hi) & (h < B // 2) & (i < B)
    v = _values(vals, e * (B * B // 2) + i * (B // 2) + h, ok, BITS)
    bits = tl.load(meta + e * B + i, mask=ok, other=0).to(tl.int32) & 0xFFFF
    inner = 4 * (h // 2) + ((bits >> (2 * h)) & 3)
    first = tl.load(cols + e, mask=ok, other=0) * B
    return v, inner, first, ok


@triton.jit
def _store_output(acc, out, bias, m, out_col, c_ok, o_ok, N, HAS_BIAS: tl.constexpr):
    """y[m, out_col] = acc (+ bias), in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias + out_col, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    dest = out + m.to(tl.int64)[:, None] * N + out_col[None, :]
    tl.store(dest, acc.to(out.dtype.element_ty), mask=o_ok)


@triton.jit
def _decode_kernel(x, out, bias, partials, counters,
                   d_rowptr, d_cols, d_vals, s_rowptr, s_cols, s_vals, s_meta,
                   t_rowptr, t_cols, t_vals, t_pos, scales,
                   M, N, K_in, stride_xm, split, N_GROUPS, GS,
                   B: tl.constexpr, BP: tl.constexpr, HP: tl.constexpr, TOPK: tl.constexpr,
                   TOPK_STRIDE: tl.constexpr, BITS: tl.constexpr,
                   BM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr, NB: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.arange(0, BM)
    m_ok = m < M
    x_rows = x + m.to(tl.int64) * stride_xm
    i = tl.arange(0, BP)
    acc = tl.zeros([BM, BP], dtype=tl.float32)

    lo, hi = _tier_range(d_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        w, col, ok = _dense_blocks(d_vals, d_cols, e0, hi, B, BP, NB, BITS)
        w = _dequant(w, scales, (r * B + i)[:, None], col[None, :], ok[None, :], N, N_GROUPS,
                     GS, BITS)
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & (ok & (col < K_in))[None, :], other=0.0)
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

    lo, hi = _tier_range(s_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        v, inner, first, ok = _s24_blocks(s_vals, s_meta, s_cols, e0, hi, B, BP, HP, NB, BITS)
        col = first + inner
        v = _dequant(v, scales, (r * B + i)[:, None], col, ok, N, N_GROUPS, GS, BITS)
        xg = tl.load(x_rows[:, None, None] + col[None, :, :],
                     mask=m_ok[:, None, None] & (ok & (col < K_in))[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * v[None, :, :], axis=2)

    # Top-K: one kept entry of each of the NB blocks per inner step, so the live tensors stay
    # [BM, NB, BP] whatever K is.
    lo, hi = _tier_range(t_rowptr, r, s, split)
    for e0 in range(lo, hi, NB):
        e = e0 + tl.arange(0, NB)
        ok = e < hi
        first = tl.load(t_cols + e, mask=ok, other=0) * B
        for k in range(0, TOPK):
            v = _values(t_vals, e * TOPK_STRIDE + k, ok, BITS)
            p = tl.load(t_pos + e * TOPK + k, mask=ok, other=0).to(tl.int32)
            col = first + p % B
            v = _dequant(v, scales, r * B + p // B, col, ok, N, N_GROUPS, GS, BITS)
            xg = tl.load(x_rows[:, None] + col[None, :],
                         mask=m_ok[:, None] & (ok & (col < K_in))[None, :], other=0.0)
            contrib = xg.to(tl.float32) * v[None, :]                        # [BM, NB]
            to_row = ((p // B)[:, None] == i[None, :]).to(tl.float32)       # [NB, BP]
            acc += tl.sum(contrib[:, :, None] * to_row[None, :, :], axis=1)

    out_col = r * B + i
    c_ok = (i < B) & (out_col < N)
    o_ok = m_ok[:, None] & c_ok[None, :]
    if SPLIT_K:
        # The chunks of a block-row meet through fp32 partials [split, M, N]; the last chunk to
        # finish (an atomic count per block-row) adds them up and writes y, so no second launch.
        here = (s * M + m).to(tl.int64)[:, None] * N + out_col[None, :]
        tl.store(partials + here, acc, mask=o_ok)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(counters + r, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            total = tl.zeros([BM, BP], dtype=tl.float32)
            for t in range(0, split):
                there = (t * M + m).to(tl.int64)[:, None] * N + out_col[None, :]
                # .cg: from L2, where the other chunks' partials are (L1 is per SM)
                total += tl.load(partials + there, mask=o_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counters + r, 0)  # ready for the next launch (and autotuner reruns)
            _store_output(total, out, bias, m, out_col, c_ok, o_ok, N, HAS_BIAS)
    else:
        _store_output(acc, out, bias, m, out_col, c_ok, o_ok, N, HAS_BIAS)


@triton.jit
def _expand_column(tiers, slots, d_vals, s_vals, s_meta, t_dense, scales, r0, bc, NBR, NBC,
                   N, N_GROUPS, GS, B: tl.constexpr, BP: tl.constexpr, G: tl.constexpr,
                   BITS: tl.constexpr):
    """Blocks (r0 .. r0 + G - 1, bc) expanded to dense fp32 tiles [G, BP (out), BP (in)]; low-bit
    codes times the scales of their rows in block column bc's group (one group: G is a multiple
    of B).

    ``tiers`` / ``slots`` [NBR, NBC] give each block's tier and its index in that tier's arrays;
    ``t_dense`` holds the top-K blocks already expanded to B x B. Every entry is loaded under its
    tier's mask, so each block costs only its own bytes, and the tiers' expansions add up
    exactly (at most one of them is non-zero at any position).
    """
    g = tl.arange(0, G)
    block_row = r0 + g
    idx = block_row * NBC + bc
    tier_g = tl.load(tiers + idx, mask=block_row < NBR, other=-1).to(tl.int32)      # [G]
    slot_g = tl.load(slots + idx, mask=block_row < NBR, other=0)
    tier = tier_g[:, None, None]
    slot = slot_g[:, None, None]
    i = tl.arange(0, BP)[None, :, None]
    c = tl.arange(0, BP)[None, None, :]
    inside = (i < B) & (c < B)

    w = _values(d_vals, slot * (B * B) + i * B + c, inside & (tier == 0), BITS)

    # 2:4: column c of group q is kept by slot 2q or 2q+1 when that slot's position names it.
    is24 = inside & (tier == 1)
    meta = tl.load(s_meta + slot * B + i, mask=(i < B) & (tier == 1), other=0).to(tl.int32)
    q = c // 4
    kept = slot * (B * B // 2) + i * (B // 2) + 2 * q
    w += _values(s_vals, kept, is24 & (((meta >> (4 * q)) & 3) == c % 4), BITS)
    w += _values(s_vals, kept + 1, is24 & (((meta >> (4 * q + 2)) & 3) == c % 4), BITS)

    w += tl.load(t_dense + slot * (B * B) + i * B + c, mask=inside & (tier == 2),
                 other=0.0).to(tl.float32)
    return _dequant(w, scales, block_row[:, None, None] * B + i, bc * B, inside, N, N_GROUPS, GS,
                    BITS)


@triton.jit
def _gemm_kernel(x, out, bias, tiers, slots, d_vals, s_vals, s_meta, t_dense, scales,
                 M, N, K_in, stride_xm, NBR, NBC, N_GROUPS, GS,
                 B: tl.constexpr, BP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr):
    """Program: BLOCK_M rows of x x G block-rows (G*B output features), over all block columns.

    Each step loads one x tile [BLOCK_M, B] and the G blocks of that block column, expands them
    to a [G*BP, BP] weight tile in registers and feeds one tl.dot: every x tile serves G
    block-rows, every weight block BLOCK_M rows of x.
    """
    pid_m = tl.program_id(0)
    r0 = tl.program_id(1) * G
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x + m.to(tl.int64) * stride_xm
    j = tl.arange(0, BP)
    acc = tl.zeros([BLOCK_M, G * BP], dtype=tl.float32)
    for bc in range(0, NBC):
        col = bc * B + j
        xt = tl.load(x_rows[:, None] + col[None, :],
                     mask=m_ok[:, None] & ((j < B) & (col < K_in))[None, :], other=0.0)
        w = _expand_column(tiers, slots, d_vals, s_vals, s_meta, t_dense, scales, r0, bc, NBR,
                           NBC, N, N_GROUPS, GS, B, BP, G, BITS)
        w = tl.reshape(w, [G * BP, BP])
        if DOT_FP32:
            acc = tl.dot(xt.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)

    n = tl.arange(0, G * BP)
    out_col = (r0 + n // BP) * B + n % BP
    c_ok = (n % BP < B) & (out_col < N)
    if HAS_BIAS:
        acc += tl.load(bias + out_col, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    dest = out + m.to(tl.int64)[:, None] * N + out_col[None, :]
    tl.store(dest, acc.to(out.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# fp32 tiles are twice the registers: without software pipelining, or they spill.
_GEMM_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 64, "G": 4}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "G": 4}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "G": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "G": 8}, num_warps=8, num_stages=3),
]
_GEMM_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "G": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "G": 8}, num_warps=8, num_stages=1),
]
gemm_16bit = tuned(_GEMM_CONFIGS_16BIT, key=["M", "N", "K_in"])(_gemm_kernel)
gemm_fp32 = tuned(_GEMM_CONFIGS_FP32, key=["M", "N", "K_in"])(_gemm_kernel)


def block_index(dense_rowptr, dense_cols, s24_rowptr, s24_cols, topk_rowptr, topk_cols,
                block_cols: int):
    """Each block's tier code and its index in that tier's arrays: int8 and int32 [rows, cols].

    Blocks that no tier lists (never the case for a ``HybridWeight``) get tier -1: zero.
    """
    block_rows = dense_rowptr.shape[0] - 1
    tiers = dense_cols.new_full((block_rows * block_cols,), -1, dtype=torch.int8)
    slots = dense_cols.new_zeros((block_rows * block_cols,), dtype=torch.int32)
    for code, (rowptr, cols) in enumerate(((dense_rowptr, dense_cols), (s24_rowptr, s24_cols),
                                           (topk_rowptr, topk_cols))):
        ids = reference.block_ids(rowptr, cols, block_cols)
        tiers[ids] = code
        slots[ids] = torch.arange(cols.shape[0], device=cols.device, dtype=torch.int32)
    return tiers, slots


# NB: blocks per loop step. The first config (the interpreter's) has NB = 4, so the tests reach
# the masking of a last, partial step.
_DECODE_CONFIGS = [
    triton.Config({"NB": 4}, num_warps=4, num_stages=2),
    triton.Config({"NB": 1}, num_warps=2, num_stages=3),
    triton.Config({"NB": 2}, num_warps=4, num_stages=3),
    triton.Config({"NB": 8}, num_warps=8, num_stages=2),
]
decode_tuned = tuned(_DECODE_CONFIGS, key=["M", "N", "K_in"])(_decode_kernel)


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
        topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias=None, split=None,
        scales=None, group_size=0):
    """Host side of both kernels; ``split`` overrides ``decode_split`` (decode only). Low-bit
    values (int8, or int4 two per byte as uint8) come with ``scales [out, n_groups]`` and
    ``group_size``; y is in x's dtype either way."""
    x = x.contiguous()
    rows, in_features = x.shape
    block = dense_vals.shape[1]
    topk = topk_pos.shape[1]
    bits = {torch.int8: 8, torch.uint8: 4}.get(dense_vals.dtype, 16)
    low_bit = dict(scales=x if scales is None else scales.contiguous(),
                   N_GROUPS=0 if scales is None else scales.shape[1], GS=max(group_size, 1),
                   BITS=bits)
    block_rows = dense_rowptr.shape[0] - 1
    packed = (dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
              topk_rowptr, topk_cols, topk_vals, topk_pos)
    side = pow2_at_least(block, 16)  # BP: tl.dot needs tile sides >= 16
    y = x.new_empty((rows, out_features))
    if rows == 0:
        return y
    bias_arg = bias if bias is not None else y

    block_cols = -(-in_features // block)
    if rows > DECODE_MAX_ROWS:
        tiers, slots = block_index(dense_rowptr, dense_cols, s24_rowptr, s24_cols, topk_rowptr,
                                   topk_cols, block_cols)
        # Expanding a top-K block per use costs B*B*K compares; expanded once per call it is
        # one masked load, like a dense block (prefill is compute-bound; the extra bytes are not).
        topk_dense = reference.expand_topk(reference.value_codes(topk_vals, topk) if bits < 16
                                           else topk_vals, topk_pos, block)
        # The interpreter's bf16 tl.dot is wrong: it dots in fp32 (exact for 16-bit inputs).
        dot_fp32 = x.dtype == torch.float32 or interpreting()
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(block_rows, meta["G"]))
        kernel = gemm_fp32 if x.dtype == torch.float32 else gemm_16bit
        launch(kernel)[grid](
            x, y, bias_arg, tiers, slots, dense_vals, s24_vals, s24_meta, topk_dense,
            low_bit["scales"], rows, out_features, in_features, x.stride(0), block_rows,
            block_cols, low_bit["N_GROUPS"], low_bit["GS"], B=block, BP=side, BITS=bits,
            HAS_BIAS=bias is not None, DOT_FP32=dot_fp32)
        return y

    if split is None:
        split = decode_split(block_rows, block_cols, x.device)
    split_k = split > 1
    partials = x.new_empty((split, rows, out_features), dtype=torch.float32) if split_k else y
    # Zeroed per call (safe across streams); the kernel also leaves them at zero when it ends.
    counters = x.new_zeros((block_rows,), dtype=torch.int32) if split_k else y
    launch(decode_tuned)[(block_rows, split)](
        x, y, bias_arg, partials, counters, *packed, low_bit["scales"], rows, out_features,
        in_features, x.stride(0), split, low_bit["N_GROUPS"], low_bit["GS"], B=block, BP=side,
        HP=side // 2, TOPK=topk, TOPK_STRIDE=topk_vals.shape[1] * (2 if bits == 4 else 1),
        BITS=bits, BM=pow2_at_least(rows), HAS_BIAS=bias is not None, SPLIT_K=split_k)
    return y


@triton_op("sparse_kernels::triton_hybrid_linear")
def hybrid_linear(x: torch.Tensor, dense_rowptr: torch.Tensor, dense_cols: torch.Tensor,
                  dense_vals: torch.Tensor, s24_rowptr: torch.Tensor, s24_cols: torch.Tensor,
                  s24_vals: torch.Tensor, s24_meta: torch.Tensor, topk_rowptr: torch.Tensor,
                  topk_cols: torch.Tensor, topk_vals: torch.Tensor, topk_pos: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton ``hybrid_linear``: same contract as ``reference.hybrid_linear``."""
    return run(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
               s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias)


@triton_op("sparse_kernels::triton_hybrid_linear_q")
def hybrid_linear_q(x: torch.Tensor, dense_rowptr: torch.Tensor, dense_cols: torch.Tensor,
                    dense_vals: torch.Tensor, s24_rowptr: torch.Tensor, s24_cols: torch.Tensor,
                    s24_vals: torch.Tensor, s24_meta: torch.Tensor, topk_rowptr: torch.Tensor,
                    topk_cols: torch.Tensor, topk_vals: torch.Tensor, topk_pos: torch.Tensor,
                    scales: torch.Tensor, group_size: int, out_features: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton ``hybrid_linear_q`` (codes dequantized as they load): same contract as
    ``reference.hybrid_linear_q``."""
    return run(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
               s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias,
               scales=scales, group_size=group_size)
