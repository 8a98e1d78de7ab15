"""``prune``: the whole pipeline on one model, and ``apply_masks`` for saved masks.

One prune, in order: its arguments become a :class:`~pruning.patterns.Pattern` (each matrix's
sparsity shape) and a :class:`~pruning.planning.TierPolicy` (how blocks get tiers across
matrices, the byte budget), which choose a tier planner (:mod:`pruning.planning.planners`) ->
calibration token ids and, where needed, one pass over the unpruned model (gradient sensitivity,
activations) -> the planner prepares -> layer by layer, :class:`LayerPruner` prunes each Linear
with the planner's tier maps and the method -> the report.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sparse_kernels.experts import ExpertLinears, unfuse_experts
from sparse_kernels.rules import (DEFAULT_GROUP_SIZE, DENSE, SPARSE_24, packed_nbytes,
                                  tier_grid)

from .calibration import calibration_ids
from .checkpoints import pack_model, save_tier_maps
from .masks import BitMasks
from .methods import Method, get_method
from .models import (decoder_layers, get_weight, is_prunable, module_device, named_linears,
                     prunable_linears, set_weight)
from .patterns import Pattern
from .planning import (PlanContext, TierPlanner, TierPolicy, make_planner, tier_settings,
                       uncalibrated_stats)
from .planning.sensitivity import unpruned_stats
from .report import coverage_report, sparsity_report
from .statistics import LinearStats, layerwise
from .statistics.spill import check_spill_folder, layer_turn


@dataclass
class PruneResult:
    """What ``prune`` did: masks (True = kept; a :class:`pruning.masks.BitMasks`, one bit per
    weight, each read as a bool tensor), tier maps and their top-K slot counts (``topks``:
    K per module, which a byte budget with several candidate K chooses per matrix) by module
    name, the report, and the pattern and policy it followed. ``bits``: each tiered module's
    value precision; ``scales``: the group scales of each low-bit module (its weight in the
    model lies on their grid)."""

    masks: dict[str, torch.Tensor]
    tier_maps: dict[str, torch.Tensor]
    report: dict
    method: str
    pattern: Pattern
    topks: dict[str, int] = field(default_factory=dict)
    policy: TierPolicy = field(default_factory=TierPolicy)
    bits: dict[str, int] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.pattern.block_size

    def describe(self) -> str:
        return self.policy.describe(self.pattern)

    @property
    def group_size(self) -> int:
        return self.pattern.group_size

    def pack(self, model: nn.Module) -> int:
        """Swap the pruned Linears of ``model`` (the one pruned) for ``HybridSparseLinear``, in
        place; returns how many (``checkpoints.pack_model``)."""
        return pack_model(model, self.tier_maps, self.topks, self.block_size, bits=self.bits,
                          scales=self.scales, group_size=self.group_size)

    def save_tier_maps(self, path: str | os.PathLike, source_model: str | None = None) -> None:
        fixed_ratios = self.pattern.kind == "three_tier" and self.policy.budget is None
        save_tier_maps(path, self.tier_maps, block_size=self.block_size, topk=self.topks,
                       tier_ratios=self.pattern.tier_ratios if fixed_ratios else None,
                       budget=self.policy.budget, method=self.method, source_model=source_model,
                       bits=self.bits, group_size=self.group_size)


SENSITIVITY = (None, "gradient")


def _resolve_sensitivity(sensitivity, sensitivity_samples, policy: TierPolicy) -> str | None:
    """``"auto"``: the gradient sensitivity where a byte budget is shared between matrices."""
    if sensitivity == "auto":
        sensitivity = "gradient" if policy.budget is not None and policy.ranking != "matrix" \
            else None
    if sensitivity not in SENSITIVITY:
        raise ValueError(f"sensitivity must be 'auto', None or 'gradient' (weight each output "
                         f"row by its squared loss gradient), got {sensitivity!r}")
    if isinstance(sensitivity_samples, bool) or not isinstance(sensitivity_samples, int) \
            or sensitivity_samples < 1:
        raise ValueError(f"sensitivity_samples must be a positive int, got "
                         f"{sensitivity_samples!r}")
    return sensitivity


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
    every = {name: torch.ones(1) for name in named_linears(model)}
    cover = coverage_report(model, every)
    if cover["unpruned_weight_fraction"] > UNPRUNED_WARNING:
        raise ValueError(_uncovered_message(cover) + "; strict=True refuses it")


def _warn_uncovered(cover: dict) -> None:
    if cover["unpruned_weight_fraction"] > UNPRUNED_WARNING:
        warnings.warn(_uncovered_message(cover), stacklevel=3)


def _unpruned_pass(model: nn.Module, ids: torch.Tensor, sensitivity: str | None,
                   activations: bool, samples: int, batch_size: int, device,
                   progress: bool) -> dict[str, LinearStats]:
    """Statistics of the unpruned model (:func:`pruning.planning.sensitivity.unpruned_stats`):
    its gradient sensitivity and / or activations, when the prune needs either."""
    if sensitivity != "gradient" and not activations:
        return {}
    home = module_device(model.get_input_embeddings())
    if device is not None and torch.device(device) != home:
        warnings.warn(f"the whole-model pass over the unpruned model (its gradient sensitivity or "
                      f"statistics) runs where the model is ({home}), not on {device}: slow for "
                      f"a large model kept on the CPU. ranking='matrix' needs no such pass",
                      stacklevel=3)
    return unpruned_stats(model, list(ids[:samples].split(batch_size)),
                          gradients=sensitivity == "gradient", activations=activations,
                          progress=progress)


def _expert_names(model: nn.Module) -> set[str]:
    """Full names of every expert Linear (after ``unfuse_experts``)."""
    return {f"{name}.{kind}.{e}" for name, m in model.named_modules()
            if isinstance(m, ExpertLinears)
            for kind in ("gate_up", "down") for e in range(m.num_experts)}


class LayerPruner:
    """Prunes one decoder layer's Linears in its turn (the ``layerwise`` callback): each takes
    its tier map from the planner (or ranks its own blocks by the pattern), the method decides
    its mask and weight (magnitude instead for an expert that saw fewer than ``min_tokens``
    calibration tokens), and the pruned weight is installed. Collects what the result holds,
    and the seconds each layer spent in the planner (``"allocation"``) and the method
    (``"sweep"``) in ``seconds`` (``layerwise`` adds its phases there too)."""

    def __init__(self, method: Method, pattern: Pattern, policy: TierPolicy,
                 planner: TierPlanner, expert_names: set[str], min_tokens: int, calibrated: bool):
        self.method, self.pattern, self.policy, self.planner = method, pattern, policy, planner
        self.expert_names, self.min_tokens, self.calibrated = expert_names, min_tokens, calibrated
        self.masks, self.tier_maps, self.topks, self.packed = BitMasks(), {}, {}, {}
        self.bits, self.scales = {}, {}
        self.expert_tokens, self.too_few = {}, {}
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, layer_name: str, _layer, linears: dict, stats: dict) -> None:
        started = time.perf_counter()
        plan = self.planner.for_layer(layer_name, linears, stats)
        self.seconds.setdefault("allocation", []).append(time.perf_counter() - started)
        started = time.perf_counter()
        for name, module in linears.items():
            full = f"{layer_name}.{name}"
            weight = get_weight(module).detach()
            tiers, k, bits = plan.get(name, (None, self.pattern.topk, self.pattern.bits))
            own = self.pattern if (k, bits) == (self.pattern.topk, self.pattern.bits) \
                else replace(self.pattern, topk=k, bits=bits)
            used = self.method
            if full in self.expert_names and self.calibrated:
                self.expert_tokens[full] = stats[name].tokens
                if stats[name].tokens < self.min_tokens:  # too few routed tokens to estimate
                    used, self.too_few[full] = get_method("magnitude"), stats[name].tokens
            result = used.prune(weight, stats[name], own,
                                tier_map=None if tiers is None else tiers.to(weight.device))
            new = result.pruned_weight(weight)
            set_weight(module, new)
            self.masks[full] = result.mask.cpu()
            tier_map = result.tier_map if result.tier_map is not None else \
                _implied_tier_map(own, weight.shape)
            if result.scales is not None:
                self.scales[full] = result.scales.cpu()
            if tier_map is not None:
                self.tier_maps[full] = tier_map.to(torch.int8).cpu()
                self.topks[full], self.bits[full] = k, own.bits
                dtype = self.policy.budget_dtype or new.dtype
                self.packed[full] = (packed_nbytes(self.tier_maps[full], *new.shape, dtype, k,
                                                   own.block_size, own.bits,
                                                   own.group_for(new.shape[1])),
                                     new.numel() * torch.empty((), dtype=dtype).element_size())
        self.seconds.setdefault("sweep", []).append(time.perf_counter() - started)

    def report(self, model: nn.Module) -> dict:
        """The sparsity report, expert token counts, coverage and packed bytes."""
        report = sparsity_report(self.masks, self.tier_maps)
        if self.expert_tokens:
            report["expert_tokens"] = self.expert_tokens
        if self.too_few:
            report["magnitude_fallback"] = self.too_few
            shown = ", ".join(f"{n} ({t})" for n, t in list(self.too_few.items())[:6])
            warnings.warn(f"{len(self.too_few)} expert matrices saw fewer than min_tokens="
                          f"{self.min_tokens} calibration tokens and were pruned by magnitude: "
                          f"{shown}{', ...' if len(self.too_few) > 6 else ''} (more calibration "
                          f"samples route more tokens to every expert)", stacklevel=3)
        report["seconds_per_layer"] = {phase: [round(t, 3) for t in times]
                                       for phase, times in self.seconds.items()}
        report["coverage"] = coverage_report(model, self.masks)
        _warn_uncovered(report["coverage"])
        if self.packed:
            for name, (nbytes, dense) in self.packed.items():
                report["per_module"][name]["packed_bytes_fraction"] = nbytes / dense
            total, dense = (sum(v[i] for v in self.packed.values()) for i in (0, 1))
            report["packed_bytes"] = {
                "packed": total, "dense": dense, "fraction": total / dense,
                "dtype": None if self.policy.budget_dtype is None else
                str(self.policy.budget_dtype), "budget": self.policy.budget}
        return report


def prune(model: nn.Module, calibration="embedded", method: str = "wanda",
          pattern: str = "unstructured", sparsity: float = 0.5, *,
          tier_ratios=None, topk: int | tuple[int, ...] | None = None, block_size: int = 16,
          within_block: str = "score", ranking: str = "matrix", use_variant: bool = False,
          budget: float | None = None, budget_dtype: torch.dtype | None = None,
          allow_topk: bool = True, bits: int | tuple[int, ...] = 16,
          group_size: int = DEFAULT_GROUP_SIZE, sensitivity: str | None = "auto",
          sensitivity_samples: int = 8, tokenizer=None, nsamples: int = 128,
          seqlen: int | None = None, seed: int = 0, batch_size: int = 1, device=None,
          previous_tier_maps: dict[str, torch.Tensor] | None = None,
          min_tokens: int = MIN_TOKENS, strict: bool = False,
          offload_dir: str | os.PathLike | None = None, progress: bool = True) -> PruneResult:
    """Prune every Linear of the model's decoder layers in place, one layer at a time.

    calibration: a source ``pruning.calibration`` accepts (needs ``tokenizer``) or token ids
    ``[nsamples, seqlen]`` (then ``nsamples`` / ``seqlen`` are taken from it). method:
    ``magnitude``, ``wanda``, ``sparsegpt`` or ``wanda_obs`` (Wanda's mask + SparseGPT's weight
    update), or a method object with options (``get_method("sparsegpt", proxy="obs")``).
    pattern: ``unstructured``, ``N:M`` (``2:4``, ``4:8``), ``block``, ``block_topk``,
    ``three_tier`` or ``dense`` (nothing pruned).

    bits: the kept values' precision, 16 (as they are), 8 or 4 (symmetric integer codes with one
    fp16 scale per output row per group of ``group_size`` input columns, 64 where 128 does not
    divide a matrix's width): the OBS methods quantize inside their sweep (SparseGPT's joint
    mode; GPTQ with ``pattern="dense"``), the others round to nearest after the mask. Several
    values with a ``budget``: each matrix takes the precision (and K) that loses least for its
    bytes, the loss of rounding estimated from the round-to-nearest error weighted as the
    method's proxy weights a dropped weight.

    three_tier takes either a byte ``budget`` (packed bytes / dense bytes as
    ``HybridWeight.nbytes`` counts them, in ``budget_dtype`` or each weight's dtype): every
    block gets the tier that loses the least of the method's loss proxy for its bytes
    (:mod:`pruning.planning.allocation`; ``allow_topk=False`` for dense + 2:4 only; ``topk``,
    K kept by a top-K block, defaults to 64 and may be several candidates, each matrix taking
    the one its proxy loses least with); or fixed ``tier_ratios`` (dense, 2:4, top-K; default
    0.35/0.45/0.20 with K = 15, the research code's mix).
    ``ranking`` says where blocks compete: ``matrix``, ``row`` (each block-row; fixed ratios
    only), ``layer`` or ``model`` (a budget: each decoder layer gets the share of the bytes an
    allocation over the whole unpruned model gives it, then its matrices share that).

    sensitivity: ``"gradient"`` weights every output row of every score by its squared loss
    gradient in the unpruned model (:mod:`pruning.planning.sensitivity`, one forward + backward
    pass over the first ``sensitivity_samples`` calibration samples), which makes losses comparable
    across matrices and layers; ``"auto"`` (default) does so where a byte budget is shared
    between matrices (ranking ``layer`` or ``model``), None never.

    previous_tier_maps: the tier maps of an earlier prune of this model (a progressive step,
    three_tier only): no block is promoted above its tier there (fixed ratios demote the
    lowest-scoring blocks one tier down, the research code's rule; a budget caps each block),
    and the OBS methods never revive a zero weight.

    seqlen defaults to the model's context, at most 2048. device: where each layer runs for its
    turn. offload_dir: a folder where each pruned layer is written and mapped back from, so that
    a model loaded from safetensors in its own dtype (mapped, not read) is pruned holding one
    layer in memory, not all the pruned ones (keep the folder while the model is used). Masks
    are applied (and OBS-updated weights written); the result holds the masks, the tier maps
    of tiered patterns (and of 2:4, every block 2:4), their K per module and a report
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
    spec, policy = tier_settings(pattern, sparsity=sparsity, tier_ratios=tier_ratios, topk=topk,
                                 block_size=block_size, within_block=within_block,
                                 ranking=ranking, use_variant=use_variant, budget=budget,
                                 budget_dtype=budget_dtype, allow_topk=allow_topk, bits=bits,
                                 group_size=group_size)
    planner = make_planner(spec, policy, previous_tier_maps)
    sensitivity = _resolve_sensitivity(sensitivity, sensitivity_samples, policy)
    meth = get_method(method)
    unfuse_experts(model)
    _check_coverage(model, strict)
    if seqlen is None:
        seqlen = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    calibrated = meth.needs_activations or meth.needs_hessian
    context = PlanContext(model, meth, [], device, progress)
    started = time.perf_counter()
    if calibrated or sensitivity is not None:
        ids = calibration_ids(calibration, tokenizer, nsamples, seqlen, seed)
        context.batches = list(ids.split(batch_size))
        context.unpruned = _unpruned_pass(
            model, ids, sensitivity, planner.wants_unpruned_activations and calibrated,
            sensitivity_samples, batch_size, device, progress)
        if sensitivity == "gradient":
            context.row_weights = {n: s.out_sensitivity for n, s in context.unpruned.items()}
    planner.prepare(context)
    pruner = LayerPruner(meth, spec, policy, planner, _expert_names(model), min_tokens,
                         calibrated)
    # Before the first layer: the unpruned model's pass (sensitivity, model-wide allocation).
    pruner.seconds["whole_model"] = [time.perf_counter() - started]
    if calibrated:
        layerwise(model, context.batches, pruner, needs_hessian=meth.needs_hessian,
                  device=device, progress=progress, sensitivity=context.row_weights,
                  seconds=pruner.seconds, offload_dir=offload_dir)
    else:  # magnitude needs no calibration: prune the weights where they are
        path, layers = decoder_layers(model)
        spill_to = check_spill_folder(offload_dir) if offload_dir is not None else None
        for i, layer in enumerate(layers):
            with layer_turn(layer, spill_to, i):
                linears = prunable_linears(layer)
                pruner(f"{path}.{i}", layer, linears,
                       {n: uncalibrated_stats(f"{path}.{i}.{n}", context.row_weights)
                        for n in linears})
    return PruneResult(pruner.masks, pruner.tier_maps, pruner.report(model), meth.name, spec,
                       pruner.topks, policy, pruner.bits, pruner.scales)


def _implied_tier_map(spec: Pattern, shape) -> torch.Tensor | None:
    """The tier map of a pattern the format packs without one of its own: 2:4 (the format's
    middle tier, every block 2:4) and dense (every block dense: quantization alone)."""
    if spec.kind == "dense":
        return torch.full(tier_grid(*shape, spec.block_size), DENSE, dtype=torch.int8)
    if spec.kind != "nm" or (spec.n, spec.m) != (2, 4):
        return None
    return torch.full(tier_grid(*shape, spec.block_size), SPARSE_24, dtype=torch.int8)


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
