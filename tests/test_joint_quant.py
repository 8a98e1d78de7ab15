"""Joint pruning and quantization: the OBS sweep with a low-bit grid against a plain sequential
OBS written from its textbook formulas, round-to-nearest for the other methods, prune(bits=...)
end to end (GPTQ with pattern="dense"), the byte budget over structure x precision, and the
quantize command after a fine-tune."""
import pytest
import torch

import pruning
import sparse_kernels as sk
from pruning.methods import get_method, quant_proxy
from pruning.methods.sparsegpt import act_order, obs_sweep, ordered_sweep, prepare_obs
from pruning.statistics import LinearStats
from sparse_kernels.quant import round_to_grid
from sparse_kernels.rules import group_size_for
from tiny_models import calibration_ids, llama


def make_hessian(in_f, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, in_f, generator=g, dtype=torch.float64) @ (
        torch.eye(in_f, dtype=torch.float64) + 0.3 * torch.randn(in_f, in_f, generator=g,
                                                                 dtype=torch.float64))
    return (2 / 256) * x.t() @ x


def sequential_obs(w, hessian, pruned, bits, group):
    """Prune and quantize column by column, the textbook way (no Cholesky, no blocks): column j
    takes its value q_j (0 where pruned, else the nearest code at its group's scale, set from the
    group's current unpruned weights when the sweep reaches it); the error goes to the later
    columns through the inverse Hessian, from which column j is then eliminated."""
    w = w.double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    hinv = torch.linalg.inv(h)
    qmax = {8: 127, 4: 7}[bits]
    scale = torch.zeros(rows, dtype=torch.float64)
    out = torch.zeros_like(w)
    for j in range(cols):
        if j % group == 0:
            amax = w[:, j:j + group].masked_fill(pruned[:, j:j + group], 0).abs().amax(1)
            scale = (amax / qmax).to(torch.float16).double()
        codes = torch.where(scale > 0, (w[:, j] / torch.where(scale > 0, scale, 1)).round()
                            .clamp(-qmax, qmax), 0)
        q = torch.where(pruned[:, j], 0.0, codes * scale)
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1:] -= err.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        out[:, j] = q
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_sweep_equals_sequential_obs(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 24, generator=g)
    hessian = make_hessian(24, seed)
    pruned = torch.rand(6, 24, generator=g) < 0.3
    expected = sequential_obs(w, hessian, pruned, bits, group=8)
    wf, u = prepare_obs(w, hessian.float())
    got, kept, scales = obs_sweep(wf, u, mask=~pruned, bits=bits, group_size=8, blocksize=16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(kept, ~pruned) and scales.shape == (6, 3)
    on_grid, _ = round_to_grid(got, bits, 8, scales)
    assert torch.equal(on_grid, got)  # every kept weight is a code times its group's scale


def test_act_order_takes_whole_runs_loudest_first_and_keeps_a_ragged_run_last():
    diag = torch.tensor([1., 9., 2., 2., 5., 0., 7., 7., 100.])
    order = act_order(torch.diag(diag), run=2)
    # runs (0,1) max 9, (2,3) 2, (4,5) 5, (6,7) 7; column 8 is a ragged run: last, however loud
    assert order.tolist() == [0, 1, 6, 7, 4, 5, 2, 3, 8]
    assert act_order(torch.diag(diag), run=1).tolist() == torch.sort(
        diag, descending=True, stable=True).indices.tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_ordered_sweep_is_the_sequential_obs_of_the_permuted_problem(bits):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 28, generator=g)  # 3 whole groups of 8 and a ragged one of 4
    hessian = make_hessian(28, 3)
    pruned = torch.rand(6, 28, generator=g) < 0.3
    order = act_order(hessian, 8)
    assert sorted(order[:24].tolist()) == list(range(24)) and order[24:].tolist() == [24, 25,
                                                                                     26, 27]
    got, kept, scales = ordered_sweep(w, hessian.float(), order, percdamp=0.01, nsamples=None,
                                      mask=~pruned, bits=bits, group_size=8, blocksize=16,
                                      block_size=4)
    expected = torch.empty(6, 28, dtype=torch.float64)
    expected[:, order] = sequential_obs(w[:, order], hessian[order][:, order], pruned[:, order],
                                        bits, group=8)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(kept, ~pruned)
    # the scales come back in the weight's group order: every kept weight is on its grid
    assert torch.equal(round_to_grid(got, bits, 8, scales)[0], got)


