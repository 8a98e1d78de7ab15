"""Low-bit values in every tier (int8 / int4 codes with fp16 group scales): the format, its byte
count, validation, the reference, the module, and packed checkpoints through from_pretrained."""
import pytest
import torch

import sparse_kernels as sk
from conftest import random_hybrid
from sparse_kernels.format import CorruptWeightError, validate_packed
from sparse_kernels.quant import pack_int4, quantize, round_to_grid, unpack_int4
from sparse_kernels.rules import group_size_for, packed_nbytes

SHAPES = [(40, 200, 64), (17, 576, 64), (33, 130, 128), (64, 256, 128), (5, 48, 16)]


def test_int4_codes_round_trip_two_per_byte():
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(3, 1)  # 15 codes a row: odd
    packed = pack_int4(codes)
    assert packed.shape == (3, 8) and bool((packed[:, -1] >> 4 == 0).all())
    assert torch.equal(unpack_int4(packed, 15), codes)
    assert int(pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))) == 0xE3


def test_round_to_grid_is_symmetric_and_exact():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0] * 4, [0.0] * 16])
    q, scales = round_to_grid(w, 4, 16)
    assert float(scales[0, 0]) == pytest.approx(1 / 7, rel=1e-3) and float(scales[1, 0]) == 0
    codes = quantize(w, scales, 4, 16)
    assert int(codes.max()) == 7 and int(codes.min()) >= -7 and not bool(codes[1].any())
    assert torch.equal(q, codes.float() * scales.float().repeat_interleave(16, 1))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_f,in_f,g", SHAPES)
@pytest.mark.parametrize("topk", [15, 8, 1])
def test_packed_low_bit_weight_is_its_dequantized_masked_weight(bits, out_f, in_f, g, topk):
    hw, dense = random_hybrid(out_f, in_f, topk=topk, bits=bits, group_size=g, seed=out_f)
    masked = random_hybrid(out_f, in_f, topk=topk, seed=out_f)[1]
    expected, scales = round_to_grid(masked, bits, g)
    assert torch.equal(hw.scales, scales) and torch.equal(dense, expected)
    assert hw.bits == bits and hw.group_size == g
    assert hw.nbytes == packed_nbytes(hw.tier_map, out_f, in_f, torch.float16, topk, 16, bits, g)
    # A slot for every kept weight (one whose code rounded to 0 may give its slot to another
    # position of the block): as many slots as kept weights, every non-zero code in one.
    kept = hw.kept_mask()
    assert int(kept.sum()) == int((masked != 0).sum()) and not bool((dense != 0)[~kept].any())
    hw.validate()
    x = torch.randn(3, in_f)
    got = sk.hybrid_linear(x, hw, backend="torch")
    torch.testing.assert_close(got, x @ dense.t(), rtol=1e-5, atol=1e-5)
    # On its grid, packing again with the same scales gives the same codes.
    again = sk.HybridWeight.from_dense(dense, hw.tier_map, topk, bits=bits, group_size=g,
                                       scales=hw.scales)
    assert torch.equal(again.dense_vals, hw.dense_vals) and torch.equal(again.topk_vals,
                                                                        hw.topk_vals)


def test_the_group_follows_the_input_width():
    assert (group_size_for(576), group_size_for(1536), group_size_for(4096)) == (64, 128, 128)
    assert group_size_for(1000) == 128  # none divides: a ragged last group
    hw, _ = random_hybrid(32, 1000, bits=4)
    assert hw.group_size == 128 and hw.scales.shape == (32, 8)


def test_a_weight_off_the_grid_of_given_scales_is_refused():
    hw, dense = random_hybrid(32, 64, bits=8, group_size=64)
    nudged = dense.clone()
    nudged[3, 5] += 0.4 * float(hw.scales[3, 0])
    with pytest.raises(ValueError, match=r"weight\[3, 5\].*not on its int8 grid"):
        sk.HybridWeight.from_dense(nudged, hw.tier_map, 15, bits=8, group_size=64,
                                   scales=hw.scales)
    with pytest.raises(ValueError, match="multiple of the block size"):
        sk.HybridWeight.from_dense(dense, hw.tier_map, 15, bits=8, group_size=24)
    with pytest.raises(ValueError, match="bits must be one of 16, 8, 4"):
        sk.HybridWeight.from_dense(dense, hw.tier_map, 15, bits=2)


@pytest.mark.parametrize("bits", [8, 4])
def test_save_and_load_a_low_bit_weight(tmp_path, bits):
    hw, dense = random_hybrid(40, 200, topk=15, bits=bits, group_size=64)
    hw.save(tmp_path / "w.safetensors")
    loaded = sk.HybridWeight.load(tmp_path / "w.safetensors")
    assert loaded.bits == bits and loaded.group_size == 64
    assert torch.equal(loaded.to_dense(), dense)


