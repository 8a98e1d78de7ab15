"""The pruning-side ops (wanda_scores, block_topk_mask, nm_mask, compress_24): the C++ CPU backend
against the pure-torch reference, mask invariants that hold whatever the backend, opcheck, and
the argument checks."""
import pytest
import torch

import sparse_kernels
from sparse_kernels import reference

needs_cpu = pytest.mark.skipif("cpu" not in sparse_kernels.available_backends(),
                               reason="the C++ CPU backend (sparse_kernels._C) is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 70), (1, 16), (16, 1), (33, 45), (5, 3), (64, 64)]
NM = [(2, 4), (4, 8), (1, 4), (3, 3), (1, 1), (3, 5), (5, 40)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layouts(shape, dtype, make):
    """The tensor `make(shape)` as contiguous, strided-column view and transposed view."""
    rows, cols = shape
    yield "contiguous", make((rows, cols)).to(dtype)
    yield "strided", make((rows, 2 * cols)).to(dtype)[:, ::2]
    yield "transposed", make((cols, rows)).to(dtype).t()


def _score_inputs(shape, dtype, seed, infinities=False):
    """Scores to select from: continuous (with negatives), heavily tied, and tied with NaN and
    -0.0 (plus +-inf if `infinities`)."""
    g = _gen(seed)
    yield from _layouts(shape, dtype, lambda s: torch.randn(s, generator=g))
    yield "ties", torch.randint(0, 3, shape, generator=g).to(dtype)
    special = torch.randint(-1, 2, shape, generator=g).float()
    special[special == 0] = -0.0
    flat = special.view(-1)
    flat[::7] = float("nan")
    if infinities:
        flat[3::11] = float("-inf")
        flat[5::13] = float("inf")
    yield "nan/-0", special.to(dtype)


def _nan_to_neg_inf(t: torch.Tensor) -> torch.Tensor:
    """The documented key of a score: NaN counts as -inf (infinities stay infinite)."""
    t = t.float()
    return torch.where(t.isnan(), float("-inf"), t)


def _dense_rank(t: torch.Tensor) -> torch.Tensor:
    """Finite fp32 scores ordered (and tied) exactly like the documented keys of `t`.

    ``reference._select_top`` maps NaN to -inf with ``torch.nan_to_num``, whose defaults also
    clamp real +-inf to +-FLT_MAX, so there NaN ranks *below* -inf. The documented rule (and the
    C++ backend) has NaN tie with -inf; feeding the reference these ranks gives that rule.
    """
    return torch.unique(_nan_to_neg_inf(t), return_inverse=True)[1].float()


# --------------------------------------------------------------------------------------------
# wanda_scores


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_wanda_scores_matches_reference(dtype, block_size):
    g = _gen(1)
    for shape in SHAPES:
        for layout, w in _layouts(shape, dtype, lambda s: torch.randn(s, generator=g)):
            act = torch.rand(shape[1], generator=g).to(dtype) * 4
            got_s, got_b = sparse_kernels.wanda_scores(w, act, block_size, backend="cpu")
            ref_s, ref_b = sparse_kernels.wanda_scores(w, act, block_size, backend="torch")
            assert got_s.dtype == got_b.dtype == torch.float32
            assert got_b.shape == ref_b.shape, (shape, layout)
            torch.testing.assert_close(got_s, ref_s, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{shape} {layout}: {m}")
            torch.testing.assert_close(got_b, ref_b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{shape} {layout}: {m}")


@needs_cpu
def test_wanda_scores_mixed_dtypes_and_strided_act():
    g = _gen(2)
    w = torch.randn(29, 50, generator=g, dtype=torch.float32).to(torch.bfloat16)
    act = torch.rand(100, generator=g, dtype=torch.float32)[::2]  # non-contiguous fp32 act
    got = sparse_kernels.wanda_scores(w, act, 12, backend="cpu")
    ref = sparse_kernels.wanda_scores(w, act, 12, backend="torch")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


@needs_cpu
def test_wanda_scores_larger_parallel():
    g = _gen(3)
    w = torch.randn(300, 1000, generator=g)
    act = torch.rand(1000, generator=g)
    got = sparse_kernels.wanda_scores(w, act, 16, backend="cpu")
    ref = sparse_kernels.wanda_scores(w, act, 16, backend="torch")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# block_topk_mask


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_block_topk_mask_matches_reference(dtype, block_size):
    for i, shape in enumerate(SHAPES):
        for kind, scores in _score_inputs(shape, dtype, seed=10 + i):
            for k in sorted({1, 15, block_size * block_size}):
                got = sparse_kernels.block_topk_mask(scores, k, block_size, backend="cpu")
                ref = sparse_kernels.block_topk_mask(scores, k, block_size, backend="torch")
                assert got.dtype == torch.bool and got.shape == scores.shape
                assert torch.equal(got, ref), (shape, kind, k)


@needs_cpu
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_block_topk_mask_infinities_tie_nan(block_size):
    for i, shape in enumerate(SHAPES):
        for kind, scores in _score_inputs(shape, torch.float32, seed=50 + i, infinities=True):
            for k in sorted({1, 15, block_size * block_size - 1}):
                got = sparse_kernels.block_topk_mask(scores, k, block_size, backend="cpu")
                want = reference.block_topk_mask(_dense_rank(scores), k, block_size)
                assert torch.equal(got, want), (shape, kind, k)


@needs_cpu
@pytest.mark.parametrize("block_size", [12, 16])
def test_block_topk_mask_larger_parallel(block_size):
    g = _gen(4)
    for scores in (torch.randn(300, 520, generator=g),
                   torch.randint(0, 4, (300, 520), generator=g).float()):
        for k in (1, 15, 77, block_size * block_size - 1):
            got = sparse_kernels.block_topk_mask(scores, k, block_size, backend="cpu")
            ref = sparse_kernels.block_topk_mask(scores, k, block_size, backend="torch")
            assert torch.equal(got, ref), k


# --------------------------------------------------------------------------------------------
# nm_mask


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
def test_nm_mask_matches_reference(dtype, n, m):
    for i, shape in enumerate(SHAPES):
        for kind, scores in _score_inputs(shape, dtype, seed=20 + i):
            got = sparse_kernels.nm_mask(scores, n, m, backend="cpu")
            ref = sparse_kernels.nm_mask(scores, n, m, backend="torch")
            assert got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got, ref), (shape, kind)


@needs_cpu
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 5), (5, 40)])
def test_nm_mask_infinities_tie_nan(n, m):
    for i, shape in enumerate(SHAPES):
        for kind, scores in _score_inputs(shape, torch.float32, seed=60 + i, infinities=True):
            got = sparse_kernels.nm_mask(scores, n, m, backend="cpu")
            want = reference.nm_mask(_dense_rank(scores), n, m)
            assert torch.equal(got, want), (shape, kind)


