"""Global structured pruning: units found on every architecture, slicing that is exact, the
parameter budget met, guards kept, and saved models that load back to the same logits."""
import copy

import pytest
import torch

from pruning.models import decoder_layers
from pruning.structured import (Plan, discover_units, is_structured, load_structured,
                                save_structured, select_units, structured_prune,
                                unit_importance, unit_statistics)
from pruning.models import next_token_loss
from pruning.structured.prior import prior_factors, skip_losses
from pruning.structured.slicing import apply_plan
from pruning.structured.units import ATTENTION, MLP
from tiny_models import ARCHITECTURES, VOCAB, calibration_ids, word_tokenizer


def gqa_model(heads, kv_heads, family="llama", layers=2):
    """A tiny model with the given query / KV head counts (head_dim 8)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    torch.manual_seed(0)
    cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                      "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    return model_cls(cls(vocab_size=VOCAB, hidden_size=8 * heads, head_dim=8,
                         intermediate_size=40, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("heads,kv,family", [(4, 4, "llama"), (6, 2, "llama"), (8, 2, "llama"),
                                             (7, 1, "qwen2")])
def test_units_follow_the_gqa_ratio(heads, kv, family):
    units = discover_units(gqa_model(heads, kv, family))
    assert [(u.groups, u.group_size, u.head_dim, u.channels) for u in units] == \
        [(kv, heads // kv, 8, 40)] * 2
    # One group: q/k/v rows (group_size + 2 heads) and o columns (group_size heads), 8 wide.
    assert units[0].unit_cost(ATTENTION, decoder_layers(gqa_model(heads, kv, family))[1][0]) \
        == (2 * (heads // kv) + 2) * 8 * (8 * heads) + (8 * (heads // kv) + 16 if family ==
                                                         "qwen2" else 0)


def test_units_on_opt_and_mistral():
    opt = discover_units(ARCHITECTURES["opt"]())[0]
    assert (opt.o, opt.expand, opt.contract, opt.groups, opt.group_size) == \
        ("self_attn.out_proj", ("fc1",), "fc2", 4, 1)
    mistral = discover_units(ARCHITECTURES["mistral"]())[0]
    assert (mistral.expand, mistral.groups, mistral.group_size) == \
        (("mlp.gate_proj", "mlp.up_proj"), 2, 2)


def test_fused_projections_are_refused_by_name():
    with pytest.raises(ValueError, match="c_attn.*fused"):
        discover_units(ARCHITECTURES["gpt2"]())


def zeroed_reference(model, plan):
    """The original model with the removed units' o / down columns (their only path to the
    residual stream) set to zero."""
    ref = copy.deepcopy(model)
    _, layers = decoder_layers(ref)
    for u in discover_units(ref):
        layer = layers[u.index]
        width = u.group_size * u.head_dim
        with torch.no_grad():
            for g in plan.removed.get((u.index, ATTENTION), []):
                layer.get_submodule(u.o).weight[:, g * width:(g + 1) * width] = 0
            for c in plan.removed.get((u.index, MLP), []):
                layer.get_submodule(u.contract).weight[:, c] = 0
    return ref


def check_same(model, ref):
    test = calibration_ids(2, 20, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(test).logits, ref(test).logits, rtol=1e-4, atol=1e-5)
    # ... and with a KV cache (greedy decode): the sliced attention caches fewer heads.
    out = model.generate(test[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(test[:1, :5], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
def test_the_smaller_model_computes_the_original_with_the_units_zeroed(arch):
    model = ARCHITECTURES[arch]()
    original = copy.deepcopy(model)
    units = discover_units(model)
    plan = Plan({(0, ATTENTION): [1], (1, ATTENTION): [0], (0, MLP): [0, 5, 95],
                 (1, MLP): list(range(10, 40))})
    sizes = apply_plan(model, units, plan)
    assert [s["attention_groups"] for s in sizes] == [units[0].groups - 1] * 2
    assert [s["mlp_channels"] for s in sizes] == [93, 66]
    check_same(model, zeroed_reference(original, plan))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("importance", ["taylor", "taylor_2nd", "wanda"])
def test_structured_prune_slices_what_it_planned(arch, importance):
    model = ARCHITECTURES[arch]()
    original = copy.deepcopy(model)
    result = structured_prune(model, calibration_ids(4, 24), ratio=0.3, importance=importance,
                              progress=False)
    assert sum(len(v) for v in result.plan.removed.values()) > 0
    check_same(model, zeroed_reference(original, result.plan))


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_removed_parameters_are_within_one_unit_of_the_ratio(arch, ratio):
    model = ARCHITECTURES[arch]()
    before = sum(p.numel() for p in model.parameters())
    units = discover_units(model)
    result = structured_prune(model, calibration_ids(), ratio=ratio, importance="magnitude",
                              progress=False)
    after = sum(p.numel() for p in model.parameters())
    largest_unit = max(u.unit_cost(k, layer) for u, layer in zip(units, decoder_layers(
        ARCHITECTURES[arch]())[1]) for k in (ATTENTION, MLP))
    assert after == result.summary["params_after"]
    assert 0 <= ratio * before - (before - after) < largest_unit


def test_the_lowest_scores_go_first_and_a_block_keeps_its_last_unit():
    scores = {(0, ATTENTION): torch.tensor([5., 1., 9.]), (0, MLP): torch.tensor([2., 3., 0.5]),
              (1, ATTENTION): torch.tensor([0.1, 0.2]), (1, MLP): torch.tensor([7., 8.])}
    costs = {k: 10 for k in scores}
    plan = select_units(scores, costs, ratio=0.5, total_params=100)
    # Ascending: (1,att,0)=0.1, (1,att,1)=0.2 (the last of its block: stays), (0,mlp,2)=0.5,
    # (0,att,1)=1, (0,mlp,0)=2 -> 4 units = 40 params; the next, (0,mlp,1), would be the last
    # MLP unit of layer 0, then (0,att,0) = 50 fits.
    assert plan.removed == {(0, ATTENTION): [0, 1], (0, MLP): [0, 2], (1, ATTENTION): [0],
                            (1, MLP): []}
    assert plan.removed_params == 50
    with pytest.raises(ValueError, match="at most ratio 0.600"):
        select_units(scores, costs, ratio=0.7, total_params=100)
    with pytest.raises(ValueError, match="NaN"):
        select_units({**scores, (1, MLP): torch.tensor([float("nan"), 1.])}, costs, 0.2, 100)
    with pytest.raises(ValueError, match="0 < ratio < 1"):
        select_units(scores, costs, ratio=1.5, total_params=100)


def test_epsilon_collapses_a_layer_whose_kept_fraction_falls_below_it():
    scores = {(0, ATTENTION): torch.tensor([0.1, 0.2]), (0, MLP): torch.tensor([0.3, 0.4]),
              (1, ATTENTION): torch.tensor([5., 6.]), (1, MLP): torch.tensor([7., 8.])}
    costs = {k: 10 for k in scores}
    plain = select_units(scores, costs, ratio=0.25, total_params=100)
    assert plain.collapsed == [] and plain.removed_params == 20  # one unit per block stays
    collapsed = select_units(scores, costs, ratio=0.25, total_params=100, epsilon=0.6)
    assert collapsed.collapsed == [0] and collapsed.removed_params == 40
    assert collapsed.removed[(0, ATTENTION)] == [0, 1] and collapsed.removed[(1, MLP)] == []


def test_a_collapsed_layer_is_deleted_and_the_model_skips_it():
    model = ARCHITECTURES["llama"]()
    original = copy.deepcopy(model)
    ids = calibration_ids()
    result = structured_prune(model, ids, ratio=0.3, importance="magnitude", epsilon=0.9,
                              progress=False)
    assert result.plan.collapsed and model.config.num_hidden_layers == 1
    keep = 1 - result.plan.collapsed[0]
    ref = zeroed_reference(original, Plan({k: v for k, v in result.plan.removed.items()
                                           if k[0] == keep}))
    _, layers = decoder_layers(ref)
    del layers[result.plan.collapsed[0]]  # LLaMA has no biases: a layer with nothing is identity
    layers[0].self_attn.layer_idx = 0
    ref.config.num_hidden_layers = 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False),
                       ref.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))


def test_uniform_sizes_load_with_stock_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = gqa_model(8, 4)
    tok = word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    result = structured_prune(model, calibration_ids(), ratio=0.45, importance="wanda",
                              uniform=True, progress=False)
    assert len({(s["attention_groups"], s["mlp_channels"]) for s in result.sizes}) == 1
    assert result.sizes[0]["attention_groups"] == 2 and result.summary["stock_loadable"]
    save_structured(tmp_path / "out", model, tok, result)
    assert not is_structured(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name in ("units.csv", "structured.json", "kept.png", "report.json"):
        assert (tmp_path / "out" / name).is_file()


def test_a_head_count_transformers_refuses_loads_through_load_structured(tmp_path):
    model = gqa_model(8, 4)  # hidden 64: 3 groups = 6 heads, which LlamaConfig refuses
    result = structured_prune(model, calibration_ids(), ratio=0.3, importance="wanda",
                              uniform=True, progress=False)
    assert result.sizes[0]["heads"] == 6 and not result.summary["stock_loadable"]
    assert "multiple of the number of attention heads" in model.config.structured_stock_refused
    save_structured(tmp_path / "out", model, None, result)
    assert is_structured(tmp_path / "out")
    loaded, _ = load_structured(tmp_path / "out")
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_per_layer_sizes_load_through_load_structured(tmp_path, arch):
    model = ARCHITECTURES[arch]()
    result = structured_prune(model, calibration_ids(), ratio=0.3, importance="taylor",
                              progress=False)
    assert len({(s["attention_groups"], s["mlp_channels"]) for s in result.sizes}) > 1 \
        or arch == "opt"
    save_structured(tmp_path / "out", model, None, result)
    assert is_structured(tmp_path / "out")
    loaded, tokenizer = load_structured(tmp_path / "out")
    assert tokenizer is None
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    rows = (tmp_path / "out" / "units.csv").read_text().splitlines()
    assert rows[0] == "layer,type,index,importance,cost,prior,score,kept"
    assert len(rows) - 1 == sum(u.groups + u.channels
                                for u in discover_units(ARCHITECTURES[arch]()))


def test_a_truncated_structured_checkpoint_raises_naming_the_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ARCHITECTURES["llama"]()
    result = structured_prune(model, calibration_ids(), ratio=0.3, importance="magnitude",
                              progress=False)
    save_structured(tmp_path / "out", model, None, result)
    weights = tmp_path / "out" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.down_proj"):
        load_structured(tmp_path / "out")


def test_importance_sums_each_units_weights():
    model = gqa_model(4, 2)
    units = discover_units(model)
    layer = decoder_layers(model)[1][0]
    magnitude = unit_importance(model, units, "magnitude")
    group = 1
    rows = slice(group * 16, group * 16 + 16)  # 2 query heads x 8
    kv = slice(group * 8, group * 8 + 8)
    expected = (layer.self_attn.q_proj.weight[rows].abs().sum()
                + layer.self_attn.k_proj.weight[kv].abs().sum()
                + layer.self_attn.v_proj.weight[kv].abs().sum()
                + layer.self_attn.o_proj.weight[:, rows].abs().sum())
    torch.testing.assert_close(magnitude[(0, ATTENTION)][group], expected.detach())
    channel = 7
    expected = (layer.mlp.gate_proj.weight[channel].abs().sum()
                + layer.mlp.up_proj.weight[channel].abs().sum()
                + layer.mlp.down_proj.weight[:, channel].abs().sum())
    torch.testing.assert_close(magnitude[(0, MLP)][channel], expected.detach())
    # taylor: |W * sum of per-sample gradients|, checked against autograd directly.
    ids = calibration_ids(3, 12)
    stats = unit_statistics(model, units, [ids], progress=False)
    model.zero_grad()
    for row in ids:
        out = model(row[None], use_cache=False).logits[:, :-1]
        torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), row[1:]).backward()
    down = layer.mlp.down_proj.weight
    torch.testing.assert_close(stats.grad["model.layers.0.mlp.down_proj"], down.grad)
    taylor = unit_importance(model, units, "taylor", stats)
    expected = sum((m.weight * m.weight.grad)[channel].abs().sum()
                   for m in (layer.mlp.gate_proj, layer.mlp.up_proj)) \
        + (down * down.grad)[:, channel].abs().sum()
    torch.testing.assert_close(taylor[(0, MLP)][channel], expected.detach(), rtol=1e-5,
                               atol=1e-8)
    second = unit_importance(model, units, "taylor_2nd", stats)
    assert bool((second[(0, MLP)] >= taylor[(0, MLP)]).all())
    with pytest.raises(ValueError, match="needs the gradient statistics"):
        unit_importance(model, units, "taylor", unit_statistics(model, units, [ids],
                                                                gradients=False,
                                                                progress=False))


def test_prior_factors():
    losses = {"layer": [0.01, 2.0], ATTENTION: [0.5, 1.0], MLP: [0.2, 3.0]}
    assert set(prior_factors(losses, 0.0, 0.1).values()) == {1.0}
    factors = prior_factors(losses, 2.0, tau=0.1)
    # Layer 0 is below tau: judged as a whole; layer 1 by block.
    assert factors[(0, ATTENTION)] == factors[(0, MLP)] == pytest.approx(
        torch.log1p(torch.tensor(0.01)).item() ** 2)
    assert factors[(1, MLP)] == pytest.approx(torch.log1p(torch.tensor(3.0)).item() ** 2)
    with pytest.raises(ValueError, match="temperature"):
        prior_factors(losses, -1.0, 0.1)


def test_the_prior_measures_skipping_and_changes_the_choice():
    model = ARCHITECTURES["llama"]()
    ids = calibration_ids(4, 24)
    result = structured_prune(copy.deepcopy(model), ids, ratio=0.2, importance="magnitude",
                              temperature=1.0, tau=0.0, progress=False)
    losses = result.skip_losses
    assert len(losses["layer"]) == 2 and losses["base"] > 0
    assert all(v >= 0 for k in ("layer", ATTENTION, MLP) for v in losses[k])
    priors = {(r["layer"], r["type"]): r["prior"] for r in result.units}
    assert priors[(0, MLP)] == pytest.approx(torch.log1p(torch.tensor(losses[MLP][0])).item())


@pytest.mark.parametrize("make", [lambda: gqa_model(6, 2, "llama", layers=4),
                                  lambda: gqa_model(7, 1, "qwen2", layers=3),
                                  ARCHITECTURES["opt"]], ids=["llama", "qwen2", "opt"])
def test_skip_losses_replaying_earlier_layers_equal_full_forwards(make):
    model = make()
    units = discover_units(model)
    batches = list(calibration_ids(4, 24).split(2))

    def loss(zeroed=()):  # every batch through the whole model, the given outputs zeroed
        handles = [m.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
                   for m in zeroed]
        try:
            with torch.no_grad():
                total = sum(next_token_loss(model, b, reduction="sum").item() for b in batches)
        finally:
            for h in handles:
                h.remove()
        return total / sum(b[:, 1:].numel() for b in batches)

    got = skip_losses(model, units, batches, progress=False)
    base = loss()
    assert got["base"] == pytest.approx(base, rel=1e-5)
    layers = decoder_layers(model)[1]
    for u in units:
        layer = layers[u.index]
        attention, mlp = layer.get_submodule(u.o), layer.get_submodule(u.contract)
        for key, zeroed in ((ATTENTION, [attention]), (MLP, [mlp]), ("layer", [attention, mlp])):
            want = max(loss(zeroed) - base, 0.0)
            assert got[key][u.index] == pytest.approx(want, rel=1e-4, abs=1e-6), (key, u.index)
    # The layers compute again afterwards (nothing left replaying).
    assert loss() == pytest.approx(base, rel=1e-6)
    assert all("forward" not in vars(layer) for layer in layers)


@pytest.fixture
def tiny_folder(tmp_path):
    model = ARCHITECTURES["llama"]()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    word_tokenizer([f"w{i}" for i in range(VOCAB - 3)]).save_pretrained(folder)
    return folder


def test_the_command_line_prunes_saves_fine_tunes_and_loads(tmp_path, tiny_folder, capsys):
    import json

    from pruning.cli import main
    from pruning.evaluation import perplexity
    from pruning.loading import load_model

    out, tuned = tmp_path / "smaller", tmp_path / "tuned"
    common = ["--seqlen", "32", "--ppl-windows", "2"]
    assert main(["structured", "--model", str(tiny_folder), "--ratio", "0.3", "--nsamples", "4",
                 "--temperature", "1", "--eval-ppl", "--time-decode", "--save", str(out),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "removed 2" in printed and "one decode step" in printed
    report = json.loads((out / "report.json").read_text())
    assert 0.28 < report["structured"]["removed_fraction"] <= 0.3
    assert report["structured"]["temperature"] == 1.0 and "structured" in report["ppl"]
    model, tokenizer, _ = load_model(str(out))  # per-layer sizes: load_structured underneath
    assert perplexity(model, tokenizer, "embedded", seqlen=32, max_windows=2,
                      progress=False) == pytest.approx(report["ppl"]["structured"], rel=1e-5)
    # Recovery: every weight of the smaller model trains; it saves and loads the same way.
    assert main(["finetune", "--model", str(out), "--save", str(tuned), "--max-steps", "2",
                 "--lr", "1e-2", *common]) == 0
    after, _, _ = load_model(str(tuned))
    assert sum(p.numel() for p in after.parameters()) == report["structured"]["params_after"]
    changed = after.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(changed, model.model.layers[0].mlp.down_proj.weight)


def test_the_command_line_composes_structured_and_three_tier(tmp_path, tiny_folder):
    import json

    import sparse_kernels as sk
    from pruning.cli import main
    from pruning.evaluation import perplexity
    from pruning.loading import load_model

    out = tmp_path / "both"
    assert main(["structured", "--model", str(tiny_folder), "--ratio", "0.2", "--nsamples", "4",
                 "--then-three-tier", "--budget", "0.7", "--eval-ppl", "--save", str(out),
                 "--seqlen", "32", "--ppl-windows", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["three_tier"]["packed_bytes"]["fraction"] <= 0.7
    assert (out / "units.csv").is_file() and (out / "tier_maps.safetensors").is_file()
    model, tokenizer, _ = load_model(str(out))
    assert sum(isinstance(m, sk.HybridSparseLinear) for m in model.modules()) == 2 * 7
    assert perplexity(model, tokenizer, "embedded", seqlen=32, max_windows=2,
                      progress=False) == pytest.approx(report["ppl"]["structured+three_tier"],
                                                       rel=1e-4)


def test_halves_that_agree_settle_the_ranking_and_disagreement_warns_naming_samples():
    """Two halves of identical samples make one plan (agreement 1, no excess, no warning);
    halves whose plans differ warn, naming how many samples would settle the plan."""
    import warnings

    from pruning.structured.api import warn_if_unsettled

    model = ARCHITECTURES["llama"]()
    ids = calibration_ids(2, 24, seed=2)
    twice = torch.cat([ids, ids])  # the first half and the second half: the same samples
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = structured_prune(model, twice, ratio=0.3, importance="taylor", progress=False)
    stability = result.summary["ranking_stability"]
    assert stability["agreement"] == 1.0 and abs(stability["excess"]) < 1e-6
    with pytest.warns(UserWarning, match=r"unstable on these 8 .* agree on 40%.*nsamples=16"):
        warn_if_unsettled({"agreement": 0.4, "excess": 0.2}, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unsettled({"agreement": 0.7, "excess": 0.08}, 8)  # settled within 5 %
    magnitude = structured_prune(ARCHITECTURES["llama"](), None, ratio=0.3,
                                 importance="magnitude", progress=False)
    assert magnitude.summary["ranking_stability"] is None  # no samples, nothing to settle


def test_every_command_saves_without_matplotlib(tmp_path, tiny_folder, monkeypatch):
    """Plots are optional outputs: with matplotlib unimportable, each command that saves still
    writes everything else, with one warning naming the package."""
    import json
    import sys

    from pruning.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    common = ["--seqlen", "32", "--ppl-windows", "2", "--nsamples", "4"]
    out = tmp_path / "smaller"
    with pytest.warns(UserWarning, match="matplotlib is not installed.*kept.png"):
        assert main(["structured", "--model", str(tiny_folder), "--ratio", "0.3",
                     "--no-eval-ppl", "--no-time-decode", "--save", str(out), *common]) == 0
    assert (out / "units.csv").is_file() and not (out / "kept.png").exists()
    assert json.loads((out / "report.json").read_text())["structured"]["removed_fraction"] > 0
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert main(["prune", "--model", str(tiny_folder), "--save", str(pruned), *common]) == 0
    assert main(["finetune", "--model", str(pruned), "--save", str(tuned), "--max-steps", "1",
                 "--seqlen", "32", "--ppl-windows", "2"]) == 0
    assert main(["eval", "--model", str(tuned), "--tasks", "--seqlen", "32",
                 "--ppl-windows", "2"]) == 0
    assert (tuned / "report.json").is_file() and (pruned / "tier_maps.safetensors").is_file()
