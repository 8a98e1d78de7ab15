"""``prune``: the whole pipeline on one model, and ``apply_masks`` for saved masks."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .capture import layerwise
from .methods import get_method
from .models import decoder_layers, get_weight, is_prunable, prunable_linears, set_weight
from .patterns import Pattern, block_scores, parse_pattern, rank_blocks_jointly
from .report import sparsity_report
from .stats import LinearStats
from .tier_io import save_tier_maps


@dataclass
class PruneResult:
    """What ``prune`` did: masks (True = kept) and tier maps by module name, and the report."""

    masks: dict[str, torch.Tensor]
    tier_maps: dict[str, torch.Tensor]
    report: dict
    method: str
    pattern: Pattern

    def save_tier_maps(self, path: str | os.PathLike, source_model: str | None = None) -> None:
        save_tier_maps(path, self.tier_maps, block_size=self.pattern.block_size,
                       topk=self.pattern.topk, tier_ratios=self.pattern.tier_ratios,
                       method=self.method, source_model=source_model)


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


def _model_ranked_tier_maps(model, batches, method, pattern, device, progress):
    """A first pass on the unpruned model collects every module's block scores."""
    block_scores = {}

    def collect(layer_name, _layer, linears, stats):
        for name, module in linears.items():
            block_scores[f"{layer_name}.{name}"] = _block_scores(
                method, get_weight(module).detach(), stats[name], pattern.block_size).cpu()

    layerwise(model, batches, collect, needs_hessian=method.needs_hessian, device=device,
              progress=progress, desc="scoring layers")
    return _joint_tier_maps(block_scores, pattern)


def prune(model: nn.Module, calibration="embedded", method: str = "wanda",
          pattern: str = "unstructured", sparsity: float = 0.5, *,
          tier_ratios=(0.35, 0.45, 0.20), topk: int = 15, block_size: int = 16,
          within_block: str = "score", ranking: str = "matrix", use_variant: bool = False,
          tokenizer=None, nsamples: int = 128, seqlen: int | None = None, seed: int = 0,
          batch_size: int = 1, device=None, progress: bool = True) -> PruneResult:
    """Prune every Linear of the model's decoder layers in place, one layer at a time.

    calibration: a source ``pruning.calibration`` accepts (needs ``tokenizer``) or token ids
    ``[nsamples, seqlen]`` (then ``nsamples`` / ``seqlen`` are taken from it). method:
    ``magnitude``, ``wanda``, ``sparsegpt`` or ``wanda_obs`` (Wanda's mask + SparseGPT's weight
    update). pattern: ``unstructured``, ``N:M`` (``2:4``, ``4:8``), ``block``, ``block_topk``
    or ``three_tier``; tiered patterns rank blocks per ``ranking``: ``matrix``, ``row`` (each
    block-row), ``layer`` or ``model``. seqlen defaults to the model's context, at most 2048. device: where each
    layer runs for its turn. Masks are applied (and OBS-updated weights written); the result
    holds the masks, the tier maps of tiered patterns and a sparsity report.
    """
    spec = parse_pattern(pattern, sparsity=sparsity, tier_ratios=tier_ratios, topk=topk,
                         block_size=block_size, within_block=within_block, ranking=ranking,
                         use_variant=use_variant)
    meth = get_method(method)
    if seqlen is None:
        seqlen = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    masks, tier_maps = {}, {}

    fixed = None  # tier maps of model-wide ranking, by full module name

    def process(layer_name, _layer, linears, stats):
        if fixed is not None:
            prefix = layer_name + "."
            given = {n[len(prefix):]: t for n, t in fixed.items() if n.startswith(prefix)}
        elif spec.uses_tiers and spec.ranking == "layer":
            given = _joint_tier_maps({n: _block_scores(meth, get_weight(m).detach(), stats[n],
                                                       spec.block_size)
                                      for n, m in linears.items()}, spec)
        else:
            given = {}
        for name, module in linears.items():
            weight = get_weight(module).detach()
            tiers = given.get(name)
            result = meth.prune(weight, stats[name], spec,
                                tier_map=None if tiers is None else tiers.to(weight.device))
            set_weight(module, result.pruned_weight(weight))
            masks[f"{layer_name}.{name}"] = result.mask.cpu()
            if result.tier_map is not None:
                tier_maps[f"{layer_name}.{name}"] = result.tier_map.to(torch.int8).cpu()

    model_ranked = spec.uses_tiers and spec.ranking == "model"
    if meth.needs_activations or meth.needs_hessian:
        ids = _calibration_ids(calibration, tokenizer, nsamples, seqlen, seed)
        batches = list(ids.split(batch_size))
        if model_ranked:
            fixed = _model_ranked_tier_maps(model, batches, meth, spec, device, progress)
        layerwise(model, batches, process, needs_hessian=meth.needs_hessian, device=device,
                  progress=progress)
    else:  # magnitude needs no calibration: prune the weights where they are
        path, layers = decoder_layers(model)
        named = [(f"{path}.{i}", layer, prunable_linears(layer)) for i, layer in enumerate(layers)]
        if model_ranked:
            fixed = _joint_tier_maps({f"{ln}.{n}": _block_scores(meth, get_weight(m).detach(),
                                                                 LinearStats(), spec.block_size)
                                      for ln, _, linears in named for n, m in linears.items()},
                                     spec)
        for layer_name, layer, linears in named:
            process(layer_name, layer, linears, {n: LinearStats() for n in linears})
    return PruneResult(masks, tier_maps, sparsity_report(masks, tier_maps), method, spec)


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