@needs_cpu
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 12), (17, 40), (1, 40), (39, 40)])
def test_nm_mask_wide_and_ragged(n, m):
    # 118 columns: for m = 40 two full groups and a ragged group of 38 (> 32 wide, the
    # nth_element path); for the other m a short ragged tail.
    g = _gen(5)
    for scores in (torch.randn(150, 118, generator=g),
                   torch.randint(0, 3, (150, 118), generator=g).float()):
        got = sparse_kernels.nm_mask(scores, n, m, backend="cpu")
        ref = sparse_kernels.nm_mask(scores, n, m, backend="torch")
        assert torch.equal(got, ref)


# --------------------------------------------------------------------------------------------
# Mask invariants, independent of the reference


def _check_group(key: torch.Tensor, kept: torch.Tensor, want: int, what: str) -> None:
    assert int(kept.sum()) == want, f"{what}: kept {int(kept.sum())}, want {want}"
    if 0 < want < key.numel():
        assert key[kept].min() >= key[~kept].max(), f"{what}: a dropped entry beats a kept one"


def _check_topk_invariants(scores, mask, k, b):
    key = _nan_to_neg_inf(scores)
    for r0 in range(0, scores.shape[0], b):
        for c0 in range(0, scores.shape[1], b):
            blk, kept = key[r0:r0 + b, c0:c0 + b], mask[r0:r0 + b, c0:c0 + b]
            _check_group(blk, kept, min(k, blk.numel()), f"block ({r0}, {c0})")