def test_act_order_lowers_the_error_where_the_loud_inputs_come_last():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    loud = torch.ones(128)
    loud[96:] = 8.0  # the last group's inputs are 8x louder
    x = (torch.randn(8, 32, 128) @ (torch.eye(128) + 0.3 * torch.randn(128, 128) / 11)) * loud
    stats = LinearStats.empty(128, hessian=True)
    stats.add_batch(x)
    x = x.reshape(-1, 128)
    for kind in ("dense", "2:4", "three_tier"):  # three_tier: the structure holds in act order
        ratios = dict(tier_ratios=(0.25, 0.5, 0.25), topk=16) if kind == "three_tier" else {}
        pattern = pruning.patterns.parse_pattern(kind, bits=4, group_size=32, **ratios)
        error = {}
        for ordered in (True, False):
            r = get_method("sparsegpt", act_order=ordered).prune(w, stats, pattern)
            error[ordered] = float(((x @ (r.weight - w).t()) ** 2).sum())
            assert torch.equal(round_to_grid(r.weight, 4, 32, r.scales)[0], r.weight)
            if kind == "2:4":
                assert bool(((r.weight != 0).reshape(64, 32, 4).sum(-1) <= 2).all())
            if kind == "three_tier":  # the tiers hold: top-K blocks keep at most K
                blocks = (r.weight != 0).reshape(4, 16, 8, 16).sum((1, 3))
                assert bool((blocks[r.tier_map == sk.TOPK] <= 16).all())
        if kind != "three_tier":  # there pruning whole blocks dominates the error
            assert error[True] < 0.8 * error[False], (kind, error)


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    stats = LinearStats.empty(128, hessian=True)
    x = torch.randn(8, 32, 128) @ (torch.eye(128) + 0.5 * torch.randn(128, 128) / 11)
    stats.add_batch(x)
    x = x.reshape(-1, 128)
    pattern = pruning.patterns.parse_pattern("dense", bits=4, group_size=64)
    gptq = get_method("sparsegpt").prune(w, stats, pattern)
    rtn = get_method("magnitude").prune(w, stats, pattern)
    assert bool(gptq.mask.all()) and bool(rtn.mask.all())
    error = {name: float(((x @ (r.weight - w).t()) ** 2).sum()) for name, r in
             (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.7 * error["rtn"]
    assert torch.equal(rtn.weight, round_to_grid(w, 4, 64)[0])


def test_quant_proxy_is_the_drop_proxy_scaled_to_the_rounding_error():
    w = torch.tensor([[1.0, 0.5, -0.3, 0.0] * 4])
    proxy = w.pow(2) * 3.0
    q = quant_proxy(proxy, w, 4, 16)
    error = w - round_to_grid(w, 4, 16)[0]
    torch.testing.assert_close(q, error.pow(2) * 3.0)
    assert not bool(quant_proxy(proxy, w, 16, 16).any())


@pytest.fixture(scope="module")
def ids():
    return calibration_ids(8, 24)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "wanda_obs", "magnitude"])
@pytest.mark.parametrize("bits", [8, 4])
def test_prune_with_bits_puts_the_model_on_the_grid_and_packs_it(ids, method, bits):
    model = llama().eval()
    result = pruning.prune(model, ids, method, "three_tier", tier_ratios=(0.4, 0.4, 0.2),
                           bits=bits, group_size=64, progress=False)
    assert set(result.bits.values()) == {bits} and set(result.scales) == set(result.tier_maps)
    dense_out = model(ids[:2]).logits
    for name, scales in result.scales.items():
        weight = model.get_submodule(name).weight.detach()
        group = group_size_for(weight.shape[1], 64)  # 64, or less where 64 does not divide
        assert torch.equal(round_to_grid(weight, bits, group, scales)[0], weight)
    packed_bytes = result.report["packed_bytes"]["packed"]
    result.pack(model)
    modules = [m for m in model.modules() if isinstance(m, sk.HybridSparseLinear)]
    assert sum(m.hybrid_weight.nbytes for m in modules) == packed_bytes
    torch.testing.assert_close(model(ids[:2]).logits, dense_out, rtol=1e-4, atol=1e-4)


