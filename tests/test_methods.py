"""Pruning methods and patterns on single weight matrices: hand-computed cases, mask invariants
for every method x pattern, the OBS update's reconstruction error, and argument errors."""
import zlib

import pytest
import torch

import sparse_kernels as sk
from pruning.methods import METHODS, LayerPruning, Method, get_method
from pruning.methods.sparsegpt import obs_saliency, obs_sweep, prepare_obs
from pruning.patterns import (Pattern, block_scores, build_mask, parse_pattern, rank_blocks,
                              rank_blocks_jointly, wanda_variant_mask)
from pruning.planning import (ByteBudget, JointRanking, PlanContext, make_planner,
                              tier_settings)
from pruning.statistics import LinearStats
from sparse_kernels.tiers import tier_mask
from sparse_kernels import DENSE, SPARSE_24, TOPK


def make_stats(in_f, seed=0, tokens=64, samples=4, correlated=False):
    g = torch.Generator().manual_seed(seed)
    stats = LinearStats.empty(in_f, hessian=True)
    mix = torch.eye(in_f)
    if correlated:
        mix = 0.3 * mix + torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    scale = torch.rand(in_f, generator=g) * 2 + 0.1  # uneven column norms, so Wanda != magnitude
    x = (torch.randn(samples, tokens, in_f, generator=g) @ mix) * scale
    stats.add_batch(x)
    return stats, x.reshape(-1, in_f)


