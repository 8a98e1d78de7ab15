"""Sparsity report numbers and tier-map file errors."""
import pytest
import torch

import pruning
from pruning.report import format_report, sparsity_report


def test_report_counts():
    masks = {"model.layers.0.a": torch.tensor([[True, False], [False, False]]),
             "model.layers.1.b": torch.ones(2, 4, dtype=torch.bool)}
    tiers = {"model.layers.0.a": torch.tensor([[0, 1], [2, 2]], dtype=torch.int8)}
    report = sparsity_report(masks, tiers)
    assert report["params"] == 12 and report["kept"] == 9
    assert report["sparsity"] == pytest.approx(0.25)
    assert report["per_layer"]["model.layers.0"]["sparsity"] == pytest.approx(0.75)
    assert report["per_layer"]["model.layers.1"]["sparsity"] == 0.0
    assert report["per_module"]["model.layers.0.a"]["tier_blocks"] == \
        {"dense": 1, "2:4": 1, "top-K": 2}
    assert report["per_tier"]["top-K"] == {"blocks": 2, "fraction": 0.5}
    assert "overall sparsity 25.00% of 12 weights in 2 modules" in format_report(report)


def test_tier_map_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tier-map file"):
        pruning.load_tier_maps(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a tier-map file"):
        pruning.load_tier_maps(tmp_path / "other.safetensors")


def test_save_leaves_no_temp_file(tmp_path):
    pruning.save_tier_maps(tmp_path / "t.safetensors", {"a": torch.zeros(2, 2)}, block_size=16,
                           topk=15)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    loaded, meta = pruning.load_tier_maps(tmp_path / "t.safetensors")
    assert loaded["a"].dtype == torch.int8 and meta["block_size"] == 16


def test_k_per_module_in_the_tier_map_file(tmp_path):
    maps = {"a": torch.zeros(2, 2, dtype=torch.int8), "b": torch.full((1, 3), 2, dtype=torch.int8)}
    path = tmp_path / "t.safetensors"
    pruning.save_tier_maps(path, maps, block_size=16, topk={"a": 15, "b": 64}, budget=0.6)
    _, meta = pruning.load_tier_maps(path)
    assert meta["topk"] == {"a": 15, "b": 64} and meta["budget"] == 0.6
    pruning.save_tier_maps(path, maps, block_size=16, topk={"a": 64, "b": 64})
    assert pruning.load_tier_maps(path)[1]["topk"] == 64  # one K for all: one number
    with pytest.raises(ValueError, match="no K for"):
        pruning.save_tier_maps(path, maps, block_size=16, topk={"a": 15})


def test_sparsify_model_takes_k_per_module():
    import sparse_kernels as sk
    from sparse_kernels import TOPK

    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16))
    maps = {"0": torch.full((1, 2), TOPK, dtype=torch.int8),
            "1": torch.full((1, 1), TOPK, dtype=torch.int8)}
    for name, k in (("0", 40), ("1", 7)):
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(pruning.apply_tier_map(linear.weight, maps[name], k))
    x = torch.randn(3, 32)
    expected = model(x)
    with pytest.raises(KeyError, match="no K for '1'"):
        sk.sparsify_model(model, maps, topk={"0": 40})
    sk.sparsify_model(model, maps, topk={"0": 40, "1": 7})
    assert (model[0].topk, model[1].topk) == (40, 7)
    torch.testing.assert_close(model(x), expected)