def _check_nm_invariants(scores, mask, n, m):
    key = _nan_to_neg_inf(scores)
    for c0 in range(0, scores.shape[1], m):
        for r in range(scores.shape[0]):
            grp, kept = key[r, c0:c0 + m], mask[r, c0:c0 + m]
            _check_group(grp, kept, min(n, grp.numel()), f"row {r}, group at column {c0}")


def _backends():
    return [pytest.param(b, marks=needs_cpu if b == "cpu" else ()) for b in ("cpu", "torch")]


@pytest.mark.parametrize("backend", _backends())
def test_block_topk_mask_invariants(backend):
    for i, shape in enumerate([(37, 70), (5, 3), (16, 1), (33, 45)]):
        for kind, scores in _score_inputs(shape, torch.float32, seed=30 + i, infinities=True):
            for b, k in ((4, 1), (8, 15), (8, 64), (16, 15), (16, 200)):
                mask = sparse_kernels.block_topk_mask(scores, k, b, backend=backend)
                _check_topk_invariants(scores, mask, k, b)


@pytest.mark.parametrize("backend", _backends())
def test_nm_mask_invariants(backend):
    for i, shape in enumerate([(37, 70), (5, 3), (16, 1)]):
        for kind, scores in _score_inputs(shape, torch.float32, seed=40 + i, infinities=True):
            for n, m in ((2, 4), (4, 8), (1, 4), (3, 3), (5, 40)):
                mask = sparse_kernels.nm_mask(scores, n, m, backend=backend)
                _check_nm_invariants(scores, mask, n, m)


@needs_cpu
def test_tie_rule_lower_index_wins():
    scores = torch.zeros(4, 8)
    mask = sparse_kernels.block_topk_mask(scores, 3, 4, backend="cpu")
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, :3] = expected[0, 4:7] = True  # row-major inside each 4x4 block
    assert torch.equal(mask, expected)
    nm = sparse_kernels.nm_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0, float("nan"), -5.0, 0.0, -0.0]]),
                                2, 4, backend="cpu")
    assert nm.tolist() == [[True, True, False, False, False, False, True, True]]


# --------------------------------------------------------------------------------------------
# compress_24


