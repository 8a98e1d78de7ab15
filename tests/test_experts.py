"""Mixture-of-experts models: every expert pruned as its own matrix from the tokens routed to
it, honest coverage, packed execution equal to the masked model, and saves that load back."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import pruning
import sparse_kernels as sk
from pruning.statistics.capture import _collect_stats
from pruning.checkpoints import load_pruned, save_pruned
from pruning.models import capture_layer_inputs
from sparse_kernels.experts import ExpertLinears, unfuse_experts
from tiny_models import MOE_ARCHITECTURES, VOCAB, calibration_ids, word_tokenizer

MOE = list(MOE_ARCHITECTURES)


def experts_of(model, layer=0) -> ExpertLinears:
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("arch", MOE)
def test_expert_linears_compute_the_fused_experts_and_save_fused(arch):
    model = MOE_ARCHITECTURES[arch]()
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    fused_keys = set(model.state_dict())
    assert set(unfuse_experts(model)) == {"model.layers.0.mlp.experts",
                                          "model.layers.1.mlp.experts"}
    assert isinstance(experts_of(model), ExpertLinears)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    assert set(model.state_dict()) == fused_keys  # the layout stock transformers loads
    # The Linears are views of the fused weights: writing one writes the fused tensor.
    state = model.state_dict()
    with torch.no_grad():
        experts_of(model).down[2].weight.zero_()
    assert not model.state_dict()["model.layers.0.mlp.experts.down_proj"][2].any()
    assert state["model.layers.0.mlp.experts.down_proj"][1].any()


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_expert_is_pruned_to_the_pattern(arch, pattern):
    model = MOE_ARCHITECTURES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning: the experts are covered
        result = pruning.prune(model, calibration_ids(8, 32), "wanda", pattern, 0.5,
                               min_tokens=1, progress=False)
    experts = experts_of(model)
    for e in range(experts.num_experts):
        for linears in (experts.gate_up, experts.down):
            w = linears[e].weight
            if pattern == "2:4":
                groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
                assert bool((groups <= 2).all())
            else:
                assert int((w == 0).sum()) == w.numel() // 2
    cover = result.report["coverage"]
    assert cover["unpruned_weight_fraction"] < 0.01  # only the routers stay dense
    skipped = {s["why"] for layer in cover["per_layer"].values() for s in layer["skipped"]
               if len(s["shape"]) > 1}
    assert skipped == {"router (one row per expert): stays dense"}
    assert cover["sparsity_over_decoder_weights"] == pytest.approx(0.5, abs=0.01)
    tokens = result.report["expert_tokens"]
    assert len(tokens) == 2 * 2 * 4 and sum(
        t for n, t in tokens.items() if ".0.mlp.experts.gate_up." in n) == 8 * 32 * 2  # top-2


def test_expert_statistics_come_from_the_routed_tokens_only():
    model = MOE_ARCHITECTURES["mixtral"]()
    unfuse_experts(model)
    ids = calibration_ids(4, 16)
    inputs = capture_layer_inputs(model, [ids[:2], ids[2:]])
    layer = model.model.layers[0]
    routed = []
    hook = layer.mlp.experts.register_forward_pre_hook(
        lambda _m, args: routed.append((args[0].detach(), args[1].detach())))
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = _collect_stats(layer, linears, inputs, needs_hessian=True,
                           device=torch.device("cpu"))
    hook.remove()
    experts = layer.mlp.experts
    for e in range(experts.num_experts):
        x = torch.cat([h[(index == e).any(-1)] for h, index in routed])
        gate, up = torch.nn.functional.linear(x, experts.gate_up[e].weight).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        for name, inp in ((f"mlp.experts.gate_up.{e}", x), (f"mlp.experts.down.{e}", h)):
            s = stats[name]
            assert s.tokens == len(x) and s.nsamples == 4
            torch.testing.assert_close(s.act_sq_norm, inp.pow(2).sum(0) / 4)
            torch.testing.assert_close(s.hessian, 2 * inp.t() @ inp / 4, rtol=1e-4, atol=1e-5)


def test_an_expert_with_too_few_tokens_falls_back_to_magnitude():
    model = MOE_ARCHITECTURES["mixtral"]()
    unfuse_experts(model)
    experts = experts_of(model)
    # Layer 0's router never sends a token to expert 3 (its choices go to expert 2).
    experts.register_forward_pre_hook(
        lambda _m, args: (args[0], torch.where(args[1] == 3, 2, args[1]), args[2]))
    weight = experts.gate_up[3].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"pruned by magnitude: .*gate_up\.3 \(0\)"):
        result = pruning.prune(model, calibration_ids(8, 32), "wanda", "unstructured", 0.5,
                               progress=False)
    assert result.report["expert_tokens"]["model.layers.0.mlp.experts.gate_up.3"] == 0
    assert result.report["magnitude_fallback"] == {"model.layers.0.mlp.experts.gate_up.3": 0,
                                                   "model.layers.0.mlp.experts.down.3": 0}
    # Magnitude, unstructured, per output row: the larger half of each row stays.
    kept = experts.gate_up[3].weight != 0
    for row, keep in zip(weight.abs(), kept):
        assert bool((row[keep].min() >= row[~keep].max()))


@pytest.mark.parametrize("arch", MOE)
def test_packed_experts_generate_what_the_masked_model_does_and_reload(arch, tmp_path):
    model = MOE_ARCHITECTURES[arch]()
    result = pruning.prune(model, calibration_ids(8, 32), "sparsegpt", "three_tier",
                           budget=0.6, min_tokens=1, progress=False)
    assert any(".experts.gate_up." in n for n in result.tier_maps)
    prompt = calibration_ids(1, 6, seed=5)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        masked = model.generate(prompt, **kwargs)
    tokenizer = word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    save_pruned(tmp_path / "packed", model, tokenizer, result, {})
    assert isinstance(experts_of(model).gate_up[0], sk.HybridSparseLinear)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), masked)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert isinstance(experts_of(reloaded).down[1], sk.HybridSparseLinear)
    with torch.no_grad():
        assert torch.equal(reloaded.generate(prompt, **kwargs), masked)
    again = load_pruned(tmp_path / "packed")  # fine-tuning's view: dense Linears and masks
    assert set(again.masks) == set(result.masks)


def test_sparsify_model_unfuses_experts_named_in_saved_tier_maps(tmp_path):
    model = MOE_ARCHITECTURES["qwen3_moe"]()
    result = pruning.prune(model, calibration_ids(8, 32), "wanda", "2:4", min_tokens=1,
                           progress=False)
    result.save_tier_maps(tmp_path / "tiers.safetensors")
    model.save_pretrained(tmp_path / "dense")  # dense, zero-filled, experts fused on disk
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not isinstance(experts_of(fresh), ExpertLinears)
    tier_maps, meta = pruning.load_tier_maps(tmp_path / "tiers.safetensors")
    sk.sparsify_model(fresh, tier_maps, topk=meta["topk"])
    assert isinstance(experts_of(fresh).gate_up[2], sk.HybridSparseLinear)
    prompt = calibration_ids(1, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))