def test_a_version_1_file_still_loads(tmp_path):
    from safetensors.torch import save_file

    hw, dense = random_hybrid(24, 48)
    meta = {k: v for k, v in hw.metadata().items() if k != "group_size"}
    meta["format_version"] = "1"
    save_file({k: t.contiguous() for k, t in hw.tensors().items()}, tmp_path / "v1.safetensors",
              metadata=meta)
    loaded = sk.HybridWeight.load(tmp_path / "v1.safetensors")
    assert loaded.bits == 16 and torch.equal(loaded.to_dense(), dense)


def _corrupt(hw, **changes):
    tensors = {**hw.tensors(), **changes}
    validate_packed(tensors, hw.out_features, hw.in_features, hw.block_size, hw.topk,
                    group_size=hw.group_size)


def test_corrupt_scales_and_codes_are_refused_naming_them():
    hw, _ = random_hybrid(40, 200, topk=15, bits=4, group_size=64)
    bad = hw.scales.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(CorruptWeightError, match=r"scales\[2, 1\] = nan"):
        _corrupt(hw, scales=bad)
    with pytest.raises(CorruptWeightError, match="scales.*expected"):
        _corrupt(hw, scales=hw.scales[:, :2])
    with pytest.raises(CorruptWeightError, match="scales.*is not a finite scale >= 0"):
        _corrupt(hw, scales=-hw.scales)
    nibble = hw.dense_vals.clone()
    nibble[0, 0, 0] = 0x78  # the high nibble 8 is -8: not a symmetric int4 code
    with pytest.raises(CorruptWeightError, match=r"dense_vals\[0, 0, 0\] = 120.*int4"):
        _corrupt(hw, dense_vals=nibble)
    padding = hw.topk_vals.clone()
    padding[0, -1] |= 0x10  # K = 15: the last byte's high nibble is padding
    with pytest.raises(CorruptWeightError, match="topk_vals.*padding"):
        _corrupt(hw, topk_vals=padding)
    with pytest.raises(CorruptWeightError, match="scales is missing"):
        validate_packed({k: v for k, v in hw.tensors().items() if k != "scales"},
                        hw.out_features, hw.in_features, 16, 15, group_size=64)
    with pytest.raises(CorruptWeightError, match="group_size"):
        _corrupt(dataclass_replace(hw, group_size=0))
    hw8, _ = random_hybrid(40, 200, bits=8, group_size=64)
    code = hw8.s24_vals.clone()
    code.view(-1)[7] = -128
    with pytest.raises(CorruptWeightError, match="s24_vals.*int8"):
        _corrupt(hw8, s24_vals=code)


def dataclass_replace(hw, **changes):
    import dataclasses

    return dataclasses.replace(hw, **changes)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_module_takes_any_float_x_and_round_trips_its_state(x_dtype, bits):
    torch.manual_seed(1)
    linear = torch.nn.Linear(200, 40)
    tiers = sk.assign_tiers(torch.rand(3, 13), (0.35, 0.45, 0.2))
    with torch.no_grad():
        linear.weight.copy_(sk.apply_tier_map(linear.weight, tiers, 15))
    module = sk.HybridSparseLinear.from_linear(linear, tiers, 15, bits=bits, group_size=64)
    dense = module.hybrid_weight.to_dense()
    x = torch.randn(2, 5, 200).to(x_dtype)
    expected = torch.nn.functional.linear(x.float(), dense, linear.bias.detach().float())
    got = module.to(dtype=x_dtype)(x)  # casts the bias; codes and scales stay as they are
    assert got.dtype == x_dtype and module.dense_vals.dtype == (torch.int8 if bits == 8
                                                                  else torch.uint8)
    tol = 1e-4 if x_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    fresh = sk.HybridSparseLinear(200, 40, tiers, 15, bits=bits, group_size=64, dtype=x_dtype)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.hybrid_weight.to_dense(), dense)
    state = module.state_dict()
    state["scales"] = torch.full_like(state["scales"], float("inf"))
    with pytest.raises(CorruptWeightError, match="scales"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_low_bit_packed_checkpoint_round_trips_through_from_pretrained(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    from tiny_models import calibration_ids, llama

    model = llama().eval()
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n]
    maps = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            weight = model.get_submodule(name).weight
            tiers = sk.assign_tiers(torch.rand(sk.rules.tier_grid(*weight.shape, 16),
                                               generator=torch.Generator().manual_seed(i)))
            weight.copy_(sk.apply_tier_map(weight, tiers, 15))
            maps[name] = tiers
    sk.sparsify_model(model, maps, topk=15, bits=bits, group_size=64)
    assert model.config.quantization_config["bits"] == [bits]
    prompt = calibration_ids(1, 6, seed=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(prompt, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    packed = [m for m in loaded.modules() if isinstance(m, sk.HybridSparseLinear)]
    assert len(packed) == len(names) and all(m.hybrid_weight.bits == bits for m in packed)
    assert torch.equal(loaded.generate(prompt, **kwargs), before)
    for name in names:
        assert torch.equal(loaded.get_submodule(name).hybrid_weight.to_dense(),
                           model.get_submodule(name).hybrid_weight.to_dense())
