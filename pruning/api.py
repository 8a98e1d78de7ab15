"""``prune``: the whole pipeline on one model, and ``apply_masks`` for saved masks."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from sparse_kernels import SPARSE_24
from sparse_kernels.rules import tier_grid

from .statistics.capture import layerwise
from .methods import get_method
from .models import decoder_layers, get_weight, is_prunable, prunable_linears, set_weight
from .patterns import Pattern, block_scores, parse_pattern, rank_blocks_jointly
from .report import coverage_report, sparsity_report
from .statistics.stats import LinearStats
from .checkpoints.tier_maps import save_tier_maps


@dataclass
class PruneResult:
    """What ``prune`` did: masks (True = kept), tier maps and their top-K slot counts (``topks``:
    K per module, which a byte budget with several candidate K chooses per matrix) by module
    name, and the report."""

    masks: dict[str, torch.Tensor]
    tier_maps: dict[str, torch.Tensor]
    report: dict
    method: str
    pattern: Pattern
    topks: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.pattern.block_size

    def save_tier_maps(self, path: str | os.PathLike, source_model: str | None = None) -> None:
        spec = self.pattern
        fixed_ratios = spec.kind == "three_tier" and spec.budget is None
        save_tier_maps(path, self.tier_maps, block_size=spec.block_size, topk=self.topks,
                       tier_ratios=spec.tier_ratios if fixed_ratios else None,
                       budget=spec.budget, method=self.method, source_model=source_model)


def _calibration_ids(calibration, tokenizer, nsamples, seqlen, seed) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype.is_floating_point:
            raise ValueError(f"calibration token ids must be an integer tensor [nsamples, seqlen],"
                             f" got {calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    if tokenizer is None:
        raise ValueError(f"calibration source {calibration!r} needs a tokenizer= to turn its text "
                         "into token ids (or pass token ids [nsamples, seqlen] directly)")
    from .calibration import get_calibration

    return get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)


def _block_scores(method, weight: torch.Tensor, stats: LinearStats, block_size: int):
    """Mean importance of each block of one weight, by the method's own scores."""
    return block_scores(method.scores(weight, stats), block_size)


def _joint_tier_maps(scores_by_name: dict[str, torch.Tensor], pattern: Pattern):
    """Tier maps with all the given modules' blocks ranked together (layer / model ranking)."""
    names = list(scores_by_name)
    return dict(zip(names, rank_blocks_jointly([scores_by_name[n] for n in names], pattern)))


def _model_ranked_tier_maps(model, batches, method, pattern, device, progress, row_weights):
    """A first pass on the unpruned model collects every module's block scores."""
    block_scores = {}

    def collect(layer_name, _layer, linears, stats):
        for name, module in linears.items():
            block_scores[f"{layer_name}.{name}"] = _block_scores(
                method, get_weight(module).detach(), stats[name], pattern.block_size).cpu()

    layerwise(model, batches, collect, needs_hessian=method.needs_hessian, device=device,
              progress=progress, desc="scoring layers", sensitivity=row_weights)
    return _joint_tier_maps(block_scores, pattern)


def _named_linears(model) -> dict[str, nn.Module]:
    path, layers = decoder_layers(model)
    return {f"{path}.{i}.{name}": m for i, layer in enumerate(layers)
            for name, m in prunable_linears(layer).items()}


def _budget_candidates(method, linears: dict, stats: dict, spec: Pattern,
                       prefix: str = "", caps: dict | None = None) -> dict:
    """``{name: [MatrixCost per candidate K]}`` of each Linear, by the method's loss proxy
    (``prefix`` + name is the module's full name, for errors); ``caps``: the best tier each
    block may take, by full name (a progressive prune's last tier maps)."""
    from .planning.allocation import matrix_costs

    candidates = {}
    for name, module in linears.items():
        weight = get_weight(module).detach()
        costs = matrix_costs(method.loss_proxy(weight, stats[name]).cpu(), spec, weight.dtype,
                             prefix + name)
        cap = (caps or {}).get(prefix + name)
        candidates[name] = costs if cap is None else \
            [dataclasses.replace(c, best_tier=cap.to(torch.int8).cpu()) for c in costs]
    return candidates


