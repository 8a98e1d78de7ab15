"""The low-bit hybrid matmul (``hybrid_linear_q``): every CPU build against the dequantizing
torch reference for tier x bits x activation dtype x awkward shapes, and the op contract."""
import pytest
import torch

import sparse_kernels as sk
from conftest import DTYPES, TOLERANCE, expected_linear, needs_cpu_backend, random_hybrid

# (out, in, group): neither dimension a multiple of 16, ragged last groups, one group, many.
SHAPES = [(37, 70, 32), (17, 200, 64), (50, 130, 128), (5, 48, 16), (64, 256, 64)]


def check_cpu(hw, dense, x, bias=None):
    got = sk.hybrid_linear(x, hw, bias, backend="cpu")
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], hw.out_features)
    torch.testing.assert_close(got, expected_linear(x, dense, bias), **TOLERANCE[x.dtype])


@needs_cpu_backend
@pytest.mark.parametrize("isa", sk.supported_cpu_isas())
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 33])
def test_every_cpu_isa_matches_the_reference(isa, bits, dtype, rows):
    active = sk.cpu_isa()
    try:
        sk.cpu_isa(isa)
        for out_f, in_f, g in SHAPES:
            for topk in (5, 41, 64):  # odd K leaves an int4 padding nibble; 64 decodes as tiles
                hw, dense = random_hybrid(out_f, in_f, topk=topk, bits=bits, group_size=g,
                                          seed=out_f + topk)
                x = torch.randn(rows, in_f).to(dtype)
                check_cpu(hw, dense, x, torch.randn(out_f).to(dtype))
    finally:
        sk.cpu_isa(active)


@needs_cpu_backend
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("ratios", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("rows", [1, 16])
def test_single_tier_weights(bits, ratios, rows):
    hw, dense = random_hybrid(48, 96, ratios=ratios, topk=41, bits=bits, group_size=32)
    check_cpu(hw, dense, torch.randn(rows, 96))


@needs_cpu_backend
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size,group", [(4, 8), (8, 24), (12, 36)])
@pytest.mark.parametrize("rows", [1, 20])
def test_other_block_sizes_decompress(bits, block_size, group, rows):
    hw, dense = random_hybrid(30, 75, block_size=block_size, topk=5, bits=bits,
                              group_size=group)
    check_cpu(hw, dense, torch.randn(rows, 75).half())


@needs_cpu_backend
def test_strided_and_batched_inputs():
    hw, dense = random_hybrid(40, 70, topk=41, bits=4, group_size=32)
    x = torch.randn(3, 5, 140)[..., ::2]
    check_cpu(hw, dense, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 20])
def test_opcheck(bits, rows):
    hw, _ = random_hybrid(37, 70, topk=41, bits=bits, group_size=32)
    args = (torch.randn(rows, 70), *hw.packed_tensors(), hw.scales, 32, 37, torch.randn(37))
    torch.library.opcheck(torch.ops.sparse_kernels.hybrid_linear_q.default, args)


@needs_cpu_backend
def test_cpu_kernel_checks_arguments():
    hw, _ = random_hybrid(20, 70, topk=41, bits=4, group_size=32)
    packed, x = list(hw.packed_tensors()), torch.randn(2, 70)
    op = torch.ops.sparse_kernels.hybrid_linear_q
    with pytest.raises(RuntimeError, match=r"scales must be float16 \[out_features, "
                                           r"ceil\(in_features / group_size\)\] = \[20, 3\]"):
        op(x, *packed, hw.scales[:, :2], 32, 20, None)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of the "
                                           "block size 16, got 24"):
        op(x, *packed, hw.scales, 24, 20, None)
    with pytest.raises(RuntimeError, match="int8 .8-bit codes. or uint8"):
        op(x, *[t.float() if i in (2, 5, 9) else t for i, t in enumerate(packed)],
           hw.scales, 32, 20, None)
    with pytest.raises(RuntimeError, match=r"topk_vals must be \[\d+, 21\] for K = 41"):
        op(x, *packed[:9], torch.zeros(packed[9].shape[0], 41, dtype=torch.uint8), packed[10],
           hw.scales, 32, 20, None)
