"""HybridWeight: packing, exact round trips, sizes, disk, and the errors bad input gets."""
import pytest
import torch

import sparse_kernels as sk
from sparse_kernels.format import PACKED_FIELDS
from sparse_kernels.rules import tier_grid
from conftest import DTYPES, random_hybrid, random_tier_map

SHAPES = [(37, 70), (1, 16), (16, 1), (64, 64), (33, 45), (5, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_to_dense_is_bit_exact(dtype, shape, block_size):
    hw, masked = random_hybrid(*shape, dtype=dtype, block_size=block_size, topk=5)
    dense = hw.to_dense()
    assert dense.dtype == dtype and dense.shape == shape
    assert torch.equal(dense, masked)


@pytest.mark.parametrize("ratios", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.35, 0.45, 0.20)])
def test_tiers_hold_their_blocks(ratios):
    hw, masked = random_hybrid(70, 90, ratios=ratios)
    counts = hw.tier_counts()
    n = hw.tier_map.numel()
    assert sum(counts.values()) == n
    assert hw.dense_vals.shape[0] == counts["dense"]
    assert hw.s24_vals.shape[0] == counts["2:4"] == hw.s24_meta.shape[0]
    assert hw.topk_vals.shape[0] == counts["top-K"] == hw.topk_pos.shape[0]
    for prefix, count in (("dense", counts["dense"]), ("s24", counts["2:4"]),
                          ("topk", counts["top-K"])):
        rowptr = getattr(hw, f"{prefix}_rowptr")
        assert rowptr[0] == 0 and rowptr[-1] == count
        assert bool((rowptr[1:] >= rowptr[:-1]).all())
    assert torch.equal(hw.to_dense(), masked)


def test_topk_positions_are_sorted_and_distinct():
    hw, _ = random_hybrid(48, 48, ratios=(0, 0, 1), topk=15)
    pos = hw.topk_pos.long()
    assert bool((pos[:, 1:] > pos[:, :-1]).all())


def test_fewer_nonzeros_than_slots_pack_exactly():
    weight = torch.zeros(20, 20)
    weight[3, 5], weight[17, 19], weight[0, 1] = 1.5, -2.0, -0.0
    tiers = torch.tensor([[2, 1], [2, 1]], dtype=torch.int8)
    hw = sk.HybridWeight.from_dense(weight, tiers, topk=15)
    assert torch.equal(hw.to_dense(), weight)


@pytest.mark.parametrize("tier, ideal", [(0, 512), (1, 256 + 32), (2, 15 * 2 + 15)])
def test_ideal_bytes_of_one_fp16_block(tier, ideal):
    hw, _ = random_hybrid(16, 16, dtype=torch.float16,
                          tier_map=torch.full((1, 1), tier, dtype=torch.int8))
    assert hw.ideal_nbytes == ideal


def test_fp16_size_is_within_5_percent_of_ideal():
    hw, _ = random_hybrid(512, 1024, dtype=torch.float16)
    assert hw.ideal_nbytes <= hw.nbytes <= 1.05 * hw.ideal_nbytes
    # 0.35 / 0.45 / 0.20 with K = 15: about 62 % of the dense bytes.
    assert 0.615 < hw.ideal_nbytes / hw.dense_nbytes < 0.625


def test_save_load_round_trip(tmp_path):
    hw, masked = random_hybrid(37, 70, dtype=torch.bfloat16)
    path = tmp_path / "w.safetensors"
    hw.save(path)
    loaded = sk.HybridWeight.load(path)
    assert (loaded.out_features, loaded.in_features, loaded.block_size, loaded.topk) == \
        (37, 70, 16, 15)
    for name, tensor in hw.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert torch.equal(loaded.to_dense(), masked)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HybridWeight file"):
        sk.HybridWeight.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a HybridWeight file"):
        sk.HybridWeight.load(tmp_path / "other.safetensors")


def test_to_changes_dtype_not_indices():
    hw, masked = random_hybrid(32, 32)
    half = hw.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.s24_meta.dtype == torch.int16
    assert torch.equal(half.to_dense(), masked.half())


# ---------------------------------------------------------------- bad input
def test_rejects_integer_weight():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sk.HybridWeight.from_dense(torch.ones(16, 16, dtype=torch.int32),
                                   torch.zeros(1, 1, dtype=torch.int8))


def test_rejects_tier_map_of_wrong_shape():
    with pytest.raises(ValueError, match=r"needs \(3, 5\)"):
        sk.HybridWeight.from_dense(torch.zeros(37, 70), torch.zeros(3, 4, dtype=torch.int8))


def test_rejects_tier_code_out_of_range():
    tiers = torch.zeros(tier_grid(37, 70, 16), dtype=torch.int8)
    tiers[1, 2] = 3
    with pytest.raises(ValueError, match=r"tier_map\[1, 2\] = 3"):
        sk.HybridWeight.from_dense(torch.zeros(37, 70), tiers)


def test_rejects_float_tier_map():
    with pytest.raises(TypeError, match="integer tensor"):
        sk.HybridWeight.from_dense(torch.zeros(16, 16), torch.zeros(1, 1))


@pytest.mark.parametrize("topk", [0, 257])
def test_rejects_k_out_of_range(topk):
    with pytest.raises(ValueError, match="topk must be in 1..256"):
        sk.HybridWeight.from_dense(torch.zeros(16, 16), torch.zeros(1, 1, dtype=torch.int8),
                                   topk=topk)


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size must be 4, 8, 12 or 16"):
        sk.HybridWeight.from_dense(torch.zeros(32, 32), torch.zeros(1, 1, dtype=torch.int8),
                                   block_size=32)


def test_rejects_weight_breaking_2_4():
    weight = torch.zeros(32, 32)
    weight[21, 16:19] = 1.0  # three non-zeros in columns 16..19 of block (1, 1)
    tiers = torch.ones(2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"block \(1, 1\) is tier 2:4 but row 21 has 3 "
                                         r"non-zeros in input columns 16..19"):
        sk.HybridWeight.from_dense(weight, tiers)


def test_rejects_weight_breaking_topk():
    weight = torch.zeros(32, 32)
    weight[0:4, 16:20] = 1.0  # 16 non-zeros in block (0, 1)
    tiers = torch.full((2, 2), 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"block \(0, 1\) is tier top-K but has 16 non-zeros "
                                         r"\(K = 15\)"):
        sk.HybridWeight.from_dense(weight, tiers, topk=15)


def test_tier_map_helper_shape():
    assert random_tier_map(37, 70).shape == (3, 5)


@pytest.mark.parametrize("block_size", [4, 8, 12, 16])
def test_empty_is_the_packing_of_a_zero_weight(block_size):
    # An unloaded weight must be well formed for every kernel: mma.sp needs two distinct,
    # ascending positions per group even where the values are zero.
    tiers = torch.tensor([[1, 0], [2, 1]], dtype=torch.int8)
    empty = sk.HybridWeight.empty(2 * block_size, 2 * block_size, tiers, topk=3,
                                  block_size=block_size)
    packed = sk.HybridWeight.from_dense(torch.zeros(2 * block_size, 2 * block_size), tiers,
                                        topk=3, block_size=block_size)
    for name, got, want in zip(PACKED_FIELDS, empty.packed_tensors(), packed.packed_tensors()):
        assert torch.equal(got, want), name
