"""Fused Wanda scores in Triton: ``|W| * sqrt(act_sq_norm)`` and its block means, one pass."""
import torch
import triton
import triton.language as tl

from ._launch import launch, pow2_at_least, triton_op, tuned

_CONFIGS = [
    triton.Config({"CB": 8}, num_warps=4),
    triton.Config({"CB": 16}, num_warps=4),
    triton.Config({"CB": 32}, num_warps=8),
]


@tuned(_CONFIGS, key=["N", "K_in"])
@triton.jit
def wanda_kernel(w, norm, scores, block_scores, N, K_in, NBC,
                  B: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr):
    """Program (block-row r, group g): the [B, CB * B] strip of CB blocks, as [BP, CB, BP]."""
    r = tl.program_id(0)
    g = tl.program_id(1)
    i = tl.arange(0, BP)[:, None, None]            # row inside the block
    q = tl.arange(0, CB)[None, :, None]            # block inside the strip
    j = tl.arange(0, BP)[None, None, :]            # column inside the block
    row = r * B + i
    col = (g * CB + q) * B + j
    ok = (i < B) & (j < B) & (row < N) & (col < K_in)
    offsets = row.to(tl.int64) * K_in + col
    weight = tl.load(w + offsets, mask=ok, other=0.0).to(tl.float32)
    scale = tl.sqrt(tl.load(norm + col, mask=(j < B) & (col < K_in), other=0.0).to(tl.float32))
    s = tl.abs(weight) * scale
    tl.store(scores + offsets, s, mask=ok)
    total = tl.sum(tl.sum(s, axis=2), axis=0)                    # [CB]
    count = tl.sum(tl.sum(ok.to(tl.float32), axis=2), axis=0)
    block_col = g * CB + tl.arange(0, CB)
    tl.store(block_scores + r * NBC + block_col, total / tl.maximum(count, 1.0),
             mask=block_col < NBC)


@triton_op("sparse_kernels::triton_wanda_scores")
def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton ``wanda_scores``: same contract as ``reference.wanda_scores``."""
    weight = weight.contiguous()
    act_sq_norm = act_sq_norm.contiguous()
    out_f, in_f = weight.shape
    nbr, nbc = triton.cdiv(out_f, block_size), triton.cdiv(in_f, block_size)
    scores = weight.new_empty((out_f, in_f), dtype=torch.float32)
    block_scores = weight.new_empty((nbr, nbc), dtype=torch.float32)
    if scores.numel():
        launch(wanda_kernel)[lambda meta: (nbr, triton.cdiv(nbc, meta["CB"]))](
            weight, act_sq_norm, scores, block_scores, out_f, in_f, nbc,
            B=block_size, BP=pow2_at_least(block_size))
    return scores, block_scores
