"""A numpy model of the warp-level tensor-core instructions the CUDA kernels issue.

Encodes, from the PTX ISA fragment tables (sections "Matrix Fragments for mma.m16n8k16 with
floating point type" and "Matrix Fragments for sparse mma.m16n8k16 with .f16 and .bf16 types"),
which matrix element each lane's register element holds, and rebuilds the matrices from the 32
lanes' registers as the hardware would:

* ``mma_sync``: ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32``
* ``mma_sp``: ``mma.sp::ordered_metadata.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}...f32``

Registers are arrays indexed ``[lane, register, element]``: a 16-bit operand register holds two
elements (element 0 = low half), an fp32 accumulator register one. It is independent of the
kernel's index code (csrc/cuda/mma_layout.cuh) on purpose: tests compare the two.
"""
import numpy as np

LANES = 32


def _group(lane):
    return lane >> 2


def _thread_in_group(lane):
    return lane % 4


# --------------------------------------------------------------------- fragment tables (PTX)
def a_coord(lane, i):
    """(row, col) of element a_i (0..7) of dense m16n8k16 A, f16/bf16."""
    g, t = _group(lane), _thread_in_group(lane)
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_coord(lane, i):
    """(row k, col n) of element b_i (0..3) of m16n8k16 B, f16/bf16."""
    g, t = _group(lane), _thread_in_group(lane)
    row = t * 2 + (i & 1) + (8 if i >= 2 else 0)
    return row, g


def c_coord(lane, i):
    """(row, col) of element c_i / d_i (0..3) of the m16n8 fp32 accumulator."""
    g, t = _group(lane), _thread_in_group(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def sparse_a_coord(lane, i):
    """(row, compressed col) of element a_i (0..3) of sparse m16n8k16 A, f16/bf16.

    The ISA gives row g for a0, a1 and g + 8 for a2, a3, and the 4-wide chunk ``4t..4t+3`` of
    the uncompressed row; its two non-zeros are compressed columns 2t, 2t+1 in that order.
    """
    g, t = _group(lane), _thread_in_group(lane)
    return (g if i < 2 else g + 8), 2 * t + (i & 1)


def metadata_source(row, selector):
    """Lane and bit offset whose metadata register describes ``row`` of sparse m16n8k16 A.

    f16/bf16 m16n8k16: one lane per quad holds metadata, lane 4*g + selector (selector 0..3),
    rows g in bits 0..15 and g + 8 in bits 16..31; chunk c of a row in 4 bits starting at 4c,
    the first non-zero's 2-bit index in the lower bits.
    """
    if not 0 <= selector <= 3:
        raise ValueError(f"sparsity selector of m16n8k16 f16/bf16 is 0..3, got {selector}")
    return 4 * (row % 8) + selector, 16 * (row // 8)


# --------------------------------------------------------------------- matrix reconstruction
def _gather(regs, shape, coord):
    """A matrix of ``shape`` from per-lane registers, element i of a lane at coord(lane, i)."""
    per_lane = regs.reshape(LANES, -1)
    out = np.zeros(shape, np.float64)
    for lane in range(LANES):
        for i in range(per_lane.shape[1]):
            out[coord(lane, i)] = per_lane[lane, i]
    return out


def gather_a(a_regs):
    """Dense A [16, 16] from a_regs [32, 4, 2]."""
    return _gather(a_regs, (16, 16), a_coord)


def gather_b(b_regs):
    """B [16, 8] from b_regs [32, 2, 2]."""
    return _gather(b_regs, (16, 8), b_coord)


def gather_c(c_regs):
    """Accumulator [16, 8] from c_regs [32, 4]."""
    return _gather(c_regs, (16, 8), c_coord)


def scatter_d(d):
    """Accumulator [16, 8] -> registers [32, 4] (the result layout equals the C layout)."""
    regs = np.zeros((LANES, 4), np.float64)
    for lane in range(LANES):
        for i in range(4):
            regs[lane, i] = d[c_coord(lane, i)]
    return regs


def gather_sparse_a(a_regs, meta_regs, selector):
    """Uncompressed A [16, 16] from sparse a_regs [32, 2, 2] and meta_regs [32] (uint32).

    Raises ValueError on metadata the ordered-metadata instruction leaves undefined: two equal
    indices in a chunk, or indices not in increasing order.
    """
    compressed = np.zeros((16, 8), np.float64)
    for lane in range(LANES):
        for i in range(4):
            compressed[sparse_a_coord(lane, i)] = a_regs[lane, i // 2, i % 2]
    a = np.zeros((16, 16), np.float64)
    for row in range(16):
        lane, shift = metadata_source(row, selector)
        bits = (int(meta_regs[lane]) >> shift) & 0xFFFF
        for chunk in range(4):
            first, second = (bits >> (4 * chunk)) & 3, (bits >> (4 * chunk + 2)) & 3
            if first >= second:
                raise ValueError(f"row {row} chunk {chunk}: metadata indices {first}, {second} "
                                 f"are not strictly increasing (undefined behaviour)")
            a[row, 4 * chunk + first] = compressed[row, 2 * chunk]
            a[row, 4 * chunk + second] = compressed[row, 2 * chunk + 1]
    return a


# --------------------------------------------------------------------- instructions
def mma_sync(a_regs, b_regs, c_regs):
    """Dense m16n8k16: per-lane D registers [32, 4] for D = A @ B + C (fp64 arithmetic)."""
    d = gather_a(np.asarray(a_regs)) @ gather_b(np.asarray(b_regs)) + gather_c(np.asarray(c_regs))
    return scatter_d(d)


def mma_sp(a_regs, b_regs, c_regs, meta_regs, selector):
    """Sparse m16n8k16: per-lane D registers [32, 4] for D = decompress(A, meta) @ B + C."""
    a = gather_sparse_a(np.asarray(a_regs), np.asarray(meta_regs), selector)
    return scatter_d(a @ gather_b(np.asarray(b_regs)) + gather_c(np.asarray(c_regs)))
