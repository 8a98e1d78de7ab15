"""The CUDA backend (csrc/cuda) against the pure-torch reference, through the public API with
``backend="cuda"``: the hybrid matmul within the per-dtype tolerance, the pruning ops bit for bit
(ties, NaN, -0.0, ragged blocks), ``torch.library.opcheck`` and the binding's argument checks.

Every test needs a GPU and a library built with the CUDA kernels; each one skips on its own
where either is missing."""
import pytest
import torch

import sparse_kernels as sk
from sparse_kernels import backends, decode_layout
from conftest import DTYPES, TOLERANCE, expected_linear, random_hybrid
from sparse_kernels import apply_tier_map
from test_pruning_ops import NM, SHAPES, _bits, _random_24_blocks, _score_inputs

OPS = ("wanda_scores", "block_topk_mask", "nm_mask", "compress_24", "hybrid_linear",
       "hybrid_linear_decode", "unpack_hybrid", "unpack_hybrid_q")


def _cuda_skip_reason(op: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_kernels::{op}", "CUDA"):
        return (f"no CUDA kernel registered for sparse_kernels::{op} (build with a CUDA build "
                "of torch and nvcc)")
    return None


def needs_cuda(*ops: str):
    """Skip the test unless a GPU is present and every op in `ops` has a CUDA kernel."""
    reasons = list(dict.fromkeys(r for r in map(_cuda_skip_reason, ops) if r is not None))
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


pytestmark = pytest.mark.gpu


# --------------------------------------------------------------------------------------------
# hybrid_linear

LINEAR_SHAPES = [(37, 70), (100, 33), (16, 1), (129, 250)]
ROWS = [1, 3, 16, 17, 64, 300]


def _expected(x, masked, bias):
    """The expected output, computed on the CPU."""
    return expected_linear(x.cpu(), masked.cpu(), None if bias is None else bias.cpu())


def _check_linear(hw, masked, x, bias=None):
    got = sk.hybrid_linear(x, hw, bias, backend="cuda")
    assert got.device == x.device and got.dtype == x.dtype
    assert got.shape == (*x.shape[:-1], hw.out_features)
    torch.testing.assert_close(got.cpu(), _expected(x, masked, bias), **TOLERANCE[x.dtype])


def _random_x(rows, in_features, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_features, generator=g).to(dtype).cuda()


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_hybrid_linear_matches_reference(dtype, shape, rows):
    hw, masked = random_hybrid(*shape, dtype=dtype, seed=rows)
    hw = hw.to("cuda")
    x = _random_x(rows, shape[1], dtype)
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    _check_linear(hw, masked, x, bias)
    _check_linear(hw, masked, x, None)


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("ratios", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.35, 0.45, 0.20)],
                         ids=["all-dense", "all-2:4", "all-top-K", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 17, 64])
def test_hybrid_linear_tier_mixes(ratios, dtype, rows):
    hw, masked = random_hybrid(96, 160, dtype=dtype, ratios=ratios, seed=rows)
    _check_linear(hw.to("cuda"), masked, _random_x(rows, 160, dtype))


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_hybrid_linear_block_rows_missing_tiers(dtype, rows):
    # Block-row 0 has no dense block, 1 no 2:4 block, 2 only top-K blocks, 3 only dense ones;
    # the last block-row and block-column are ragged.
    tiers = torch.tensor([[1, 2, 1, 2, 1], [0, 2, 0, 0, 2], [2, 2, 2, 2, 2], [0, 0, 0, 0, 0]],
                         dtype=torch.int8)
    hw, masked = random_hybrid(57, 75, dtype=dtype, tier_map=tiers, topk=3)
    _check_linear(hw.to("cuda"), masked, _random_x(rows, 75, dtype), None)


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("rows", [1, 17])
def test_hybrid_linear_empty_block_rows(rows):
    # All-zero block-rows: top-K blocks with no non-zero at all, and 2:4 blocks of zeros.
    tiers = torch.tensor([[2, 2, 2], [0, 1, 2], [1, 1, 1]], dtype=torch.int8)
    weight = torch.randn(48, 48)
    weight[:16] = 0.0
    weight[32:] = 0.0
    masked = apply_tier_map(weight, tiers, 15, 16)
    hw = sk.HybridWeight.from_dense(masked, tiers, 15, 16).to("cuda")
    x = _random_x(rows, 48, torch.float32)
    y = sk.hybrid_linear(x, hw, backend="cuda").cpu()
    assert torch.equal(y[:, :16], torch.zeros(rows, 16))
    assert torch.equal(y[:, 32:], torch.zeros(rows, 16))
    _check_linear(hw, masked, x, None)


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("block_size", [4, 8, 12])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 17, 64])
def test_hybrid_linear_other_block_sizes(block_size, dtype, rows):
    hw, masked = random_hybrid(45, 50, dtype=dtype, block_size=block_size, topk=7, seed=rows)
    bias = torch.randn(45).to(dtype).cuda()
    _check_linear(hw.to("cuda"), masked, _random_x(rows, 50, dtype), bias)


