"""The Triton backend against the torch reference.

On a GPU the kernels run compiled on CUDA tensors; without one they run on CPU tensors through
Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1``), so shapes stay small. The
interpreter's bf16 ``tl.dot`` is wrong, so interpreted kernels dot in fp32 and every bf16
result is compared after an fp32 cast, at bf16 tolerance. A separate test compiles every
kernel for sm_80 and sm_90 with Triton's real compiler, which needs no GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import sparse_kernels as sk
from sparse_kernels import reference
from sparse_kernels.backends import resolve_backend
from conftest import DTYPES, TOLERANCE, expected_linear, random_hybrid
from test_pruning_ops import _bits, _dense_rank, _random_24_blocks, _score_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(
    "triton" not in sk.available_backends(),
    reason=f"the Triton backend cannot run here: {sk.triton.UNAVAILABLE_REASON}")

pytestmark = needs_triton


def _check_linear(hw, masked, x, bias, **run_kwargs):
    hw, masked, x = hw.to(device=DEVICE), masked.to(DEVICE), x.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    if run_kwargs:  # the host function directly, to reach its internal choices
        if "scales" in run_kwargs:
            run_kwargs["scales"] = run_kwargs["scales"].to(DEVICE)
        got = sk.triton.hybrid_linear.run(x, *hw.packed_tensors(), hw.out_features, bias,
                                          **run_kwargs)
    else:
        got = sk.hybrid_linear(x, hw, bias, backend="triton")
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], hw.out_features)
    torch.testing.assert_close(got.float(), expected_linear(x, masked, bias).float(),
                               **TOLERANCE[x.dtype])


# --------------------------------------------------------------------------------------------
# hybrid_linear: decode kernel (1-16 rows) and GEMM kernel (more rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 70), (16, 1), (50, 33)])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_hybrid_linear_matches_reference(dtype, shape, rows):
    hw, masked = random_hybrid(*shape, dtype=dtype, seed=rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    _check_linear(hw, masked, x, torch.randn(shape[0], generator=g).to(dtype))
    _check_linear(hw, masked, x, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [2, 3, 7])
def test_decode_split_k(dtype, split):
    # More chunks than some block-rows have blocks of a tier: empty chunks must add nothing.
    hw, masked = random_hybrid(40, 100, dtype=dtype)
    x = torch.randn(5, 100).to(dtype)
    _check_linear(hw, masked, x, torch.randn(40).to(dtype), split=split)
    _check_linear(hw, masked, x, None, split=split)


@pytest.mark.parametrize("ratios", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("rows", [1, 20])
def test_single_tier(ratios, rows):
    hw, masked = random_hybrid(48, 80, dtype=torch.float16, ratios=ratios)
    _check_linear(hw, masked, torch.randn(rows, 80).half(), None)


@pytest.mark.parametrize("rows", [2, 24])
def test_block_rows_missing_a_tier(rows):
    tiers = torch.tensor([[1, 2, 1, 2], [0, 2, 0, 0], [2, 2, 2, 2]], dtype=torch.int8)
    hw, masked = random_hybrid(40, 64, tier_map=tiers, topk=3)
    _check_linear(hw, masked, torch.randn(rows, 64), torch.randn(40))


@pytest.mark.parametrize("block_size,topk", [(4, 3), (8, 7), (12, 20), (16, 64)])
@pytest.mark.parametrize("rows", [1, 20])
def test_other_block_sizes(block_size, topk, rows):
    # (16, 64): the top-K of a byte-budget prune, a quarter of the block.
    hw, masked = random_hybrid(45, 50, block_size=block_size, topk=topk)
    _check_linear(hw, masked, torch.randn(rows, 50), torch.randn(45))


def test_strided_and_batched_inputs():
    hw, masked = random_hybrid(37, 70, dtype=torch.float16)
    wide = torch.randn(3, 140).half()
    _check_linear(hw, masked, wide[:, ::2], None)
    _check_linear(hw, masked, torch.randn(70, 20).half().t(), None)
    _check_linear(hw, masked, torch.randn(2, 3, 70).half(), None)


def test_empty_batch():
    hw, _ = random_hybrid(20, 30)
    out = sk.hybrid_linear(torch.randn(0, 30, device=DEVICE), hw.to(device=DEVICE),
                           backend="triton")
    assert out.shape == (0, 20)


def test_module_under_torch_compile():
    hw, masked = random_hybrid(37, 70)
    module = sk.HybridSparseLinear.from_weight(hw.to(device=DEVICE), torch.randn(37, device=DEVICE),
                                               backend="triton")
    # Interpreted kernels live in an opaque op, which only the eager backends can call.
    compiled = torch.compile(module, fullgraph=True,
                             backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    for rows in (2, 20):
        x = torch.randn(rows, 70, device=DEVICE)
        torch.testing.assert_close(compiled(x), module(x), **TOLERANCE[torch.float32])


# --------------------------------------------------------------------------------------------
# hybrid_linear_q: the same kernels dequantizing int8 / int4 codes as they load


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("shape,group,topk", [((37, 70), 32, 41), ((20, 130), 64, 5)])
def test_low_bit_matches_reference(bits, dtype, rows, shape, group, topk):
    hw, dense = random_hybrid(*shape, topk=topk, bits=bits, group_size=group, seed=rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    _check_linear(hw, dense, x, torch.randn(shape[0], generator=g).to(dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_split_k_and_single_tiers(bits):
    hw, dense = random_hybrid(40, 100, topk=41, bits=bits, group_size=32)
    x = torch.randn(5, 100)
    _check_linear(hw, dense, x, None, split=3, scales=hw.scales, group_size=32)
    for ratios in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        hw, dense = random_hybrid(48, 80, topk=41, bits=bits, group_size=16, ratios=ratios)
        for rows in (2, 20):
            _check_linear(hw, dense, torch.randn(rows, 80).half(), None)


# --------------------------------------------------------------------------------------------
# pruning-side ops, bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 12, 16])
def test_wanda_scores_matches_reference(dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    for shape in [(37, 70), (1, 16), (33, 5)]:
        weight = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
        norm = torch.rand(shape[1], generator=g).to(DEVICE)
        scores, blocks = sk.wanda_scores(weight, norm, block_size, backend="triton")
        ref_scores, ref_blocks = reference.wanda_scores(weight, norm, block_size)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(blocks, ref_blocks, rtol=1e-5, atol=1e-6)


def _selection_inputs(shape, dtype, seed):
    """Continuous, heavily tied, and NaN / -0 / +-inf scores (the layouts are the CPU tests')."""
    for kind, scores in _score_inputs(shape, dtype, seed, infinities=True):
        if kind not in ("strided", "transposed"):
            yield kind, scores.to(DEVICE)


# Each interpreted launch costs tens of milliseconds: dtypes are covered at one block size.
@pytest.mark.parametrize("dtype,block_size", [(torch.float32, 4), (torch.float32, 12),
                                              (torch.float32, 16), (torch.bfloat16, 16),
                                              (torch.float16, 16)])
def test_block_topk_mask_matches_reference(dtype, block_size):
    for i, shape in enumerate([(37, 70), (5, 3)]):
        for kind, scores in _selection_inputs(shape, dtype, seed=10 + i):
            for k in sorted({1, 15, block_size * block_size}):
                got = sk.block_topk_mask(scores, k, block_size, backend="triton")
                want = reference.block_topk_mask(_dense_rank(scores), k, block_size)
                assert got.dtype == torch.bool and torch.equal(got, want), (shape, kind, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 1), (3, 5), (5, 40)])