def _demoted_tier_maps(method, layer_name: str, linears: dict, stats: dict, spec: Pattern,
                       previous: dict) -> dict[str, tuple[torch.Tensor, int]]:
    """A progressive step with fixed ratios: each matrix's last tier map, demoted one way."""
    from .patterns import demote_tiers, kept_block_scores

    given = {}
    for name, module in linears.items():
        weight = get_weight(module).detach()
        scores = method.scores(weight, stats[name])
        grid = tier_grid(*weight.shape, spec.block_size)
        last = previous.get(f"{layer_name}.{name}", torch.zeros(grid, dtype=torch.int8))
        given[name] = (demote_tiers(last.cpu(), block_scores(scores, spec.block_size).cpu(),
                                    kept_block_scores(scores, weight, spec.block_size).cpu(),
                                    spec.tier_ratios), spec.topk)
    return given


def _layer_budgets(model, unpruned: dict, method, spec: Pattern,
                   caps: dict | None = None) -> dict[str, float]:
    """Each decoder layer's budget fraction when the whole model shares ``spec.budget``: one
    allocation over every matrix of the unpruned model (``unpruned``: their statistics by full
    name) decides how the bytes split between layers; the matrices of a layer then share its
    bytes when its turn comes, by the method's own proxy on the layer's actual inputs. Methods
    that need the Hessian are represented by Wanda's diagonal proxy here (every layer's Hessian
    at once would not fit a large model)."""
    from .planning.allocation import allocate_all, budget_shares

    proxy_method = get_method("wanda") if method.needs_hessian else method
    linears = _named_linears(model)
    candidates = _budget_candidates(proxy_method, linears,
                                    {n: unpruned.get(n, LinearStats()) for n in linears}, spec,
                                    caps=caps)
    shares = budget_shares(allocate_all(candidates, spec), candidates)
    path = decoder_layers(model)[0]
    spent, dense = {}, {}
    for name, share in shares.items():
        layer = ".".join(name.split(".")[:path.count(".") + 2])  # "<path>.<index>"
        size = candidates[name][0].dense_nbytes
        spent[layer] = spent.get(layer, 0.0) + share * size
        dense[layer] = dense.get(layer, 0) + size
    return {layer: spent[layer] / dense[layer] for layer in spent}