@needs_cuda("hybrid_linear")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 17, 64])
def test_hybrid_linear_budget_topk(dtype, rows):
    # K = 64: the top-K of a byte-budget prune (a quarter of the block), more slots than a warp.
    hw, masked = random_hybrid(70, 90, dtype=dtype, topk=64, seed=rows)
    _check_linear(hw.to("cuda"), masked, _random_x(rows, 90, dtype), None)


@needs_cuda("hybrid_linear")
def test_hybrid_linear_strided_batched_and_empty_inputs():
    hw, masked = random_hybrid(37, 70)
    hw = hw.to("cuda")
    _check_linear(hw, masked, torch.randn(6, 140).cuda()[:, ::2])  # non-contiguous rows
    _check_linear(hw, masked, torch.randn(70, 5).cuda().t())  # transposed
    _check_linear(hw, masked, torch.randn(2, 3, 70).cuda(), torch.randn(37).cuda())
    empty = sk.hybrid_linear(torch.randn(0, 70).cuda(), hw, backend="cuda")
    assert empty.shape == (0, 37) and empty.is_cuda


# --------------------------------------------------------------------------------------------
# Pruning ops: bit-exact against the reference


@needs_cuda("wanda_scores")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_wanda_scores_matches_reference(dtype, block_size):
    g = torch.Generator().manual_seed(1)
    for shape in [*SHAPES, (300, 1000)]:
        w = torch.randn(shape, generator=g).to(dtype).cuda()
        for act_dtype in DTYPES:
            act = (torch.rand(shape[1], generator=g) * 4).to(act_dtype).cuda()
            got_s, got_b = sk.wanda_scores(w, act, block_size, backend="cuda")
            # The reference on the same GPU: torch's sqrt there is correctly rounded, as the
            # kernel's, so the scores agree bit for bit; block means differ in summation order.
            ref_s, ref_b = sk.wanda_scores(w, act, block_size, backend="torch")
            assert got_s.dtype == got_b.dtype == torch.float32 and got_b.shape == ref_b.shape
            assert torch.equal(got_s, ref_s), (shape, act_dtype)
            torch.testing.assert_close(got_b, ref_b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{shape} {act_dtype}: {m}")


@needs_cuda("wanda_scores")
def test_wanda_scores_strided_inputs():
    w = torch.randn(60, 29).cuda().t()  # transposed view
    act = torch.rand(120).cuda()[::2]  # strided
    got = sk.wanda_scores(w, act, 12, backend="cuda")
    ref = sk.wanda_scores(w, act, 12, backend="torch")
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def _oracle(fn, scores, *args):
    """The reference on the CPU: the semantic definition (stable CPU sort for the tie rule)."""
    return fn(scores.cpu(), *args, backend="torch")


@needs_cuda("block_topk_mask")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_block_topk_mask_matches_reference(dtype, block_size):
    for i, shape in enumerate(SHAPES):
        for kind, scores in _score_inputs(shape, dtype, seed=10 + i, infinities=True):
            for k in sorted({1, 15, block_size * block_size - 1, block_size * block_size}):
                got = sk.block_topk_mask(scores.cuda(), k, block_size, backend="cuda")
                want = _oracle(sk.block_topk_mask, scores, k, block_size)
                assert got.is_cuda and got.dtype == torch.bool and got.shape == scores.shape
                assert torch.equal(got.cpu(), want), (shape, kind, k)


@needs_cuda("block_topk_mask")
@pytest.mark.parametrize("block_size", [12, 16])
def test_block_topk_mask_many_blocks(block_size):
    g = torch.Generator().manual_seed(4)
    for scores in (torch.randn(300, 520, generator=g),
                   torch.randint(0, 4, (300, 520), generator=g).float(),
                   torch.randn(300, 520, generator=g).to(torch.bfloat16)):
        for k in (1, 15, 77, block_size * block_size - 1):
            got = sk.block_topk_mask(scores.cuda(), k, block_size, backend="cuda")
            assert torch.equal(got.cpu(), _oracle(sk.block_topk_mask, scores, k, block_size)), k


@needs_cuda("block_topk_mask")
def test_block_topk_mask_tie_rule_lower_index_wins():
    got = sk.block_topk_mask(torch.zeros(4, 8).cuda(), 3, 4, backend="cuda")
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, :3] = expected[0, 4:7] = True  # row-major inside each 4x4 block
    assert torch.equal(got.cpu(), expected)


