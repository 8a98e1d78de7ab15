"""The hybrid matmul: every backend against the torch reference, plus the op contract."""
import os
import subprocess
import sys

import pytest
import torch

import sparse_kernels as sk
from sparse_kernels import reference
from conftest import DTYPES, TOLERANCE, expected_linear, needs_cpu_backend, random_hybrid

SHAPES = [(37, 70), (1, 16), (16, 1), (64, 48), (100, 33)]
ROWS = [1, 2, 3, 4, 9, 17, 33]


def check_backend(backend, hw, masked, x, bias):
    got = sk.hybrid_linear(x, hw, bias, backend=backend)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], hw.out_features)
    torch.testing.assert_close(got, expected_linear(x, masked, bias), **TOLERANCE[x.dtype])


@needs_cpu_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_cpu_matches_reference(dtype, shape, rows):
    hw, masked = random_hybrid(*shape, dtype=dtype, seed=rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    check_backend("cpu", hw, masked, x, bias)
    check_backend("cpu", hw, masked, x, None)


@needs_cpu_backend
@pytest.mark.parametrize("block_size", [4, 8, 12])
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_cpu_other_block_sizes(block_size, rows):
    hw, masked = random_hybrid(45, 50, block_size=block_size, topk=7)
    x = torch.randn(rows, 50)
    check_backend("cpu", hw, masked, x, torch.randn(45))


@needs_cpu_backend
@pytest.mark.parametrize("ratios", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])
def test_cpu_single_tier(ratios, rows):
    hw, masked = random_hybrid(48, 80, ratios=ratios)
    check_backend("cpu", hw, masked, torch.randn(rows, 80), None)


@needs_cpu_backend
@pytest.mark.parametrize("rows", [1, 2, 8, 24])
def test_cpu_block_rows_missing_a_tier(rows):
    # Block-row 0 has no dense block, block-row 1 no 2:4 block, block-row 2 only top-K.
    tiers = torch.tensor([[1, 2, 1, 2], [0, 2, 0, 0], [2, 2, 2, 2]], dtype=torch.int8)
    hw, masked = random_hybrid(40, 64, tier_map=tiers, topk=3)
    check_backend("cpu", hw, masked, torch.randn(rows, 64), torch.randn(40))


@needs_cpu_backend
def test_cpu_strided_and_batched_inputs():
    hw, masked = random_hybrid(37, 70)
    wide = torch.randn(6, 140)
    check_backend("cpu", hw, masked, wide[:, ::2], None)  # non-contiguous rows
    check_backend("cpu", hw, masked, torch.randn(70, 5).t(), None)  # transposed
    check_backend("cpu", hw, masked, torch.randn(2, 3, 70), torch.randn(37))  # leading dims
    check_backend("cpu", hw, masked, torch.randn(2, 20, 70), None)  # GEMM path, leading dims


@needs_cpu_backend
@pytest.mark.parametrize("isa", sk.supported_cpu_isas())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("topk", [5, 64])  # 64: decode spreads top-K blocks into dense tiles
def test_every_cpu_isa_matches_reference(isa, dtype, rows, topk):
    # Each ISA variant is its own compiled code: all of them, not only the one this CPU picks.
    hw, masked = random_hybrid(100, 130, dtype=dtype, seed=rows, topk=topk)
    x = torch.randn(rows, 130).to(dtype)
    active = sk.cpu_isa()
    try:
        assert sk.cpu_isa(isa) == isa
        check_backend("cpu", hw, masked, x, torch.randn(100).to(dtype))
    finally:
        sk.cpu_isa(active)


@needs_cpu_backend
def test_cpu_isa_names_the_choices():
    assert sk.supported_cpu_isas()[0] == "generic"
    assert sk.cpu_isa() in sk.supported_cpu_isas()
    with pytest.raises(RuntimeError, match="unknown CPU ISA 'sse9'; use generic, avx2, avx512"):
        sk.cpu_isa("sse9")
    if sk.supported_cpu_isas()[-1] != "avx512":
        with pytest.raises(RuntimeError, match="does not support avx512"):
            sk.cpu_isa("avx512")
    supported, active = sk.supported_cpu_isas(), sk.cpu_isa()
    try:  # what the CPU supports does not depend on what is forced
        sk.cpu_isa("generic")
        assert sk.supported_cpu_isas() == supported
        assert sk.cpu_isa("auto") == supported[-1]
    finally:
        sk.cpu_isa(active)


@needs_cpu_backend
def test_cpu_isa_environment_variable():
    code = "import sparse_kernels as sk; print(sk.cpu_isa())"
    env = {**os.environ, "SPARSE_KERNELS_CPU_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "generic", out.stderr


@pytest.mark.parametrize("backend", sk.available_backends())
def test_empty_batch(backend):
    hw, _ = random_hybrid(20, 30)
    assert sk.hybrid_linear(torch.randn(0, 30), hw, backend=backend).shape == (0, 20)


def test_torch_backend_is_the_reference():
    hw, masked = random_hybrid(37, 70, dtype=torch.float16)
    x = torch.randn(4, 70).half()
    check_backend("torch", hw, masked, x, None)


@pytest.mark.parametrize("rows", [1, 20])
def test_opcheck(rows):
    hw, _ = random_hybrid(37, 70)
    args = (torch.randn(rows, 70), *hw.packed_tensors(), 37, torch.randn(37))
    torch.library.opcheck(torch.ops.sparse_kernels.hybrid_linear.default, args)


def test_reference_is_compilable():
    hw, masked = random_hybrid(32, 48)
    fn = torch.compile(reference.hybrid_linear, fullgraph=True)
    x = torch.randn(3, 48)
    torch.testing.assert_close(fn(x, *hw.packed_tensors(), 32, None), x @ masked.t())


# ---------------------------------------------------------------- bad input
def test_rejects_wrong_input_width():
    hw, _ = random_hybrid(20, 30)
    with pytest.raises(ValueError, match="x has 31 input features"):
        sk.hybrid_linear(torch.randn(2, 31), hw)


def test_rejects_dtype_mismatch():
    hw, _ = random_hybrid(20, 30)
    with pytest.raises(TypeError, match="x is torch.float16 but the weight values are "
                                        "torch.float32"):
        sk.hybrid_linear(torch.randn(2, 30).half(), hw)


def test_rejects_bad_bias():
    hw, _ = random_hybrid(20, 30)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        sk.hybrid_linear(torch.randn(2, 30), hw, torch.randn(21))


@needs_cpu_backend
def test_cpu_kernel_checks_arguments():
    hw, _ = random_hybrid(20, 30)
    packed = list(hw.packed_tensors())
    packed[6] = packed[6].int()  # s24_meta must be int16
    with pytest.raises(RuntimeError, match="s24_meta must be int16"):
        torch.ops.sparse_kernels.hybrid_linear(torch.randn(2, 30), *packed, 20, None)
    with pytest.raises(RuntimeError, match=r"rowptr must be int32 \[ceil\(out/B\) \+ 1\]"):
        torch.ops.sparse_kernels.hybrid_linear(torch.randn(2, 30), *hw.packed_tensors(), 40,
                                               None)