def _random_24_blocks(nb, b, dtype, seed, max_nonzeros=2, nan=False):
    """[nb, b, b] blocks whose 4-column groups hold 0..max_nonzeros non-zeros at random columns;
    zeros are +0.0 or -0.0 at random."""
    g = _gen(seed)
    groups = nb * b * (b // 4)
    count = torch.randint(0, max_nonzeros + 1, (groups, 1), generator=g)
    rank = torch.rand(groups, 4, generator=g).argsort(-1).argsort(-1)  # random column order
    nonzero = rank < count
    values = torch.randn(groups, 4, generator=g)
    values[values == 0] = 1.0
    zero = torch.where(torch.rand(groups, 4, generator=g) < 0.5, 0.0, -0.0)
    out = torch.where(nonzero, values, zero)
    if nan:
        out[nonzero & (torch.rand(groups, 4, generator=g) < 0.1)] = float("nan")
    return out.reshape(nb, b, b).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_compress_24_matches_reference(dtype, block_size):
    for seed, (nb, maxnz, nan) in enumerate([(37, 2, False), (1, 2, False), (64, 2, True),
                                             (20, 4, True), (0, 2, False)]):
        blocks = _random_24_blocks(nb, block_size, dtype, seed, maxnz, nan)
        vals, meta = sparse_kernels.compress_24(blocks, backend="cpu")
        ref_vals, ref_meta = sparse_kernels.compress_24(blocks, backend="torch")
        assert vals.dtype == dtype and vals.shape == (nb, block_size, block_size // 2)
        assert meta.dtype == torch.int16 and meta.shape == (nb, block_size)
        assert torch.equal(_bits(vals), _bits(ref_vals)), (nb, maxnz, nan)
        assert torch.equal(meta, ref_meta), (nb, maxnz, nan)
        if maxnz <= 2 and not nan:
            assert torch.equal(reference.decompress_24(vals, meta), blocks)


@needs_cpu
def test_compress_24_non_contiguous_and_bit_15():
    blocks = _random_24_blocks(12, 16, torch.float16, seed=7)
    strided = torch.stack([blocks, blocks], 1)[:, 0]  # non-contiguous view of the same values
    assert not strided.is_contiguous()
    vals, meta = sparse_kernels.compress_24(strided, backend="cpu")
    ref_vals, ref_meta = sparse_kernels.compress_24(blocks, backend="torch")
    assert torch.equal(_bits(vals), _bits(ref_vals)) and torch.equal(meta, ref_meta)
    # Positions 3 in the last slot set bit 15: the int16 comes out negative.
    last = torch.zeros(1, 16, 16)
    last[0, :, 15] = 1.0
    last[0, :, 14] = 2.0
    vals, meta = sparse_kernels.compress_24(last, backend="cpu")
    assert (meta < 0).all() and torch.equal(meta, reference.compress_24(last)[1])


# --------------------------------------------------------------------------------------------
# opcheck and argument checks


def _opcheck_cases():
    g = _gen(8)
    w = torch.randn(20, 36, generator=g)
    return {
        "wanda_scores": (w, torch.rand(36, generator=g), 8),
        "block_topk_mask": (w, 5, 8),
        "nm_mask": (w, 2, 4),
        "compress_24": (_random_24_blocks(3, 8, torch.float32, seed=9),),
    }


@pytest.mark.parametrize("op", ["wanda_scores", "block_topk_mask", "nm_mask", "compress_24"])
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.sparse_kernels, op).default, _opcheck_cases()[op])


def test_wrappers_reject_bad_arguments():
    s = torch.rand(8, 8)
    with pytest.raises(TypeError, match="float32"):
        sparse_kernels.block_topk_mask(s.to(torch.int32), 4, 8)
    with pytest.raises(ValueError, match="2-D"):
        sparse_kernels.nm_mask(torch.rand(8), 2, 4)
    with pytest.raises(ValueError, match="block_size"):
        sparse_kernels.block_topk_mask(s, 4, 6)
    with pytest.raises(ValueError, match="k must be"):
        sparse_kernels.block_topk_mask(s, 0, 8)
    with pytest.raises(ValueError, match="k must be"):
        sparse_kernels.block_topk_mask(s, 65, 8)
    with pytest.raises(ValueError, match="n <= m"):
        sparse_kernels.nm_mask(s, 3, 2)
    with pytest.raises(ValueError, match="act_sq_norm"):
        sparse_kernels.wanda_scores(s, torch.rand(7), 8)
    with pytest.raises(ValueError, match="block_size"):
        sparse_kernels.compress_24(torch.zeros(2, 6, 6))


@needs_cpu
def test_cpu_kernels_check_arguments_directly():
    s = torch.rand(8, 8)
    ops = torch.ops.sparse_kernels
    with pytest.raises(RuntimeError, match="k must be"):
        ops.block_topk_mask(s, 0, 16)
    with pytest.raises(RuntimeError, match="block_size"):
        ops.block_topk_mask(s, 4, 5)
    with pytest.raises(RuntimeError, match="n <= m"):
        ops.nm_mask(s, 0, 4)
    with pytest.raises(RuntimeError, match="float32"):
        ops.nm_mask(s.double(), 2, 4)
    with pytest.raises(RuntimeError, match="act_sq_norm"):
        ops.wanda_scores(s, torch.rand(9), 8)
    with pytest.raises(RuntimeError, match="B = 4, 8, 12 or 16"):
        ops.compress_24(torch.zeros(2, 6, 6))