@needs_cuda("nm_mask")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [*NM, (17, 40), (39, 40)])
def test_nm_mask_matches_reference(dtype, n, m):
    for i, shape in enumerate([*SHAPES, (150, 118)]):
        for kind, scores in _score_inputs(shape, dtype, seed=20 + i, infinities=True):
            got = sk.nm_mask(scores.cuda(), n, m, backend="cuda")
            want = _oracle(sk.nm_mask, scores, n, m)
            assert got.is_cuda and got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got.cpu(), want), (shape, kind)


@needs_cuda("nm_mask")
def test_nm_mask_tie_rule_and_nan():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, float("nan"), -5.0, 0.0, -0.0]]).cuda()
    got = sk.nm_mask(scores, 2, 4, backend="cuda")
    assert got.cpu().tolist() == [[True, True, False, False, False, False, True, True]]


@needs_cuda("compress_24")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_compress_24_matches_reference(dtype, block_size):
    for seed, (nb, maxnz, nan) in enumerate([(37, 2, False), (1, 2, False), (64, 2, True),
                                             (20, 4, True), (0, 2, False), (1000, 2, False)]):
        blocks = _random_24_blocks(nb, block_size, dtype, seed, maxnz, nan)
        vals, meta = sk.compress_24(blocks.cuda(), backend="cuda")
        ref_vals, ref_meta = sk.compress_24(blocks, backend="torch")
        assert vals.is_cuda and vals.dtype == dtype and meta.dtype == torch.int16
        assert vals.shape == (nb, block_size, block_size // 2) and meta.shape == (nb, block_size)
        assert torch.equal(_bits(vals.cpu()), _bits(ref_vals)), (nb, maxnz, nan)
        assert torch.equal(meta.cpu(), ref_meta), (nb, maxnz, nan)


@needs_cuda("compress_24")
def test_compress_24_non_contiguous_and_bit_15():
    blocks = _random_24_blocks(12, 16, torch.float16, seed=7).cuda()
    strided = torch.stack([blocks, blocks], 1)[:, 0]
    assert not strided.is_contiguous()
    vals, meta = sk.compress_24(strided, backend="cuda")
    ref_vals, ref_meta = sk.compress_24(blocks.cpu(), backend="torch")
    assert torch.equal(_bits(vals.cpu()), _bits(ref_vals)) and torch.equal(meta.cpu(), ref_meta)
    last = torch.zeros(1, 16, 16)
    last[0, :, 15] = 1.0
    last[0, :, 14] = 2.0
    _, meta = sk.compress_24(last.cuda(), backend="cuda")
    assert (meta < 0).all() and torch.equal(meta.cpu(), sk.compress_24(last, backend="torch")[1])


# --------------------------------------------------------------------------------------------
# the decode kernels: v1 (canonical format) and v2 (prepared layout) for 1-16 rows

DECODE_SHAPES = [(37, 72), (100, 36), (16, 4), (129, 1000), (300, 4100)]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _layout(hw, target_tasks):
    """Up to ``target_tasks`` tasks of any size (no floor): the most segments per row."""
    return decode_layout.prepare_decode_layout(hw.packed_tensors(), hw.out_features,
                                               hw.in_features, hw.topk, target_tasks,
                                               min_task_bytes=16)


@needs_cuda("hybrid_linear", "hybrid_linear_decode")
@pytest.mark.parametrize("version", backends.DECODE_KERNELS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16])
def test_decode_kernels_match_reference(monkeypatch, version, dtype, shape, rows):
    monkeypatch.setenv(backends.DECODE_ENV, version)
    hw, masked = random_hybrid(*shape, dtype, seed=rows)
    hw = hw.to("cuda")
    bias = torch.randn(shape[0]).to(dtype).cuda()
    _check_linear(hw, masked, _random_x(rows, shape[1], dtype), bias)
    assert (hw.decode_cache._layout is not None) == (version == "v2")


@needs_cuda("hybrid_linear_decode")
@pytest.mark.parametrize("mix", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.35, 0.45, 0.20)])
@pytest.mark.parametrize("topk", [1, 15, 64])
def test_decode_kernel_tier_mixes_and_k(mix, topk):
    hw, masked = random_hybrid(64, 2048, torch.float16, topk=topk, ratios=mix)
    _check_linear(hw.to("cuda"), masked, _random_x(3, 2048, torch.float16))


