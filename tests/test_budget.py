"""pruning.prune with a byte budget, end to end on tiny models: bytes within the budget, masks
that follow the allocated tiers, K per module through save / load / sparsify, and the errors."""
import pytest
import torch

import pruning
import sparse_kernels as sk
from pruning.models import decoder_layers, get_weight
from sparse_kernels import DENSE, SPARSE_24, TOPK
from tiny_models import ARCHITECTURES, calibration_ids


def prune(arch="llama", **kwargs):
    model = ARCHITECTURES[arch]()
    args = dict(method="sparsegpt", pattern="three_tier", budget=0.7) | kwargs
    return model, pruning.prune(model, calibration_ids(), progress=False, **args)


def check_follows_tiers(model, result):
    """Every weight is zero outside its tier map's pattern, and packs with its module's K."""
    modules = dict(model.named_modules())
    for name, tiers in result.tier_maps.items():
        weight = get_weight(modules[name]).detach()
        k = result.topks[name]
        packed = sk.HybridWeight.from_dense(weight, tiers, k)  # raises if a block overflows
        assert torch.equal(packed.to_dense(), weight)
        mask = result.masks[name]
        assert not bool(weight[~mask].any())
        for br, bc in (tiers == SPARSE_24).nonzero().tolist():
            block = mask[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16]
            assert bool((block.reshape(block.shape[0], -1, 4).sum(-1) == 2).all())
        for br, bc in (tiers == TOPK).nonzero().tolist():
            assert int(mask[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16].sum()) == k


def packed_fraction(model, result, dtype):
    modules = dict(model.named_modules())
    packed = dense = 0
    for name, tiers in result.tier_maps.items():
        weight = get_weight(modules[name]).detach().to(dtype)
        hw = sk.HybridWeight.from_dense(weight, tiers, result.topks[name])
        packed, dense = packed + hw.nbytes, dense + hw.dense_nbytes
    return packed / dense


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wanda_obs", "magnitude"])
@pytest.mark.parametrize("ranking", ["matrix", "layer", "model"])
def test_budget_holds_and_masks_follow_the_tiers(arch, method, ranking):
    model, result = prune(arch, method=method, ranking=ranking, budget=0.7)
    check_follows_tiers(model, result)
    assert set(result.topks.values()) == {64}  # a budget's default K
    report = result.report["packed_bytes"]
    assert report["budget"] == 0.7 and report["fraction"] <= 0.7
    assert report["fraction"] == pytest.approx(packed_fraction(model, result, torch.float32))
    if ranking == "matrix":  # every matrix meets the budget on its own
        for name in result.tier_maps:
            assert result.report["per_module"][name]["packed_bytes_fraction"] <= 0.7, name


def test_model_ranking_moves_bytes_between_layers():
    model, result = prune(ranking="model", budget=0.6)
    path, layers = decoder_layers(model)
    per_layer = []
    for i in range(len(layers)):
        names = [n for n in result.tier_maps if n.startswith(f"{path}.{i}.")]
        per_layer.append(sum(result.report["per_module"][n]["packed_bytes_fraction"] *
                             result.report["per_module"][n]["params"] for n in names)
                         / sum(result.report["per_module"][n]["params"] for n in names))
    assert result.report["packed_bytes"]["fraction"] <= 0.6
    assert max(per_layer) - min(per_layer) > 0.01  # the layers did not all get the budget


def test_bytes_can_be_counted_in_another_dtype():
    model, result = prune(budget=0.6, budget_dtype=torch.float16)
    assert result.report["packed_bytes"]["dtype"] == "torch.float16"
    assert packed_fraction(model, result, torch.float16) <= 0.6
    assert packed_fraction(model, result, torch.float32) < 0.6  # fp32 values shrink more


def test_dense_and_2_4_only_never_uses_top_k():
    model, result = prune(budget=0.75, allow_topk=False, ranking="layer")
    tiers = torch.cat([t.flatten() for t in result.tier_maps.values()])
    assert not bool((tiers == TOPK).any())
    assert bool((tiers == DENSE).any()) and bool((tiers == SPARSE_24).any())
    check_follows_tiers(model, result)


def test_k_per_module_round_trips_into_the_kernels(tmp_path):
    model, result = prune(budget=0.5, topk=(8, 32, 64), ranking="layer")
    assert set(result.topks.values()) <= {8, 32, 64}
    check_follows_tiers(model, result)
    path = tmp_path / "tiers.safetensors"
    result.save_tier_maps(path)
    tier_maps, meta = pruning.load_tier_maps(path, model)
    assert meta["budget"] == 0.5 and meta["tier_ratios"] is None
    topk = meta["topk"]
    assert topk == result.topks or (isinstance(topk, int) and set(result.topks.values()) == {topk})
    prompt = calibration_ids(2, 6, seed=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(prompt, **kwargs)
        sk.sparsify_model(model, tier_maps, topk=topk)
        after = model.generate(prompt, **kwargs)
    assert torch.equal(before, after)


def test_two_four_prunes_report_their_packed_bytes():
    model, result = prune(method="wanda", pattern="2:4", budget=None)
    assert all(bool((t == SPARSE_24).all()) for t in result.tier_maps.values())
    fraction = result.report["packed_bytes"]["fraction"]
    assert fraction == pytest.approx(packed_fraction(model, result, torch.float32))
    assert 0.5 < fraction < 0.6  # half the fp32 values, 2 bytes of metadata per block row


def test_sensitivity_weights_rows_and_changes_the_allocation():
    _, plain = prune(method="wanda", ranking="layer", sensitivity=None, budget=0.6)
    _, weighted = prune(method="wanda", ranking="layer", sensitivity="gradient", budget=0.6)
    assert any(not torch.equal(plain.tier_maps[n], weighted.tier_maps[n])
               for n in plain.tier_maps)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern="2:4", budget=0.6), "three_tier only"),
    (dict(budget=0.6, tier_ratios=(0.35, 0.45, 0.2)), "not both"),
    (dict(budget=0.6, ranking="row"), "'matrix', 'layer' or 'model'"),
    (dict(budget=0.6, within_block="magnitude"), "within_block"),
    (dict(budget=0.1), "at least 0.3"),
    (dict(budget=float("nan")), "budget"),
    (dict(budget=None, topk=(15, 32)), "several K"),
    (dict(budget=0.6, topk=(15, 300)), "1..256"),
    (dict(budget=0.6, allow_topk="no"), "allow_topk"),
    (dict(budget=0.6, sensitivity="fisher"), "sensitivity"),
    (dict(budget=0.6, sensitivity_samples=0), "sensitivity_samples"),
])
def test_bad_budget_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(**kwargs)


def test_non_finite_weights_are_named():
    model = ARCHITECTURES["llama"]()
    path, layers = decoder_layers(model)
    with torch.no_grad():
        layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=rf"{path}\.1\.mlp\.up_proj.*non-finite"):
        pruning.prune(model, calibration_ids(), "wanda", "three_tier", budget=0.6,
                      progress=False)
