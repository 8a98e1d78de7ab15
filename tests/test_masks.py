"""Masks as bits: what goes in comes out, at an eighth of the bytes."""
import copy

import pytest
import torch

from pruning.masks import BitMasks, pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (16, 16), (2, 3, 11)])
def test_bits_round_trip_any_shape(shape):
    mask = torch.rand(shape) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(bits, shape), mask)


def test_bit_masks_behave_like_a_dict_of_bool_masks():
    masks = BitMasks({"a": torch.ones(4, 9, dtype=torch.bool)})
    masks["b"] = torch.rand(33, 17) > 0.3
    b = masks["b"].clone()
    assert list(masks) == ["a", "b"] and len(masks) == 2 and "a" in masks
    assert masks["a"].dtype == torch.bool and bool(masks["a"].all())
    assert masks.nbytes == -(-36 // 8) + -(-33 * 17 // 8)
    clone = copy.deepcopy(masks)
    del masks["a"]
    assert list(masks) == ["b"] and torch.equal(clone["b"], b) and "a" in clone
    with pytest.raises(TypeError, match="torch.bool"):
        masks["c"] = torch.ones(2, 2)