def blocks_of(t, b):
    """Yield (block_row, block_col, block) over the (ragged) b x b blocks of a 2-D tensor."""
    for br in range(-(-t.shape[0] // b)):
        for bc in range(-(-t.shape[1] // b)):
            yield br, bc, t[br * b:(br + 1) * b, bc * b:(bc + 1) * b]


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------

def test_wanda_hand_computed():
    weight = torch.tensor([[1., 2., 3., 4., 5., 6., 7., 8.],
                           [-8., 1., -1., 2., -2., 0.5, 4., -2.]])
    # sqrt(act_sq_norm) = [8, 4, 2, 1, 1, 1, 1, 1]
    stats = LinearStats(torch.tensor([64., 16., 4., 1., 1., 1., 1., 1.]), None, 1)
    # Row 0 scores [8, 8, 6, 4, 5, 6, 7, 8]: the 4 lowest are cols 3 (4), 4 (5), 2 and 5 (6).
    # Row 1 scores [64, 4, 2, 2, 2, 0.5, 4, 2]: col 5 (0.5), then the tied 2s at cols 2, 3, 4
    # (the stable sort prunes lower columns first), col 7 (also 2) survives.
    expected = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1],
                             [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    result = get_method("wanda").prune(weight, stats, parse_pattern("unstructured"))
    assert torch.equal(result.mask, expected)
    assert result.tier_map is None and result.weight is None
    # Magnitude disagrees on row 0 (it keeps the 4 largest |W| there: cols 4..7).
    magnitude = get_method("magnitude").prune(weight, None, "unstructured")
    assert not torch.equal(magnitude.mask[0], expected[0])


def test_magnitude_uses_one_threshold_per_matrix():
    weight = torch.tensor([[10., -11., 12., 13.],
                           [1., 2., -3., 4.]])
    result = get_method("magnitude").prune(weight, None, parse_pattern("unstructured"))
    # Per matrix: the 4 smallest |W| are all of row 1; per row would prune 2 in each.
    assert torch.equal(result.mask, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool))
    stats = LinearStats(torch.ones(4), None, 1)  # unit norms: Wanda = |W|, but per row
    wanda = get_method("wanda").prune(weight, stats, "unstructured")
    assert wanda.mask.sum(1).tolist() == [2, 2]


def test_unstructured_ties_prune_lower_index_first():
    scores = torch.ones(1, 6)
    mask, _ = build_mask(scores, parse_pattern("unstructured"), unstructured="row")
    assert mask.tolist() == [[False, False, False, True, True, True]]
    mask, _ = build_mask(torch.ones(2, 3), parse_pattern("unstructured"), unstructured="matrix")
    assert mask.tolist() == [[False, False, False], [True, True, True]]


# ---------------------------------------------------------------------------------------------
# Invariants: every method x pattern on awkward shapes
# ---------------------------------------------------------------------------------------------

PATTERNS = {
    "unstructured": parse_pattern("unstructured", sparsity=0.5),
    "2:4": parse_pattern("2:4"),
    "4:8": parse_pattern("4:8"),
    "block": parse_pattern("block", sparsity=0.5),
    "block_topk": parse_pattern("block_topk", sparsity=0.5, topk=15),
    "three_tier": parse_pattern("three_tier", tier_ratios=(0.35, 0.45, 0.20), topk=15),
    "three_tier_mag": parse_pattern("three-tier", within_block="magnitude"),
}
SHAPES = [(40, 72), (33, 48)]


def check_tier_pattern(mask, tiers, k, b=16):
    """Dense blocks keep all, 2:4 blocks 2 of every 4, top-K blocks min(k, size)."""
    for br, bc, blk in blocks_of(mask, b):
        tier = int(tiers[br, bc])
        if tier == DENSE:
            assert blk.all()
        elif tier == SPARSE_24:
            assert (blk.reshape(blk.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert int(blk.sum()) == min(k, blk.numel())


def check_invariants(method_name, pattern, weight, result):
    out_f, in_f = weight.shape
    mask = result.mask
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    kept = mask.sum().item()
    if pattern.kind == "unstructured":
        assert result.tier_map is None
        if method_name in ("wanda", "wanda_obs"):
            assert (mask.sum(1) == in_f - int(in_f * pattern.sparsity)).all()
        elif method_name == "magnitude":
            assert weight.numel() - kept == int(weight.numel() * pattern.sparsity)
        else:  # SparseGPT: exact count per 128-column block (one block here)
            assert weight.numel() - kept == int(weight.numel() * pattern.sparsity)
    elif pattern.kind == "nm":
        assert result.tier_map is None
        groups = mask.reshape(out_f, in_f // pattern.m, pattern.m).sum(-1)
        assert (groups == pattern.n).all()
    else:
        b, tiers = pattern.block_size, result.tier_map
        assert tiers.dtype == torch.int8 and tuple(tiers.shape) == (-(-out_f // b), -(-in_f // b))
        n = tiers.numel()
        if pattern.kind == "three_tier":
            n_dense, n_24 = int(n * pattern.tier_ratios[0]), int(n * pattern.tier_ratios[1])
            assert (tiers == DENSE).sum() == n_dense
            assert (tiers == SPARSE_24).sum() == n_24
            assert (tiers == TOPK).sum() == n - n_dense - n_24
        else:
            assert (tiers == TOPK).sum() == int(n * pattern.sparsity)
            assert (tiers == SPARSE_24).sum() == 0
        if pattern.kind == "block":  # removed blocks keep nothing
            for br, bc, blk in blocks_of(mask, b):
                assert blk.all() if int(tiers[br, bc]) == DENSE else not blk.any()
        else:
            check_tier_pattern(mask, tiers, pattern.topk, b)
        # The tiered weight packs into the hybrid format.
        final = result.pruned_weight(weight)
        packed = sk.HybridWeight.from_dense(final, tiers, pattern.topk, b)
        assert torch.equal(packed.to_dense(), final)
    if result.weight is not None:
        assert result.weight.dtype == weight.dtype and result.weight.shape == weight.shape
        assert (result.weight[~mask] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("method_name", list(METHODS))
def test_method_pattern_invariants(method_name, pattern_name, shape):
    torch.manual_seed(zlib.crc32(f"{method_name} {pattern_name} {shape}".encode()))
    pattern = PATTERNS[pattern_name]
    weight = torch.randn(shape)
    original = weight.clone()
    stats, _ = make_stats(shape[1])
    hessian = stats.hessian.clone()
    result = get_method(method_name).prune(weight, stats, pattern)
    assert isinstance(result, LayerPruning)
    check_invariants(method_name, pattern, weight, result)
    assert torch.equal(weight, original), "the input weight was modified"
    assert torch.equal(stats.hessian, hessian), "the Hessian was modified"


def test_methods_registry_and_protocol():
    assert set(METHODS) == {"magnitude", "wanda", "sparsegpt", "wanda_obs"}
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
    assert not METHODS["magnitude"].needs_activations and not METHODS["magnitude"].needs_hessian
    assert METHODS["wanda"].needs_activations and not METHODS["wanda"].needs_hessian
    assert METHODS["sparsegpt"].needs_hessian
    assert METHODS["wanda_obs"].needs_hessian and METHODS["wanda_obs"].needs_activations
    assert get_method("Wanda-OBS") is METHODS["wanda_obs"]
    assert get_method("sparsegpt", blocksize=32).blocksize == 32


@pytest.mark.parametrize("method_name", ["sparsegpt", "wanda_obs"])
@pytest.mark.parametrize("pattern_name", ["unstructured", "2:4", "three_tier"])
def test_obs_methods_keep_dtype(method_name, pattern_name):
    weight = torch.randn(24, 64).to(torch.bfloat16)
    stats, _ = make_stats(64)
    result = get_method(method_name).prune(weight, stats, PATTERNS[pattern_name])
    assert result.weight.dtype == torch.bfloat16
    assert (result.weight[~result.mask] == 0).all()


def test_sparsegpt_nm_ragged_and_small_blocksize():
    torch.manual_seed(1)
    weight = torch.randn(20, 52)  # 52 = 6 full groups of 8 + a ragged group of 4
    stats, _ = make_stats(52)
    result = get_method("sparsegpt", blocksize=20).prune(weight, stats, "4:8")
    full = result.mask[:, :48].reshape(20, 6, 8).sum(-1)
    assert (full == 4).all()
    assert result.mask[:, 48:].all()  # a ragged group keeps min(n, width) = all 4 (nm_mask rule)
    assert (result.weight[~result.mask] == 0).all()


def test_sparsegpt_dead_columns_zeroed():
    weight = torch.randn(16, 32)
    stats, _ = make_stats(32)
    stats.hessian[3, :] = 0
    stats.hessian[:, 3] = 0
    result = get_method("sparsegpt").prune(weight, stats, "2:4")
    assert (result.weight[:, 3] == 0).all()


# ---------------------------------------------------------------------------------------------
# Explicit tier maps, ranking across matrices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method_name", list(METHODS))
def test_explicit_tier_map_overrides_ranking(method_name):
    torch.manual_seed(2)
    weight = torch.randn(40, 72)
    stats, _ = make_stats(72)
    tiers = torch.tensor([[0, 1, 2, 2, 0], [1, 1, 1, 1, 1], [2, 0, 2, 0, 2]], dtype=torch.int8)
    pattern, policy = tier_settings("three_tier", ranking="layer")
    result = get_method(method_name).prune(weight, stats, pattern, tier_map=tiers)
    assert torch.equal(result.tier_map.cpu(), tiers)
    for br, bc, blk in blocks_of(result.mask, 16):
        expected = {0: blk.numel(), 1: blk.numel() // 2, 2: min(15, blk.numel())}
        assert blk.sum() == expected[int(tiers[br, bc])]
    # Layer ranking: the planner gives every matrix of the layer its map.
    planner = make_planner(pattern, policy)
    assert isinstance(planner, JointRanking)
    planner.prepare(PlanContext(None, get_method(method_name), []))
    layer = {"a": torch.nn.Linear(72, 40), "b": torch.nn.Linear(72, 24)}
    plan = planner.for_layer("model.layers.0", layer, {"a": stats, "b": stats})
    assert set(plan) == {"a", "b"} and plan["b"][0].shape == (2, 5)
    with pytest.raises(ValueError, match="no tiers"):
        get_method(method_name).prune(weight, stats, "2:4", tier_map=tiers)


def test_block_scores_and_joint_ranking():
    scores = torch.arange(48.).reshape(6, 8)
    blocks = block_scores(scores, 4)
    # Block means; the second block-row is ragged (rows 4..5: mean 4.5 * 8 + mean column).
    assert torch.allclose(blocks, torch.tensor([[13.5, 17.5], [37.5, 41.5]]))
    pattern = parse_pattern("block", sparsity=0.5, block_size=4)
    assert rank_blocks(blocks, pattern).tolist() == [[TOPK, TOPK], [DENSE, DENSE]]
    low, high = torch.zeros(2, 2), torch.ones(1, 2)
    maps = rank_blocks_jointly([low, high], parse_pattern("block", sparsity=0.6))
    assert [m.shape for m in maps] == [(2, 2), (1, 2)]
    assert (maps[0] == TOPK).sum() == 3 and (maps[1] == DENSE).all()


def test_within_block_magnitude_selects_by_weight():
    torch.manual_seed(3)
    weight = torch.randn(32, 32)
    stats, _ = make_stats(32)
    by_score = get_method("wanda").prune(weight, stats, PATTERNS["three_tier"])
    by_mag = get_method("wanda").prune(weight, stats, PATTERNS["three_tier_mag"])
    assert torch.equal(by_score.tier_map, by_mag.tier_map)  # same ranking (Wanda block scores)
    assert torch.equal(by_mag.mask, tier_mask(weight.abs(), by_mag.tier_map, 15, 16))


# ---------------------------------------------------------------------------------------------
# Reconstruction error: the OBS update beats plain masking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern_name", ["unstructured", "2:4", "three_tier"])
def test_obs_update_lowers_reconstruction_error(pattern_name):
    torch.manual_seed(4)
    out_f, in_f = 48, 96
    weight = torch.randn(out_f, in_f)
    stats, x = make_stats(in_f, seed=5, tokens=128, samples=4, correlated=True)
    pattern = PATTERNS[pattern_name]
    ref = x @ weight.T

    def error(w):
        return (ref - x @ w.T).norm().item()

    sgpt = get_method("sparsegpt").prune(weight, stats, pattern)
    wanda = get_method("wanda").prune(weight, stats, pattern)
    wobs = get_method("wanda_obs").prune(weight, stats, pattern)
    sgpt_err = error(sgpt.weight)
    assert sgpt_err < error(weight * sgpt.mask)        # same mask, no update
    assert sgpt_err < error(weight * wanda.mask)       # Wanda's mask, no update
    assert torch.equal(wobs.mask, wanda.mask)
    assert error(wobs.weight) < error(weight * wanda.mask)


def test_obs_sweep_without_pruning_is_identity():
    weight = torch.randn(8, 40)
    stats, _ = make_stats(40)
    w, u = prepare_obs(weight, stats.hessian)
    new, mask, _ = obs_sweep(w, u, mask=torch.ones(8, 40, dtype=torch.bool), blocksize=16)
    assert mask.all() and torch.equal(new, weight)


def test_sparsegpt_rejects_indefinite_hessian():
    stats = LinearStats(torch.ones(8), -torch.eye(8), 3)
    with pytest.raises(RuntimeError, match=r"\[8x8\] Hessian.*positive definite.*more samples"):
        get_method("sparsegpt").prune(torch.randn(4, 8), stats, "unstructured")
    stats = LinearStats(torch.ones(8), torch.full((8, 8), float("nan")), 3)
    with pytest.raises(ValueError, match="NaN"):
        get_method("sparsegpt").prune(torch.randn(4, 8), stats, "unstructured")


# ---------------------------------------------------------------------------------------------
# Wanda variant
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_variant_reaches_target(sparsity):
    torch.manual_seed(6)
    weight = torch.randn(64, 256)
    stats, _ = make_stats(256)
    pattern = parse_pattern("unstructured", sparsity=sparsity, use_variant=True)
    result = get_method("wanda").prune(weight, stats, pattern)
    assert abs((~result.mask).float().mean().item() - sparsity) <= 1e-3
    # Per row the pruned entries are a prefix of the ascending scores.
    scores = get_method("wanda").scores(weight, stats)
    assert (scores.masked_fill(result.mask, -1).max(1).values
            <= scores.masked_fill(~result.mask, float("inf")).min(1).values).all()
    obs = get_method("wanda_obs").prune(weight, stats, pattern)
    assert torch.equal(obs.mask, result.mask)


def test_wanda_variant_zero_sparsity():
    assert wanda_variant_mask(torch.rand(4, 8), 0.0).all()


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, match", [
    (("3:2",), {}, "3:2"),
    (("0:4",), {}, "0:4"),
    (("nope",), {}, "nope"),
    (("2:4:8",), {}, "2:4:8"),
    (("unstructured",), dict(sparsity=1.0), "sparsity"),
    (("unstructured",), dict(sparsity=-0.1), "sparsity"),
    (("three_tier",), dict(tier_ratios=(0.3, 0.4, 0.2)), "three fractions"),
    (("three_tier",), dict(topk=0), "topk"),
    (("three_tier",), dict(topk=257), "257"),
    (("three_tier",), dict(block_size=32), "block_size"),
    (("three_tier",), dict(within_block="x"), "within_block"),
    (("three_tier",), dict(ranking="global"), "ranking"),
    (("2:4",), dict(use_variant=True), "use_variant"),
    (("unstructured",), dict(ranking="layer"), "ranking"),
])
def test_parse_pattern_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tier_settings(*args, **kwargs)


def test_parse_pattern_values():
    p = parse_pattern(" 4:8 ")
    assert (p.kind, p.n, p.m, p.uses_tiers) == ("nm", 4, 8, False)
    assert parse_pattern("three-tier") == Pattern("three_tier")
    assert parse_pattern("three_tier").uses_tiers and parse_pattern("block").uses_tiers
    assert abs(parse_pattern("three_tier").nominal_sparsity - 0.41328125) < 1e-9
    assert parse_pattern(p) is p
    with pytest.raises(ValueError, match="kind"):
        Pattern("diagonal")


def test_get_method_errors():
    with pytest.raises(ValueError, match="nope.*magnitude.*wanda.*sparsegpt.*wanda_obs"):
        get_method("nope")
    with pytest.raises(ValueError, match="blocksize"):
        get_method("wanda", blocksize=64)


@pytest.mark.parametrize("method_name", ["magnitude", "sparsegpt"])
def test_variant_only_for_wanda(method_name):
    stats, _ = make_stats(16)
    pattern = parse_pattern("unstructured", use_variant=True)
    with pytest.raises(ValueError, match="use_variant"):
        get_method(method_name).prune(torch.randn(4, 16), stats, pattern)


def test_missing_stats():
    weight = torch.randn(4, 16)
    with pytest.raises(ValueError, match="act_sq_norm"):
        get_method("wanda").prune(weight, None, "2:4")
    with pytest.raises(ValueError, match="hessian"):
        get_method("sparsegpt").prune(weight, LinearStats.empty(16, hessian=False), "2:4")
    with pytest.raises(ValueError, match="act_sq_norm has shape"):
        get_method("wanda").prune(weight, LinearStats.empty(8, hessian=False), "2:4")


# ---------------------------------------------------------------------------------------------
# Byte budgets: loss proxies, row sensitivity, SparseGPT choosing inside the tiers
# ---------------------------------------------------------------------------------------------

def test_loss_proxies():
    torch.manual_seed(0)
    weight = torch.randn(32, 48)
    stats, _ = make_stats(48)
    wanda = get_method("wanda")
    torch.testing.assert_close(wanda.loss_proxy(weight, stats), wanda.scores(weight, stats) ** 2)
    torch.testing.assert_close(get_method("magnitude").loss_proxy(weight), weight ** 2)
    error = weight ** 2 * stats.hessian.diagonal() / 2  # = W^2 * act_sq_norm
    torch.testing.assert_close(get_method("sparsegpt").loss_proxy(weight, stats), error)
    torch.testing.assert_close(error, wanda.loss_proxy(weight, stats))
    obs = get_method("sparsegpt", proxy="obs")
    torch.testing.assert_close(obs.loss_proxy(weight, stats), obs.scores(weight, stats))
    with pytest.raises(ValueError, match="proxy must be one of error, obs"):
        get_method("sparsegpt", proxy="fisher").loss_proxy(weight, stats)


@pytest.mark.parametrize("method_name", ["magnitude", "wanda", "sparsegpt", "wanda_obs"])
def test_row_sensitivity_scales_scores_and_proxies_by_row(method_name):
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    stats, _ = make_stats(32)
    method = get_method(method_name)
    plain_scores, plain_proxy = method.scores(weight, stats), method.loss_proxy(weight, stats)
    row = torch.rand(16) + 0.5
    stats.out_sensitivity = row
    power = 1.0 if method_name == "sparsegpt" else 0.5
    torch.testing.assert_close(method.scores(weight, stats),
                               plain_scores * row.pow(power).unsqueeze(1))
    torch.testing.assert_close(method.loss_proxy(weight, stats),
                               plain_proxy * row.unsqueeze(1))
    stats.out_sensitivity = torch.ones(15)
    with pytest.raises(ValueError, match="out_sensitivity has shape"):
        method.scores(weight, stats)


def test_tier_sweep_on_an_all_2_4_map_is_sparsegpts_2_4_sweep():
    torch.manual_seed(2)
    weight = torch.randn(40, 96)
    stats, _ = make_stats(96, correlated=True)
    w, u = prepare_obs(weight, stats.hessian)
    tiers = torch.full((3, 6), SPARSE_24, dtype=torch.int8)
    by_tiers = obs_sweep(w, u, tier_map=tiers, blocksize=32)
    by_nm = obs_sweep(w, u, nm=(2, 4), blocksize=32)
    assert torch.equal(by_tiers[1], by_nm[1]) and torch.equal(by_tiers[0], by_nm[0])


def test_tier_sweep_chooses_with_the_updated_weights():
    """Chosen during the sweep, the kept weights adapt to the OBS update: the output error is
    lower than with the same tiers' weights chosen up front (summed over seeds)."""
    adaptive_error = fixed_error = 0.0
    changed = False
    for seed in range(4):
        torch.manual_seed(seed)
        weight = torch.randn(48, 64)
        stats, x = make_stats(64, seed=seed, correlated=True)
        w, u = prepare_obs(weight, stats.hessian)
        tiers = torch.tensor([[0, 1, 2, 2], [2, 1, 1, 2], [1, 2, 0, 1]], dtype=torch.int8)
        saliency = obs_saliency(w, u)
        up_front = tier_mask(saliency, tiers, 15, 16)
        fixed, _, _ = obs_sweep(w, u, mask=up_front)
        adaptive, mask, _ = obs_sweep(w, u, tier_map=tiers, topk=15)
        check_tier_pattern(mask, tiers, 15)
        changed |= not torch.equal(mask, up_front)
        adaptive_error += float(((weight - adaptive) @ x.t()).pow(2).sum())
        fixed_error += float(((weight - fixed) @ x.t()).pow(2).sum())
    assert changed and adaptive_error < fixed_error


def test_tier_sweep_row_weight_moves_top_k_slots_to_heavy_rows():
    torch.manual_seed(3)
    weight = torch.randn(16, 16)
    stats, _ = make_stats(16)
    w, u = prepare_obs(weight, stats.hessian)
    tiers = torch.full((1, 1), TOPK, dtype=torch.int8)
    row_weight = torch.ones(16)
    row_weight[:4] = 1e6  # the first 4 rows matter most
    _, plain, _ = obs_sweep(w, u, tier_map=tiers, topk=15)
    _, weighted, _ = obs_sweep(w, u, tier_map=tiers, topk=15, row_weight=row_weight)
    assert int(weighted.sum()) == int(plain.sum()) == 15
    assert int(weighted[:4].sum()) == 15 > int(plain[:4].sum())



def test_budget_pattern_validation_and_description():
    pattern, policy = tier_settings("three_tier", budget=0.6, topk=(64, 15, 15))
    assert policy.topk_choices == (15, 64)
    assert "budget 0.6 (K=15/64" in policy.describe(pattern)
    assert "per matrix" in policy.describe(pattern)
    pattern2, policy2 = tier_settings("three_tier", budget=0.6, allow_topk=False,
                                      budget_dtype=torch.float16)
    assert policy2.describe(pattern2).endswith("dense + 2:4 only, bytes in float16)")
    for kwargs, message in ((dict(budget_dtype=torch.float16), "apply to a byte budget"),
                            (dict(budget=0.6, budget_dtype=torch.int8), "floating-point"),
                            (dict(budget=0.6, topk=()), "topk_choices"),
                            (dict(budget=-1), "budget")):
        with pytest.raises(ValueError, match=message):
            tier_settings("three_tier", **kwargs)
    # A budget's tier maps come from the allocation, never from the method's own ranking.
    assert isinstance(make_planner(pattern, policy), ByteBudget)


@pytest.mark.parametrize("pattern_name", ["unstructured", "2:4", "three_tier", "block_topk"])
@pytest.mark.parametrize("method_name", ["sparsegpt", "wanda_obs"])
def test_obs_update_never_revives_a_zero_weight(method_name, pattern_name):
    """Pruned once, pruned again (a progressive prune): the update keeps every zero zero."""
    torch.manual_seed(4)
    weight = torch.randn(32, 64)
    weight[torch.rand(32, 64) < 0.4] = 0.0  # what an earlier, sparser step left
    stats, _ = make_stats(64, correlated=True)
    result = get_method(method_name).prune(weight, stats, PATTERNS[pattern_name])
    assert not bool(result.weight[weight == 0].any())
    assert not bool(result.mask[weight == 0].any())