@needs_cuda("hybrid_linear_decode")
@pytest.mark.parametrize("target_tasks", [1, 7, 64, 10_000])
def test_decode_split_k_is_deterministic_and_resets_its_counters(target_tasks):
    """Many segments per block-row (the last task of a row sums the partials) and one task per
    row (direct store): same bits on every call, every count back to zero."""
    hw, masked = random_hybrid(100, 4096, torch.float16, seed=5)
    layout = _layout(hw.to("cuda"), target_tasks)
    x = _random_x(7, 4096, torch.float16)
    op = torch.ops.sparse_kernels.hybrid_linear_decode
    first = op(x, *layout.tensors(), 100, 15, None)
    for _ in range(3):
        assert torch.equal(op(x, *layout.tensors(), 100, 15, None), first)
    assert int((layout.counters & 0xFFFFFFFF).sum()) == 0
    torch.testing.assert_close(first.cpu(), _expected(x, masked, None),
                               **TOLERANCE[torch.float16])


@needs_cuda("hybrid_linear_decode")
def test_decode_is_right_after_a_launch_that_stopped_part_way():
    """Counters holding another launch's unfinished count (its tag, some tasks done) must not
    make this launch reduce a row early (sk_decode::arrive)."""
    hw, masked = random_hybrid(100, 4096, torch.float16, seed=5)
    layout = _layout(hw.to("cuda"), 64)
    layout.counters.fill_((12345 << 32) | 1)
    x = _random_x(5, 4096, torch.float16)
    y = torch.ops.sparse_kernels.hybrid_linear_decode(x, *layout.tensors(), 100, 15, None)
    torch.testing.assert_close(y.cpu(), _expected(x, masked, None), **TOLERANCE[torch.float16])


@needs_cuda("hybrid_linear_decode")
def test_module_keeps_its_layout_until_the_weight_changes():
    hw, masked = random_hybrid(48, 256, torch.float16)
    module = sk.HybridSparseLinear.from_weight(hw, torch.zeros(48).half()).cuda()
    x = _random_x(2, 256, torch.float16)
    module(x)
    layout = module._decode_cache._layout
    assert layout is not None and layout.stream.is_cuda
    module(x)
    assert module._decode_cache._layout is layout
    module.dense_vals.mul_(2)
    got = module(x)
    assert module._decode_cache._layout is not layout
    want = sk.hybrid_linear(x, module.hybrid_weight, module.bias, backend="torch")
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float16])


@needs_cuda("hybrid_linear_decode")
def test_decode_kernel_in_a_cuda_graph():
    hw, masked = random_hybrid(256, 1024, torch.float16)
    module = sk.HybridSparseLinear.from_weight(hw).cuda()
    x = _random_x(1, 1024, torch.float16)
    eager = module(x)  # prepares the layout outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = module(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@needs_cuda("unpack_hybrid")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
@pytest.mark.parametrize("shape", [(37, 70), (16, 16), (129, 250), (1, 3)])
def test_unpack_is_bit_exact(dtype, block_size, shape):
    hw, masked = random_hybrid(*shape, dtype, block_size=block_size, seed=block_size)
    got = hw.to("cuda").to_dense()
    assert got.is_cuda and torch.equal(got.cpu(), masked)


@needs_cuda("unpack_hybrid", "hybrid_linear")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("rows", [17, 300, 1024])
def test_prefill_through_unpack_and_cublas(monkeypatch, dtype, rows):
    monkeypatch.setenv(backends.PREFILL_ENV, "unpack")
    hw, masked = random_hybrid(129, 250, dtype)
    _check_linear(hw.to("cuda"), masked, _random_x(rows, 250, dtype),
                  torch.randn(129).to(dtype).cuda())


@needs_cuda("unpack_hybrid_q")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size,group", [(16, 32), (16, 128), (4, 8), (12, 36)])
@pytest.mark.parametrize("topk", [5, 41])  # odd K: an int4 top-K row ends in a padding nibble
def test_unpack_low_bit_is_exact(bits, block_size, group, topk):
    topk = min(topk, block_size * block_size)
    hw, dense = random_hybrid(37, 70, block_size=block_size, topk=topk, bits=bits,
                              group_size=group, seed=topk)
    got = hw.to("cuda").to_dense()
    assert got.is_cuda and got.dtype == torch.float32 and torch.equal(got.cpu(), dense)


