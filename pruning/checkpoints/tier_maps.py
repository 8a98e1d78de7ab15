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
from sparse_kernels.rules import DEFAULT_GROUP_SIZE, tier_grid

from ..models import get_weight, is_prunable

FORMAT = "sparse_kernels.tier_maps"
FORMAT_VERSION = 2  # 2: the values' bits and group size


def save_tier_maps(path: str | os.PathLike, tier_maps: dict[str, torch.Tensor], *,
                   block_size: int, topk: int | dict[str, int], tier_ratios=None,
                   budget: float | None = None, method: str | None = None,
                   source_model: str | None = None, bits: int | dict[str, int] = 16,
                   group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Write ``{module name: int8 tier map}`` and what made them; a temp file is renamed in.

    topk / bits: K / the values' precision of every module, or ``{module name: value}`` (a byte
    budget chooses them per matrix); the file's metadata holds one number when all are equal
    (:func:`load_tier_maps` expands it). group_size: the preferred group of low-bit modules.
    """
    path = os.fspath(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "block_size": block_size,
            "topk": _compact("topk", topk, tier_maps),
            "tier_ratios": list(tier_ratios) if tier_ratios else None, "budget": budget,
            "method": method, "source_model": source_model,
            "bits": _compact("bits", bits, tier_maps), "group_size": group_size}
    with atomic_file(path) as tmp:
        save_file({name: t.to(torch.int8).contiguous().cpu() for name, t in tier_maps.items()},
                  tmp, metadata={"sparse_kernels": json.dumps(meta)})


def _compact(what: str, value: int | dict[str, int], tier_maps: dict) -> int | dict[str, int]:
    """One number for every module, or ``{module name: number}`` when they differ."""
    if not isinstance(value, dict):
        return int(value)
    missing = sorted(set(tier_maps) - set(value))
    if missing:
        raise ValueError(f"{what} has no {'K' if what == 'topk' else 'bits'} for {missing[:3]}")
    values = {int(value[n]) for n in tier_maps}
    return values.pop() if len(values) == 1 else {n: int(value[n]) for n in tier_maps}


def _expand(stored: int | dict, tier_maps: dict) -> dict[str, int]:
    return dict(stored) if isinstance(stored, dict) else dict.fromkeys(tier_maps, stored)


def load_tier_maps(path: str | os.PathLike, model: nn.Module | None = None):
    """``(tier_maps, metadata)`` from ``save_tier_maps``; checked against ``model`` if given.
    ``metadata["topks"]`` / ``["bits_per_module"]`` are ``{module name: K / bits}`` (what the
    file stores as ``metadata["topk"]`` / ``["bits"]``: one number, or that dict)."""
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
    meta["topks"] = _expand(meta["topk"], tier_maps)
    meta["bits_per_module"] = _expand(meta.get("bits", 16), tier_maps)  # version 1: 16 bits
    meta.setdefault("group_size", DEFAULT_GROUP_SIZE)
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