def _budget_allocation(method, layer_name: str, linears: dict, stats: dict, spec: Pattern,
                       budget: float, caps: dict | None) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (tier map, K)}`` of one decoder layer's Linears at ``budget``: each matrix on
    its own (ranking ``matrix``) or all of them sharing it (``layer``, and ``model``, where
    ``budget`` is the layer's share); no block above its cap."""
    from .planning.allocation import allocate_all

    candidates = _budget_candidates(method, linears, stats, spec, layer_name + ".", caps)
    if spec.ranking == "matrix":
        return {n: allocate_all({n: c}, spec, budget)[n] for n, c in candidates.items()}
    return allocate_all(candidates, spec, budget)


def _packed_nbytes(weight: torch.Tensor, tier_map: torch.Tensor, spec: Pattern) -> tuple:
    """``(packed, dense)`` bytes of the pruned weight, measured by packing it."""
    from sparse_kernels import HybridWeight

    dtype = spec.budget_dtype or weight.dtype
    packed = HybridWeight.from_dense(weight.to(dtype), tier_map, spec.topk, spec.block_size)
    return packed.nbytes, packed.dense_nbytes


def _packed_summary(packed: dict[str, tuple], spec: Pattern, report: dict) -> dict:
    """Adds each module's packed fraction to the report; returns the model's totals."""
    for name, (nbytes, dense) in packed.items():
        report["per_module"][name]["packed_bytes_fraction"] = nbytes / dense
    total, dense = (sum(v[i] for v in packed.values()) for i in (0, 1))
    return {"packed": total, "dense": dense, "fraction": total / dense,
            "dtype": None if spec.budget_dtype is None else str(spec.budget_dtype),
            "budget": spec.budget}


SENSITIVITY = (None, "gradient")
# K of a byte budget's top-K blocks: a quarter of the block at 197 of 512 fp16 bytes. Measured on
# the embedded model (benchmarks/NOTES-frontier.md), K = 64 beats 15, 32 and 48, ties 80, and
# beats choosing K per matrix by the proxy.
BUDGET_TOPK = 64


def _check_sensitivity(sensitivity, sensitivity_samples) -> None:
    if sensitivity not in SENSITIVITY:
        raise ValueError(f"sensitivity must be 'auto', None or 'gradient' (weight each output "
                         f"row by its squared loss gradient), got {sensitivity!r}")
    if isinstance(sensitivity_samples, bool) or not isinstance(sensitivity_samples, int) \
            or sensitivity_samples < 1:
        raise ValueError(f"sensitivity_samples must be a positive int, got "
                         f"{sensitivity_samples!r}")


# Calibration tokens an expert must see for its statistics to be used: a Hessian from n tokens
# has rank <= n and Wanda's column norms from n tokens scatter by about 1/sqrt(n) (12 % at 64);
# below that, the weights' magnitude is the better guide.
MIN_TOKENS = 64
UNPRUNED_WARNING = 0.10  # of the decoder layers' weights left out before prune() speaks up


def _uncovered_message(cover: dict) -> str:
    largest = cover["largest_skipped"]
    return (f"{cover['unpruned_weight_fraction']:.1%} of the decoder layers' "
            f"{cover['decoder_weights']:,} weights are in no module pruning can prune; the "
            f"largest: {largest['name']} {tuple(largest['shape'])} ({largest['why']}). The "
            f"sparsity asked for holds over the pruned modules only "
            f"(report['coverage'] lists every parameter left out)")


def _check_coverage(model: nn.Module, strict: bool) -> None:
    """``strict``: refuse, before any work, a model whose prunable modules miss more than
    ``UNPRUNED_WARNING`` of its decoder weights."""
    if not strict:
        return
    every = {f"{path}.{i}.{n}": torch.ones(1) for path, layers in [decoder_layers(model)]
             for i, layer in enumerate(layers) for n in prunable_linears(layer)}
    cover = coverage_report(model, every)
    if cover["unpruned_weight_fraction"] > UNPRUNED_WARNING:
        raise ValueError(_uncovered_message(cover) + "; strict=True refuses it")


def _warn_uncovered(cover: dict) -> None:
    if cover["unpruned_weight_fraction"] > UNPRUNED_WARNING:
        warnings.warn(_uncovered_message(cover), stacklevel=3)


def prune(model: nn.Module, calibration="embedded", method: str = "wanda",
          pattern: str = "unstructured", sparsity: float = 0.5, *,
          tier_ratios=None, topk: int | tuple[int, ...] | None = None, block_size: int = 16,
          within_block: str = "score", ranking: str = "matrix", use_variant: bool = False,
          budget: float | None = None, budget_dtype: torch.dtype | None = None,
          allow_topk: bool = True, sensitivity: str | None = "auto",
          sensitivity_samples: int = 8, tokenizer=None, nsamples: int = 128,
          seqlen: int | None = None, seed: int = 0, batch_size: int = 1, device=None,
          previous_tier_maps: dict[str, torch.Tensor] | None = None,
          min_tokens: int = MIN_TOKENS, strict: bool = False,
          progress: bool = True) -> PruneResult:
    """Prune every Linear of the model's decoder layers in place, one layer at a time.

    calibration: a source ``pruning.calibration`` accepts (needs ``tokenizer``) or token ids
    ``[nsamples, seqlen]`` (then ``nsamples`` / ``seqlen`` are taken from it). method:
    ``magnitude``, ``wanda``, ``sparsegpt`` or ``wanda_obs`` (Wanda's mask + SparseGPT's weight
    update), or a method object with options (``get_method("sparsegpt", proxy="obs")``).
    pattern: ``unstructured``, ``N:M`` (``2:4``, ``4:8``), ``block``, ``block_topk`` or
    ``three_tier``.

    three_tier takes either a byte ``budget`` (packed bytes / dense bytes as
    ``HybridWeight.nbytes`` counts them, in ``budget_dtype`` or each weight's dtype): every
    block gets the tier that loses the least of the method's loss proxy for its bytes
    (:mod:`pruning.planning.allocation`; ``allow_topk=False`` for dense + 2:4 only; ``topk``, K kept by
    a top-K block, defaults to 64 and may be several candidates, each matrix taking the one its
    proxy loses least with); or fixed ``tier_ratios`` (dense, 2:4, top-K; default
    0.35/0.45/0.20 with K = 15, the research code's mix).
    ``ranking`` says where blocks compete: ``matrix``, ``row`` (each block-row; fixed ratios
    only), ``layer`` or ``model`` (a budget: each decoder layer gets the share of the bytes an
    allocation over the whole unpruned model gives it, then its matrices share that).

    sensitivity: ``"gradient"`` weights every output row of every score by its squared loss
    gradient in the unpruned model (:mod:`pruning.planning.sensitivity`, one forward + backward pass
    over the first ``sensitivity_samples`` calibration samples), which makes losses comparable
    across matrices and layers; ``"auto"`` (default) does so where a byte budget is shared
    between matrices (ranking ``layer`` or ``model``), None never.

    previous_tier_maps: the tier maps of an earlier prune of this model (a progressive step,
    three_tier only): no block is promoted above its tier there (fixed ratios demote the
    lowest-scoring blocks one tier down, the research code's rule; a budget caps each block),
    and the OBS methods never revive a zero weight.

    seqlen defaults to the model's context, at most 2048. device: where each layer runs for its
    turn. Masks are applied (and OBS-updated weights written); the result holds the masks, the
    tier maps of tiered patterns (and of 2:4, every block 2:4), their K per module and a report
    (sparsity, and where there are tier maps the measured packed bytes; ``coverage``: what the
    pruned modules hold of all decoder-layer weights, and each parameter left out with why). When
    more than ``UNPRUNED_WARNING`` of the decoder layers' weights (2-D and up) were not pruned
    (e.g. a mixture-of-experts model's fused experts), a warning names the largest one left
    out; ``strict=True`` raises instead, before anything is pruned.

    Mixture-of-experts layers whose experts are fused 3-D parameters are swapped, in place, for
    :class:`sparse_kernels.experts.ExpertLinears` (the same computation with one Linear per
    expert, weights shared, state dict in the fused layout), so every expert is pruned as its
    own matrix from the calibration tokens the router sends it. A Linear that saw fewer than
    ``min_tokens`` calibration tokens (a rarely chosen expert) is pruned by magnitude instead,
    with a warning naming it; ``report["expert_tokens"]`` gives every expert's count.
    """
    if tier_ratios is not None and budget is not None:
        raise ValueError("give three_tier either a byte budget or tier_ratios, not both")
    choices = None
    if topk is None:
        topk = BUDGET_TOPK if budget is not None else 15
    if isinstance(topk, (tuple, list)):
        if budget is None:
            raise ValueError(f"several K (topk={tuple(topk)}) are chosen between per matrix by "
                             f"a byte budget: pass budget= too, or one K")
        choices, topk = tuple(topk), min(topk) if topk else 15
    spec = parse_pattern(pattern, sparsity=sparsity,
                         tier_ratios=(0.35, 0.45, 0.20) if tier_ratios is None else tier_ratios,
                         topk=topk, block_size=block_size, within_block=within_block,
                         ranking=ranking, use_variant=use_variant, budget=budget,
                         budget_dtype=budget_dtype, allow_topk=allow_topk, topk_choices=choices)
    if previous_tier_maps is not None and spec.kind != "three_tier":
        raise ValueError(f"previous_tier_maps (a progressive step) applies to three_tier, got "
                         f"pattern {spec.name!r}")
    if previous_tier_maps is not None and spec.budget is None and spec.ranking != "matrix":
        raise ValueError("a progressive step with fixed ratios demotes per matrix "
                         "(ranking='matrix')")
    if sensitivity == "auto":
        sensitivity = "gradient" if spec.budget is not None and spec.ranking != "matrix" \
            else None
    _check_sensitivity(sensitivity, sensitivity_samples)
    meth = get_method(method)
    from sparse_kernels.experts import ExpertLinears, unfuse_experts

    unfuse_experts(model)
    expert_names = {f"{name}.{kind}.{e}" for name, m in model.named_modules()
                    if isinstance(m, ExpertLinears)
                    for kind in ("gate_up", "down") for e in range(m.num_experts)}
    _check_coverage(model, strict)
    if seqlen is None:
        seqlen = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    budgeted = spec.budget is not None
    model_ranked = spec.uses_tiers and spec.ranking == "model"
    calibrated = meth.needs_activations or meth.needs_hessian

    batches, row_weights = [], None
    fixed = None  # tier maps of a model-wide ranking, by full module name
    layer_budgets = {}  # a model-wide budget: each decoder layer's share of it
    if calibrated or sensitivity is not None:
        ids = _calibration_ids(calibration, tokenizer, nsamples, seqlen, seed)
        batches = list(ids.split(batch_size))
        unpruned = {}
        dense_activations = model_ranked and budgeted and calibrated
        if sensitivity == "gradient" or dense_activations:
            from .models import module_device
            from .planning.sensitivity import unpruned_stats

            home = module_device(model.get_input_embeddings())
            if device is not None and torch.device(device) != home:
                warnings.warn(f"the whole-model pass over the unpruned model (its gradient "
                              f"sensitivity or statistics) runs where the model is ({home}), "
                              f"not on {device}: slow for a large model kept on the CPU. "
                              f"ranking='matrix' needs no such pass", stacklevel=2)

            unpruned = unpruned_stats(model, list(ids[:sensitivity_samples].split(batch_size)),
                                      gradients=sensitivity == "gradient",
                                      activations=dense_activations, progress=progress)
        if sensitivity == "gradient":
            row_weights = {n: s.out_sensitivity for n, s in unpruned.items()}
    if model_ranked and budgeted:
        layer_budgets = _layer_budgets(model, unpruned if batches else {}, meth, spec,
                                       previous_tier_maps)
    elif previous_tier_maps is not None:
        pass  # each matrix's last map, demoted when its layer's turn comes
    elif model_ranked and calibrated:
        fixed = _model_ranked_tier_maps(model, batches, meth, spec, device, progress,
                                        row_weights)
    elif model_ranked:
        fixed = _joint_tier_maps({n: _block_scores(meth, get_weight(m).detach(),
                                                   _stats_without_calibration(n, row_weights),
                                                   spec.block_size)
                                  for n, m in _named_linears(model).items()}, spec)

    masks, tier_maps, topks, packed = {}, {}, {}, {}
    expert_tokens, too_few = {}, {}

    def process(layer_name, _layer, linears, stats):
        given = {}  # {name: (tier map, K)} decided for the whole layer
        if budgeted:
            given = _budget_allocation(meth, layer_name, linears, stats, spec,
                                       layer_budgets.get(layer_name, spec.budget),
                                       previous_tier_maps)
        elif previous_tier_maps is not None:
            given = _demoted_tier_maps(meth, layer_name, linears, stats, spec,
                                       previous_tier_maps)
        elif fixed is not None:
            prefix = layer_name + "."
            given = {n[len(prefix):]: (t, spec.topk) for n, t in fixed.items()
                     if n.startswith(prefix)}
        elif spec.uses_tiers and spec.ranking == "layer":
            scores = {n: _block_scores(meth, get_weight(m).detach(), stats[n], spec.block_size)
                      for n, m in linears.items()}
            given = {n: (t, spec.topk) for n, t in _joint_tier_maps(scores, spec).items()}
        for name, module in linears.items():
            full = f"{layer_name}.{name}"
            weight = get_weight(module).detach()
            tiers, k = given.get(name, (None, spec.topk))
            own = spec if k == spec.topk else dataclasses.replace(spec, topk=k)
            used = meth
            if full in expert_names and calibrated:
                expert_tokens[full] = stats[name].tokens
                if stats[name].tokens < min_tokens:  # too few routed tokens to estimate from
                    used, too_few[full] = get_method("magnitude"), stats[name].tokens
            result = used.prune(weight, stats[name], own,
                                tier_map=None if tiers is None else tiers.to(weight.device))
            new = result.pruned_weight(weight)
            set_weight(module, new)
            masks[full] = result.mask.cpu()
            tier_map = result.tier_map if result.tier_map is not None else \
                _all_24_tier_map(spec, weight.shape)
            if tier_map is not None:
                tier_maps[full] = tier_map.to(torch.int8).cpu()
                topks[full] = k
                packed[full] = _packed_nbytes(new, tier_maps[full], own)

    if calibrated:
        layerwise(model, batches, process, needs_hessian=meth.needs_hessian, device=device,
                  progress=progress, sensitivity=row_weights)
    else:  # magnitude needs no calibration: prune the weights where they are
        path, layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            linears = prunable_linears(layer)
            process(f"{path}.{i}", layer, linears,
                    {n: _stats_without_calibration(f"{path}.{i}.{n}", row_weights)
                     for n in linears})
    report = sparsity_report(masks, tier_maps)
    if expert_tokens:
        report["expert_tokens"] = expert_tokens
    if too_few:
        report["magnitude_fallback"] = too_few
        shown = ", ".join(f"{n} ({t})" for n, t in list(too_few.items())[:6])
        warnings.warn(f"{len(too_few)} expert matrices saw fewer than min_tokens={min_tokens} "
                      f"calibration tokens and were pruned by magnitude: {shown}"
                      f"{', ...' if len(too_few) > 6 else ''} (more calibration samples route "
                      f"more tokens to every expert)", stacklevel=2)
    report["coverage"] = coverage_report(model, masks)
    _warn_uncovered(report["coverage"])
    if packed:
        report["packed_bytes"] = _packed_summary(packed, spec, report)
    return PruneResult(masks, tier_maps, report, meth.name, spec, topks)


def _all_24_tier_map(spec: Pattern, shape) -> torch.Tensor | None:
    """2:4 is the format's middle tier: a 2:4 prune packs with every block 2:4."""
    if spec.kind != "nm" or (spec.n, spec.m) != (2, 4):
        return None
    return torch.full(tier_grid(*shape, spec.block_size), SPARSE_24, dtype=torch.int8)


def _stats_without_calibration(name: str, row_weights: dict | None) -> LinearStats:
    """Magnitude's statistics: none, or the row sensitivity of a gradient pass."""
    return LinearStats(out_sensitivity=None if row_weights is None else row_weights[name])


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the weights outside ``masks`` (bool, True = kept, ``[out, in]`` by module name)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not is_prunable(module):
            raise KeyError(f"mask for {name!r}, but the model has no Linear by that name")
        weight = get_weight(module)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, its weight is "
                             f"{tuple(weight.shape)}")
    for name, mask in masks.items():
        weight = get_weight(modules[name]).detach()
        set_weight(modules[name], weight.masked_fill(~mask.to(weight.device, torch.bool), 0))
    return model