def test_nm_mask_matches_reference(dtype, n, m):
    for i, shape in enumerate([(37, 70), (5, 3), (16, 1)]):
        for kind, scores in _selection_inputs(shape, dtype, seed=20 + i):
            got = sk.nm_mask(scores, n, m, backend="triton")
            want = reference.nm_mask(_dense_rank(scores), n, m)
            assert got.dtype == torch.bool and torch.equal(got, want), (shape, kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 12, 16])
def test_compress_24_matches_reference(dtype, block_size):
    for seed, (nb, most, nan) in enumerate([(37, 2, False), (1, 2, False), (20, 4, True),
                                            (0, 2, False)]):
        blocks = _random_24_blocks(nb, block_size, dtype, seed, most, nan).to(DEVICE)
        vals, meta = sk.compress_24(blocks, backend="triton")
        ref_vals, ref_meta = reference.compress_24(blocks)
        assert torch.equal(_bits(vals), _bits(ref_vals)), (nb, most, nan)
        assert torch.equal(meta, ref_meta), (nb, most, nan)


# --------------------------------------------------------------------------------------------
# op contract, dispatch, compilation for real GPUs


def _opcheck_cases():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(20, 36, generator=g)
    hw, _ = random_hybrid(37, 70)
    low, _ = random_hybrid(37, 70, topk=41, bits=4, group_size=32)
    cases = {
        "triton_wanda_scores": (w, torch.rand(36, generator=g), 8),
        "triton_block_topk_mask": (w, 5, 8),
        "triton_nm_mask": (w, 2, 4),
        "triton_compress_24": (_random_24_blocks(3, 8, torch.float32, seed=9),),
        "triton_hybrid_linear": (torch.randn(3, 70), *hw.packed_tensors(), 37, torch.randn(37)),
        "triton_hybrid_linear_q": (torch.randn(3, 70), *low.packed_tensors(), low.scales, 32, 37,
                                   torch.randn(37)),
    }
    return {name: tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
            for name, args in cases.items()}


@pytest.mark.parametrize("op", ["triton_wanda_scores", "triton_block_topk_mask",
                                "triton_nm_mask", "triton_compress_24", "triton_hybrid_linear",
                                "triton_hybrid_linear_q"])
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.sparse_kernels, op).default, _opcheck_cases()[op])


def test_dispatch():
    assert resolve_backend("triton", DEVICE) == "triton"
    if DEVICE.type == "cpu":
        # The interpreter serves forced calls only: the C++ kernels stay the CPU default.
        assert resolve_backend(None, DEVICE) != "triton"
    else:
        assert resolve_backend(None, DEVICE) in ("cuda", "triton")
        hw, masked = random_hybrid(37, 70)
        x = torch.randn(2, 70, device=DEVICE)
        direct = torch.ops.sparse_kernels.hybrid_linear(x, *hw.to(device=DEVICE).packed_tensors(),
                                                        37, None)
        torch.testing.assert_close(direct, expected_linear(x, masked.to(DEVICE), None))


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler builds on Linux only")
def test_every_kernel_and_config_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "sparse_kernels.triton.compile_check",
                           "--arch", "80", "90"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    # Every kernel variant x autotune config x 3 dtypes x 2 targets, all of them.
    assert len(compiled) >= 7 * 3 * 2, done.stdout
    assert f"compiled {len(compiled)} of {len(compiled)}" in done.stdout, done.stdout