def test_gptq_is_the_dense_pattern_with_bits(ids):
    model = llama().eval()
    result = pruning.prune(model, ids, "sparsegpt", "dense", bits=4, group_size=64,
                           progress=False)
    assert result.report["sparsity"] < 0.01  # only weights that round to 0
    assert all(bool((t == sk.DENSE).all()) for t in result.tier_maps.values())
    fraction = result.report["packed_bytes"]["fraction"]  # of the fp32 model's bytes
    assert 0.25 / 2 < fraction < 0.30 / 2


def test_a_budget_chooses_structure_and_precision_together(ids):
    model = llama().eval()
    result = pruning.prune(model, ids, "sparsegpt", "three_tier", budget=0.25, bits=(16, 8, 4),
                           budget_dtype=torch.float16, ranking="layer", group_size=64,
                           progress=False)
    packed = result.report["packed_bytes"]
    assert packed["fraction"] <= 0.25 and packed["budget"] == 0.25
    assert set(result.bits.values()) <= {16, 8, 4} and 4 in result.bits.values()
    assert "int16/8/4" not in result.describe() and "16 bits/8/4" in result.describe()
    pinned = pruning.prune(llama().eval(), ids, "sparsegpt", "three_tier", budget=0.5, bits=8,
                           budget_dtype=torch.float16, progress=False)
    assert set(pinned.bits.values()) == {8}
    with pytest.raises(ValueError, match="below the smallest"):
        pruning.prune(llama().eval(), ids, "sparsegpt", "three_tier", budget=0.1, bits=16,
                      budget_dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="several precisions"):
        pruning.prune(llama().eval(), ids, "wanda", "three_tier", bits=(8, 4), progress=False)


def test_quantize_after_a_fine_tune_keeps_the_tiers(tmp_path):
    """prune -> masked fine-tune at full precision -> quantize: the tiers survive, the values
    land on the grid, and the checkpoint loads packed with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from pruning.cli import main
    from tiny_models import VOCAB, word_tokenizer

    base = tmp_path / "base"
    llama().save_pretrained(base)
    word_tokenizer([f"w{i}" for i in range(VOCAB - 3)]).save_pretrained(base)
    common = ["--seqlen", "32", "--ppl-windows", "2"]
    pruned, tuned, quantized = tmp_path / "pruned", tmp_path / "tuned", tmp_path / "int4"
    assert main(["prune", "--model", str(base), "--nsamples", "4", "--bits", "4",
                 "--group-size", "64", "--save", str(pruned), *common]) == 0
    assert main(["finetune", "--model", str(pruned), "--save", str(tuned), "--max-steps", "2",
                 "--lr", "1e-2", *common]) == 0
    tuned_model = AutoModelForCausalLM.from_pretrained(tuned)
    assert all(m.hybrid_weight.bits == 16 for m in tuned_model.modules()
               if isinstance(m, sk.HybridSparseLinear))  # off the grid: saved at 16 bits
    assert main(["quantize", "--model", str(tuned), "--bits", "4", "--group-size", "64",
                 "--nsamples", "4", "--save", str(quantized), *common]) == 0
    model = AutoModelForCausalLM.from_pretrained(quantized)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, sk.HybridSparseLinear)}
    assert packed and all(m.hybrid_weight.bits == 4 for m in packed.values())
    for name, module in packed.items():
        before = tuned_model.get_submodule(name)
        assert torch.equal(module.tier_map, before.tier_map)
        assert not bool(module.hybrid_weight.to_dense()[~before.hybrid_weight.kept_mask()].any())
    with pytest.raises(SystemExit, match="already holds int4"):
        main(["quantize", "--model", str(quantized), "--save", str(tmp_path / "again"),
              *common])
