"""pruning.prune end to end on tiny models of every architecture, method and pattern."""
import pytest
import torch

import pruning
import sparse_kernels as sk
from pruning.models import decoder_layers, get_weight, prunable_linears
from pruning.patterns import block_scores
from pruning.statistics import LinearStats
from sparse_kernels import DENSE, SPARSE_24, TOPK
from tiny_models import ARCHITECTURES, calibration_ids

METHODS = ["magnitude", "wanda", "sparsegpt", "wanda_obs"]
PATTERNS = {
    "unstructured": dict(pattern="unstructured", sparsity=0.5),
    "2:4": dict(pattern="2:4"),
    "4:8": dict(pattern="4:8"),
    "block": dict(pattern="block", sparsity=0.5),
    "block_topk": dict(pattern="block_topk", sparsity=0.5, topk=15),
    "three_tier": dict(pattern="three_tier", tier_ratios=(0.35, 0.45, 0.20), topk=15),
}


def untouched_params(model):
    """Everything prune must leave alone: all parameters outside the decoder Linears."""
    path, layers = decoder_layers(model)
    pruned = {f"{path}.{i}.{n}.weight" for i, layer in enumerate(layers)
              for n in prunable_linears(layer)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in pruned}


def check_blocks(mask, tiers, topk, block_size=16):
    counts = {code: int((tiers == code).sum()) for code in (DENSE, SPARSE_24, TOPK)}
    for br in range(tiers.shape[0]):
        for bc in range(tiers.shape[1]):
            blk = mask[br * block_size:(br + 1) * block_size, bc * block_size:(bc + 1) * block_size]
            if tiers[br, bc] == DENSE:
                assert bool(blk.all())
            elif tiers[br, bc] == SPARSE_24:
                assert bool((blk.reshape(blk.shape[0], -1, 4).sum(-1) == 2).all())
            else:
                assert int(blk.sum()) <= topk
    return counts


def check_invariants(name, mask, tiers, weight, spec):
    out_f, in_f = mask.shape
    assert not bool(weight[~mask].any()), f"{name}: non-zero weight where the mask prunes"
    if spec["pattern"] == "unstructured":
        pruned = int((~mask).sum())
        assert abs(pruned / mask.numel() - 0.5) < 0.06, f"{name}: sparsity {pruned / mask.numel()}"
    elif spec["pattern"] in ("2:4", "4:8"):
        n, m = (int(v) for v in spec["pattern"].split(":"))
        assert bool((mask.reshape(out_f, -1, m).sum(-1) == n).all())
    else:
        grid = sk.rules.tier_grid(out_f, in_f, 16)
        assert tuple(tiers.shape) == grid
        counts = check_blocks(mask, tiers, spec.get("topk", 15))
        n = tiers.numel()
        if spec["pattern"] == "three_tier":
            assert counts[DENSE] == int(n * 0.35) and counts[SPARSE_24] == int(n * 0.45)
        else:
            assert counts[TOPK] == int(n * 0.5) and counts[SPARSE_24] == 0
        if spec["pattern"] == "block":
            for br, bc in (tiers == TOPK).nonzero().tolist():
                assert not bool(mask[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16].any())


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_architecture_method_and_pattern(arch, method, pattern):
    model = ARCHITECTURES[arch]()
    before = untouched_params(model)
    spec = PATTERNS[pattern]
    result = pruning.prune(model, calibration_ids(), method, progress=False, **spec)
    modules = dict(model.named_modules())
    path, layers = decoder_layers(model)
    expected = {f"{path}.{i}.{n}" for i, layer in enumerate(layers) for n in prunable_linears(layer)}
    assert set(result.masks) == expected
    for name, mask in result.masks.items():
        weight = get_weight(modules[name]).detach()
        check_invariants(name, mask, result.tier_maps.get(name), weight, spec)
    for name, value in untouched_params(model).items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert 0.0 < result.report["sparsity"] < 1.0