@needs_cuda("unpack_hybrid_q")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_low_bit_prefill_through_unpack_and_cublas(dtype):
    hw, dense = random_hybrid(129, 250, topk=41, bits=4, group_size=64)
    x = _random_x(backends.UNPACK_MIN_ROWS, 250, dtype)
    got = sk.hybrid_linear(x, hw.to("cuda"), backend="cuda")
    torch.testing.assert_close(got.cpu(), _expected(x, dense, None), **TOLERANCE[dtype])


# --------------------------------------------------------------------------------------------
# opcheck and the binding's argument checks


def _opcheck_args(op: str):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(20, 36, generator=g).cuda()
    if op == "wanda_scores":
        return (w, torch.rand(36, generator=g).cuda(), 8)
    if op == "block_topk_mask":
        return (w, 5, 8)
    if op == "nm_mask":
        return (w, 2, 4)
    if op == "compress_24":
        return (_random_24_blocks(3, 8, torch.float32, seed=9).cuda(),)
    if op == "unpack_hybrid":
        hw, _ = random_hybrid(37, 70, torch.float16)
        return (*hw.to("cuda").packed_tensors(), 37, 70)
    if op == "unpack_hybrid_q":
        hw, _ = random_hybrid(37, 70, topk=41, bits=4, group_size=32)
        hw = hw.to("cuda")
        return (*hw.packed_tensors(), hw.scales, 32, 37, 70)
    if op == "hybrid_linear_decode":
        hw, _ = random_hybrid(37, 72, torch.float16)
        layout = _layout(hw.to("cuda"), 9)
        return (torch.randn(5, 72, generator=g).half().cuda(), *layout.tensors(), 37, 15,
                torch.randn(37, generator=g).half().cuda())
    hw, _ = random_hybrid(37, 70)
    return (torch.randn(17, 70, generator=g).cuda(), *hw.to("cuda").packed_tensors(), 37,
            torch.randn(37, generator=g).cuda())


@pytest.mark.parametrize("op", [pytest.param(op, marks=needs_cuda(op)) for op in OPS])
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.sparse_kernels, op).default, _opcheck_args(op))


@needs_cuda(*OPS)
def test_binding_rejects_bad_arguments():
    ops = torch.ops.sparse_kernels
    s = torch.rand(8, 8).cuda()
    with pytest.raises(RuntimeError, match="act_sq_norm is on cpu"):
        ops.wanda_scores(s, torch.rand(8), 8)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.block_topk_mask(s, 0, 8)
    with pytest.raises(RuntimeError, match="block_size"):
        ops.block_topk_mask(s, 4, 5)
    with pytest.raises(RuntimeError, match="n <= m"):
        ops.nm_mask(s, 3, 2)
    with pytest.raises(RuntimeError, match="float32"):
        ops.nm_mask(s.double(), 2, 4)
    with pytest.raises(RuntimeError, match="B = 4, 8, 12 or 16"):
        ops.compress_24(torch.zeros(2, 6, 6).cuda())
    hw, _ = random_hybrid(20, 30)
    packed = list(hw.to("cuda").packed_tensors())
    x = torch.randn(2, 30).cuda()
    with pytest.raises(RuntimeError, match="dense_vals is on cpu"):
        ops.hybrid_linear(x, *packed[:2], packed[2].cpu(), *packed[3:], 20, None)
    with pytest.raises(RuntimeError, match="s24_meta must be int16"):
        ops.hybrid_linear(x, *packed[:6], packed[6].int(), *packed[7:], 20, None)
    with pytest.raises(RuntimeError, match=r"rowptr must be int32 \[ceil\(out/B\) \+ 1\]"):
        ops.hybrid_linear(x, *packed, 40, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[20\]"):
        ops.hybrid_linear(x, *packed, 20, torch.randn(20).cuda().half())
    hw, _ = random_hybrid(20, 32, torch.float16)
    layout = list(_layout(hw.to("cuda"), 4).tensors())
    xh = torch.randn(2, 32).half().cuda()
    with pytest.raises(RuntimeError, match="M <= 16"):
        ops.hybrid_linear_decode(torch.randn(17, 32).half().cuda(), *layout, 20, 15, None)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.hybrid_linear_decode(xh.float(), *layout, 20, 15, None)
    with pytest.raises(RuntimeError, match="tasks must be int32"):
        ops.hybrid_linear_decode(xh, layout[0], layout[1].long(), *layout[2:], 20, 15, None)
    with pytest.raises(RuntimeError, match=r"counters must be int64 \[ceil\(out/16\)\] = \[3\]"):
        ops.hybrid_linear_decode(xh, *layout, 40, 15, None)
    with pytest.raises(RuntimeError, match="counters is on cpu"):
        ops.hybrid_linear_decode(xh, *layout[:3], layout[3].cpu(), 20, 15, None)
