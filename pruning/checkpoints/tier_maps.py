"""Tier maps of a whole model on disk: one safetensors file, JSON metadata, atomic writes."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparse_kernels import HybridSparseLinear
from sparse_kernels.atomic import atomic_file
from sparse_kernels.rules import tier_grid

from ..models import get_weight, is_prunable

FORMAT = "sparse_kernels.tier_maps"
FORMAT_VERSION = 1


def save_tier_maps(path: str | os.PathLike, tier_maps: dict[str, torch.Tensor], *,
                   block_size: int, topk: int | dict[str, int], tier_ratios=None,
                   budget: float | None = None, method: str | None = None,
                   source_model: str | None = None) -> None:
    """Write ``{module name: int8 tier map}`` and what made them; a temp file is renamed in.

    topk: K of every module, or ``{module name: K}`` (a byte budget chooses K per matrix); the
    file's metadata holds one number when all are equal (:func:`load_tier_maps` expands it).
    """
    path = os.fspath(path)
    if isinstance(topk, dict):
        missing = sorted(set(tier_maps) - set(topk))
        if missing:
            raise ValueError(f"topk has no K for {missing[:3]}")
        values = {int(topk[n]) for n in tier_maps}
        topk = values.pop() if len(values) == 1 else {n: int(topk[n]) for n in tier_maps}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "block_size": block_size,
            "topk": topk, "tier_ratios": list(tier_ratios) if tier_ratios else None,
            "budget": budget,
            "method": method, "source_model": source_model}
    with atomic_file(path) as tmp:
        save_file({name: t.to(torch.int8).contiguous().cpu() for name, t in tier_maps.items()},
                  tmp, metadata={"sparse_kernels": json.dumps(meta)})


def load_tier_maps(path: str | os.PathLike, model: nn.Module | None = None):
    """``(tier_maps, metadata)`` from ``save_tier_maps``; checked against ``model`` if given.
    ``metadata["topks"]`` is ``{module name: K}`` (what the file stores as ``metadata["topk"]``:
    one K, or that dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tier-map file at {path!r}")
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("sparse_kernels")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a tier-map file written by save_tier_maps")
        if meta["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {meta['format_version']}; this "
                             f"package reads up to {FORMAT_VERSION}")
        tier_maps = {name: f.get_tensor(name) for name in f.keys()}
    stored = meta["topk"]
    meta["topks"] = dict(stored) if isinstance(stored, dict) else dict.fromkeys(tier_maps, stored)
    if model is not None:
        check_against_model(tier_maps, model, meta["block_size"])
    return tier_maps, meta


def check_against_model(tier_maps: dict[str, torch.Tensor], model: nn.Module,
                        block_size: int) -> None:
    """Raise naming the first module whose tier map does not fit the model."""
    modules = dict(model.named_modules())
    for name, tiers in tier_maps.items():
        module = modules.get(name)
        if isinstance(module, HybridSparseLinear):  # a packed checkpoint's module
            out_f, in_f = module.out_features, module.in_features
        elif module is None or not is_prunable(module):
            raise ValueError(f"tier map for {name!r}, but the model has no Linear by that name")
        else:
            out_f, in_f = get_weight(module).shape
        grid = tier_grid(out_f, in_f, block_size)
        if tuple(tiers.shape) != grid:
            raise ValueError(f"tier map for {name!r} has shape {tuple(tiers.shape)}, but its "
                             f"[{out_f}, {in_f}] weight in {block_size}x{block_size} blocks "
                             f"needs {grid}")