def first_layer_stats(model, ids):
    """Wanda's statistics of the first decoder layer's Linears and their weights, by hand."""
    path, layers = decoder_layers(model)
    linears = prunable_linears(layers[0])
    stats, handles = {}, []
    for name, module in linears.items():
        stats[name] = LinearStats.empty(get_weight(module).shape[1], hessian=False)
        handles.append(module.register_forward_hook(
            lambda _m, args, _o, s=stats[name]: s.add_batch(args[0])))
    weights = {n: get_weight(m).detach().clone() for n, m in linears.items()}
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return path, stats, weights


def test_wanda_masks_follow_the_papers_rule_on_the_first_layer():
    model = ARCHITECTURES["llama"]()
    ids = calibration_ids()
    path, stats, weights = first_layer_stats(model, ids)
    result = pruning.prune(model, ids, "wanda", "unstructured", 0.5, batch_size=4,
                           progress=False)
    for name, weight in weights.items():
        score = weight.abs() * stats[name].act_sq_norm.sqrt()
        k = int(weight.shape[1] * 0.5)
        pruned = torch.sort(score, dim=1, stable=True).indices[:, :k]
        expected = torch.ones_like(weight, dtype=torch.bool).scatter(1, pruned, False)
        assert torch.equal(result.masks[f"{path}.0.{name}"], expected), name


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_fixed_ratios_follow_the_research_rule_on_the_first_layer(arch):
    """The research code's three-tier: blocks ranked by mean Wanda score per matrix, the top
    int(n * 0.35) dense, the next int(n * 0.45) 2:4, the rest top-15 (what a byte budget sits
    beside, unchanged)."""
    model = ARCHITECTURES[arch]()
    ids = calibration_ids()
    path, stats, weights = first_layer_stats(model, ids)
    result = pruning.prune(model, ids, "wanda", "three_tier", batch_size=4, progress=False)
    for name, weight in weights.items():
        score = weight.abs() * stats[name].act_sq_norm.sqrt()
        tiers = pruning.assign_tiers(block_scores(score, 16), (0.35, 0.45, 0.20))
        assert torch.equal(result.tier_maps[f"{path}.0.{name}"], tiers), name
        assert torch.equal(result.masks[f"{path}.0.{name}"],
                           pruning.tier_mask(score, tiers, 15, 16)), name
        assert result.topks[f"{path}.0.{name}"] == 15


@pytest.mark.parametrize("ranking", ["layer", "model"])
def test_tier_ranking_across_modules(ranking):
    model = ARCHITECTURES["llama"]()
    result = pruning.prune(model, calibration_ids(), "wanda", "three_tier", ranking=ranking,
                           progress=False)
    path, layers = decoder_layers(model)
    groups = ([[n for n in result.tier_maps if n.startswith(f"{path}.{i}.")]
               for i in range(len(layers))] if ranking == "layer" else [list(result.tier_maps)])
    for names in groups:
        tiers = torch.cat([result.tier_maps[n].flatten() for n in names])
        assert int((tiers == DENSE).sum()) == int(tiers.numel() * 0.35)
        assert int((tiers == SPARSE_24).sum()) == int(tiers.numel() * 0.45)


def test_apply_masks_reproduces_prune():
    model = ARCHITECTURES["opt"]()
    result = pruning.prune(model, calibration_ids(), "wanda", "2:4", progress=False)
    fresh = ARCHITECTURES["opt"]()
    pruning.apply_masks(fresh, result.masks)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(KeyError, match="no Linear by that name"):
        pruning.apply_masks(fresh, {"model.nope": torch.ones(2, 2, dtype=torch.bool)})


def test_tier_maps_round_trip_and_reject_a_mismatched_model(tmp_path):
    model = ARCHITECTURES["llama"]()
    result = pruning.prune(model, calibration_ids(), "wanda", "three_tier", progress=False)
    path = tmp_path / "tiers.safetensors"
    result.save_tier_maps(path, source_model="tiny-llama")
    loaded, meta = pruning.load_tier_maps(path, model)
    assert meta["method"] == "wanda" and meta["topk"] == 15 and meta["source_model"] == "tiny-llama"
    for name, tiers in result.tier_maps.items():
        assert torch.equal(loaded[name], tiers)
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"tier map for 'model.layers.0.mlp.(down|gate|up)_proj' has shape"):
        pruning.load_tier_maps(path, other)


