"""2:4 compaction in Triton: blocks [n, B, B] -> kept values [n, B, B/2] + int16 meta [n, B]."""
import torch
import triton
import triton.language as tl

from ._launch import launch, pow2_at_least, triton_op, tuned

_CONFIGS = [
    triton.Config({"ROWS": 64}, num_warps=4),
    triton.Config({"ROWS": 256}, num_warps=8),
]


@tuned(_CONFIGS, key=["total_rows"])
@triton.jit
def _compress_kernel(blocks, values, meta, total_rows,
                     B: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr):
    """Program: ROWS block rows (B columns each, as CP = pow2(B) lanes).

    In each group of 4 columns the two slots take the non-zeros first, then the lowest zero
    columns, in ascending column order: entry a is kept when fewer than 2 entries of its group
    rank ahead of it (non-zero before zero, then lower column first), and its slot is 2 * group
    + the number of kept entries left of it in the group, exactly as ``reference.compress_24``.
    """
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, CP)
    valid = (row[:, None] < total_rows) & (c[None, :] < B)
    v = tl.load(blocks + row.to(tl.int64)[:, None] * B + c[None, :], mask=valid, other=0.0)
    nonzero = (v.to(tl.float32) != 0).to(tl.int32)  # bf16 compares wrongly in the interpreter

    same_group = (c[:, None] // 4) == (c[None, :] // 4)                     # [CP(a), CP(b)]
    left = c[None, :] < c[:, None]                                          # b left of a
    nz_a = nonzero[:, :, None]
    nz_b = nonzero[:, None, :]
    ahead = same_group[None] & ((nz_b > nz_a) | ((nz_b == nz_a) & left[None]))
    kept = (tl.sum(ahead.to(tl.int32), axis=2) < 2) & valid
    kept_left = tl.sum((same_group & left)[None] & kept[:, None, :], axis=2)
    slot = 2 * (c[None, :] // 4) + kept_left

    tl.store(values + row.to(tl.int64)[:, None] * (B // 2) + slot, v, mask=kept)
    bits = tl.where(kept, (c[None, :] % 4) << (2 * slot), 0)
    tl.store(meta + row, tl.sum(bits, axis=1).to(tl.int16), mask=row < total_rows)


@triton_op("sparse_kernels::triton_compress_24")
def compress_24(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton ``compress_24``: same contract as ``reference.compress_24``."""
    blocks = blocks.contiguous()
    n, b, _ = blocks.shape
    values = blocks.new_empty((n, b, b // 2))
    meta = blocks.new_empty((n, b), dtype=torch.int16)
    if n:
        launch(_compress_kernel)[lambda m: (triton.cdiv(n * b, m["ROWS"]),)](
            blocks, values, meta, n * b, B=b, CP=pow2_at_least(b))
    return values, meta
