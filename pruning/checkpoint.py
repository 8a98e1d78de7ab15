"""Saving a pruned model: a packed checkpoint that plain ``from_pretrained`` loads, written so
that nothing in the target folder is lost or half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import sparse_kernels as sk
from sparse_kernels.atomic import atomic_file, write_into_folder

__all__ = ["packable_tier_maps", "pack_model", "save_pruned", "write_report"]


def packable_tier_maps(model: nn.Module, tier_maps: dict) -> dict:
    """The tier maps of modules the kernels can replace (``nn.Linear``; GPT-2's ``Conv1D``
    stays dense)."""
    return {n: t for n, t in tier_maps.items()
            if isinstance(model.get_submodule(n), nn.Linear)}


def pack_model(model: nn.Module, result) -> int:
    """Swap the pruned Linears of ``result`` (a ``PruneResult``) for ``HybridSparseLinear``, in
    place, one at a time; returns how many. Their weights must still be the pruned ones."""
    maps = packable_tier_maps(model, result.tier_maps)
    sk.sparsify_model(model, maps, topk={n: result.topks[n] for n in maps},
                      block_size=result.pattern.block_size)
    return len(maps)


def _dense_checkpoint_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take unpacked: its state dict, each storage once (tied weights
    are saved once), with every ``HybridSparseLinear`` counted as the dense weight it packs."""
    packed = [m for m in model.modules() if isinstance(m, sk.HybridSparseLinear)]
    skip = {t.data_ptr() for m in packed for t in m.buffers()}
    total = sum(m.out_features * m.in_features * m.dense_vals.element_size() for m in packed)
    seen = {}
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in skip:
            storage = tensor.untyped_storage()
            seen[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return total + sum(seen.values())


def save_pruned(folder: str | os.PathLike, model: nn.Module, tokenizer, result, report: dict, *,
                source_model: str | None = None, dense_copy: bool = False,
                overwrite: bool = False) -> dict:
    """Write a pruned model to ``folder``: the packed checkpoint (``config.json`` with the
    packed format's ``quantization_config``, the packed tensors of every tiered Linear, every
    other weight as it is), its tokenizer, ``tier_maps.safetensors`` and ``report.json``;
    ``dense_copy`` also writes the zero-filled dense model to ``folder/dense``. A prune without
    tier maps (unstructured, N:M other than 2:4) has nothing to pack: the dense model is written.

    The tiered Linears are swapped for ``HybridSparseLinear`` in place (the packing); ``folder``
    follows :func:`sparse_kernels.atomic.write_into_folder` (``overwrite`` to replace files in a
    non-empty folder). Returns ``report`` with ``checkpoint`` sizes added.
    """
    dense_bytes = _dense_checkpoint_bytes(model)
    packed_modules = 0

    def write(tmp: Path) -> None:
        nonlocal packed_modules
        if dense_copy:
            model.save_pretrained(tmp / "dense")
            tokenizer.save_pretrained(tmp / "dense")
        if result.tier_maps and not any(isinstance(m, sk.HybridSparseLinear)
                                        for m in model.modules()):
            packed_modules = pack_model(model, result)
        elif result.tier_maps:
            packed_modules = sum(isinstance(m, sk.HybridSparseLinear) for m in model.modules())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if result.tier_maps:
            result.save_tier_maps(tmp / "tier_maps.safetensors", source_model)
        written = sum(p.stat().st_size for p in tmp.glob("*.safetensors")
                      if p.name != "tier_maps.safetensors")
        report["checkpoint"] = {"bytes": written, "dense_bytes": dense_bytes,
                                "fraction": written / dense_bytes,
                                "packed_modules": packed_modules,
                                "dtype": str(next(model.parameters()).dtype)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))

    write_into_folder(folder, write, overwrite=overwrite)
    return report


def write_report(folder: str | os.PathLike, report: dict) -> None:
    """Replace ``folder/report.json`` (atomically)."""
    with atomic_file(Path(folder) / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