def test_pruned_model_saves_and_reloads_with_its_zeros(tmp_path):
    from transformers import AutoModelForCausalLM
    model = ARCHITECTURES["qwen2"]()
    result = pruning.prune(model, calibration_ids(), "sparsegpt", "three_tier", progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    modules = dict(reloaded.named_modules())
    for name, mask in result.masks.items():
        assert not bool(get_weight(modules[name])[~mask].any())


def test_hybrid_model_generates_what_the_masked_model_generates():
    model = ARCHITECTURES["llama"]()
    result = pruning.prune(model, calibration_ids(), "wanda", "three_tier", progress=False)
    prompt = calibration_ids(2, 6, seed=1)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(prompt, **kwargs)
        sk.sparsify_model(model, result.tier_maps)
        after = model.generate(prompt, **kwargs)
    assert sum(isinstance(m, sk.HybridSparseLinear) for m in model.modules()) == 14
    assert torch.equal(before, after)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(pattern="three_tier", tier_ratios=(0.5, 0.3, 0.1)), "tier ratios"),
    (dict(pattern="three_tier", topk=0), "1..256"), (dict(pattern="3:2"), "pattern"),
    (dict(method="obs"), "method"),
])
def test_bad_arguments(kwargs, message):
    model = ARCHITECTURES["llama"]()
    args = dict(method="wanda", pattern="unstructured") | kwargs
    with pytest.raises(ValueError, match=message):
        pruning.prune(model, calibration_ids(), progress=False, **args)


def test_text_calibration_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pruning.prune(ARCHITECTURES["llama"](), "embedded", "wanda", progress=False)


def test_row_ranking_gives_every_block_row_the_ratios():
    model = ARCHITECTURES["llama"]()
    result = pruning.prune(model, calibration_ids(), "wanda", "three_tier", ranking="row",
                           tier_ratios=(0.25, 0.5, 0.25), progress=False)
    for name, tiers in result.tier_maps.items():
        per_row = tiers.shape[1]
        for row in tiers:
            assert int((row == DENSE).sum()) == int(per_row * 0.25), name
            assert int((row == SPARSE_24).sum()) == int(per_row * 0.5), name


def test_offload_dir_maps_each_pruned_layer_from_disk_and_changes_nothing(tmp_path):
    llama = ARCHITECTURES["llama"]
    here, spilled = llama(), llama()
    ids = calibration_ids()
    expected = pruning.prune(here, ids, method="sparsegpt", pattern="2:4", progress=False)
    got = pruning.prune(spilled, ids, method="sparsegpt", pattern="2:4", progress=False,
                        offload_dir=tmp_path / "layers")
    for (name, a), (_, b) in zip(here.state_dict().items(), spilled.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(torch.equal(expected.masks[n], got.masks[n]) for n in expected.masks)
    files = sorted((tmp_path / "layers").glob("*.pt"))
    assert [f.name for f in files] == ["layer-0000.pt", "layer-0001.pt"]
    with open("/proc/self/maps") as f:  # the layers' tensors are pages of those files
        mapped = f.read()
    assert all(str(f) in mapped for f in files)
    assert len(decoder_layers(spilled)[1]) == 2
    # Magnitude prunes without calibration, on the same turns.
    magnitude = llama()
    pruning.prune(magnitude, ids, method="magnitude", pattern="2:4", progress=False,
                  offload_dir=tmp_path / "magnitude")
    assert len(list((tmp_path / "magnitude").glob("layer-*.pt"))) == 2
    with pytest.raises(FileExistsError, match="already holds layer files"):
        pruning.prune(llama(), ids, method="wanda", pattern="2:4", progress=False,
                      offload_dir=tmp_path / "layers")
