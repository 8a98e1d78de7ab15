"""2:4 compaction in Triton: blocks [n, B, B] -> kept values [n, B, B/2] + int16 meta [n, B]."""
import torch
import triton
import triton.language as tl

from ._launch import launch, pow2_at_least, triton_op, tuned

_CONFIGS = [
    triton.Config({"ROWS": 32}, num_warps=4),
    triton.Config({"ROWS": 128}, num_warps=8),
]


@tuned(_CONFIGS, key=["total_rows"])
@triton.jit
def compress_kernel(blocks, values, meta, total_rows,
                     B: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr):
    """Program: ROWS block rows, each as GP (= pow2(B / 4)) groups of 4 columns.

    In each group the two slots take the non-zeros first, then the lowest zero columns, in
    ascending column order: entry a is kept when fewer than 2 entries of its group rank ahead of
    it (non-zero before zero, then lower column first), and its slot is 2 * group + the number of
    kept entries left of it, exactly as ``reference.compress_24``.
    """
    t = tl.program_id(0) * (ROWS * GP) + tl.arange(0, ROWS * GP)           # (row, group) pairs
    row = t // GP
    group = t % GP
    a = tl.arange(0, 4)
    valid = ((row < total_rows) & (group < B // 4))[:, None] & (a[None, :] < 4)
    col = group[:, None] * 4 + a[None, :]
    v = tl.load(blocks + row.to(tl.int64)[:, None] * B + col, mask=valid, other=0.0)
    nonzero = (v.to(tl.float32) != 0).to(tl.int32)  # bf16 compares wrongly in the interpreter

    nz_a = nonzero[:, :, None]
    nz_b = nonzero[:, None, :]
    left = a[None, None, :] < a[None, :, None]                              # b left of a
    ahead = (nz_b > nz_a) | ((nz_b == nz_a) & left)
    kept = (tl.sum(ahead.to(tl.int32), axis=2) < 2) & valid
    kept_left = tl.sum((left & kept[:, None, :]).to(tl.int32), axis=2)
    slot = 2 * group[:, None] + kept_left

    tl.store(values + row.to(tl.int64)[:, None] * (B // 2) + slot, v, mask=kept)
    bits = tl.sum(tl.where(kept, a[None, :] << (2 * slot), 0), axis=1)     # per (row, group)
    row_bits = tl.sum(tl.reshape(bits, [ROWS, GP]), axis=1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tl.store(meta + rows, row_bits.to(tl.int16), mask=rows < total_rows)


@triton_op("sparse_kernels::triton_compress_24")
def compress_24(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton ``compress_24``: same contract as ``reference.compress_24``."""
    blocks = blocks.contiguous()
    n, b, _ = blocks.shape
    values = blocks.new_empty((n, b, b // 2))
    meta = blocks.new_empty((n, b), dtype=torch.int16)
    if n:
        launch(compress_kernel)[lambda m: (triton.cdiv(n * b, m["ROWS"]),)](
            blocks, values, meta, n * b, B=b, GP=pow2_at_least(b // 4))
    return values, meta
