"""Saving a pruned model: a packed checkpoint that plain ``from_pretrained`` loads, written so
that nothing in the target folder is lost or half-written."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safetensors import safe_open

import sparse_kernels as sk
from sparse_kernels.atomic import atomic_file, write_into_folder
from sparse_kernels.experts import unfuse_where_named
from sparse_kernels.rules import DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE

from ..loading import load_model
from ..masks import BitMasks
from ..models import get_weight, named_linears
from .tier_maps import load_tier_maps, save_tier_maps

__all__ = ["PrunedModel", "load_pruned", "unpack_model", "packable_tier_maps", "pack_model",
           "save_pruned", "write_report"]


@dataclass
class PrunedModel:
    """A pruned model ready for more work (fine-tuning, evaluation): dense ``nn.Linear`` weights
    with ``masks`` (True = the format keeps a slot there; :class:`pruning.masks.BitMasks`), and
    the ``tier_maps`` / ``topks`` / ``block_size`` (and, for low-bit values, ``bits`` / ``scales`` / ``group_size``: the
    weights lie on the scales' grid) to pack it again; ``meta`` is what made them (tier-map file
    metadata). Work that moves the weights off their grid (fine-tuning) drops ``bits`` and
    ``scales`` (:meth:`full_precision`)."""

    model: nn.Module
    tokenizer: object
    masks: dict[str, torch.Tensor]
    tier_maps: dict[str, torch.Tensor]
    topks: dict[str, int]
    block_size: int = 16
    meta: dict = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def quantized(self) -> bool:
        return any(b < 16 for b in self.bits.values())

    def full_precision(self) -> None:
        """Pack the weights as they are from now on (16-bit values)."""
        self.bits, self.scales = {}, {}

    def pack(self, model: nn.Module | None = None) -> int:
        """Swap the pruned Linears (of ``model``, default this one's) for
        ``HybridSparseLinear``, in place; returns how many (:func:`pack_model`)."""
        return pack_model(self.model if model is None else model, self.tier_maps, self.topks,
                          self.block_size, bits=self.bits, scales=self.scales,
                          group_size=self.group_size)

    def save_tier_maps(self, path, source_model: str | None = None) -> None:
        save_tier_maps(path, self.tier_maps, block_size=self.block_size, topk=self.topks,
                       tier_ratios=self.meta.get("tier_ratios"), budget=self.meta.get("budget"),
                       method=self.meta.get("method"), source_model=source_model,
                       bits={n: self.bits.get(n, 16) for n in self.tier_maps},
                       group_size=self.group_size)


def unpack_model(model: nn.Module) -> PrunedModel:
    """Swap every ``HybridSparseLinear`` back for an ``nn.Linear`` holding its masked weight (in
    place, one at a time; low-bit values dequantized, in the model's float dtype); returns a
    :class:`PrunedModel` of it (no tokenizer) with the packing's slots as the masks (see
    ``HybridWeight.kept_mask``)."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    model_dtype = floats[0] if floats else torch.get_default_dtype()
    unpacked = PrunedModel(model, None, BitMasks(), {}, {})
    names = [n for n, m in model.named_modules() if isinstance(m, sk.HybridSparseLinear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        packed = getattr(parent, attr)
        weight = packed.hybrid_weight
        dtype = weight.dtype if weight.bits == 16 else (
            packed.bias.dtype if packed.bias is not None else model_dtype)
        linear = nn.Linear(packed.in_features, packed.out_features, packed.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.to_dense())
            if packed.bias is not None:
                linear.bias.copy_(packed.bias)
        unpacked.masks[name] = weight.kept_mask().cpu()
        unpacked.tier_maps[name], unpacked.topks[name] = weight.tier_map.clone(), weight.topk
        unpacked.block_size = weight.block_size
        if weight.bits < 16:
            unpacked.bits[name], unpacked.scales[name] = weight.bits, weight.scales.cpu()
        setattr(parent, attr, linear)
    config = getattr(model, "config", None)
    if names and config is not None and hasattr(config, "quantization_config"):
        packed_config = config.quantization_config
        unpacked.group_size = (packed_config.get("group_size") if isinstance(packed_config, dict)
                               else getattr(packed_config, "group_size", None)) \
            or DEFAULT_GROUP_SIZE
        del config.quantization_config  # dense again: a save writes plain weights
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    return unpacked


def load_pruned(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                device: str | None = None) -> PrunedModel:
    """A folder ``hybrid-prune prune --save`` wrote, packed or dense (zero-filled, with its
    ``tier_maps.safetensors``), as a :class:`PrunedModel` of dense Linears and masks. A dense
    folder's masks are its non-zero weights; a structurally pruned model's (``hybrid-prune
    structured --save``) are all True."""
    model, tokenizer, _ = load_model(str(folder), dtype=dtype, device=device)
    pruned = unpack_model(model)
    pruned.tokenizer = tokenizer
    tier_file = Path(folder).expanduser() / "tier_maps.safetensors"
    if tier_file.is_file():
        with safe_open(str(tier_file), framework="pt") as f:  # experts saved fused: unfuse them
            unfuse_where_named(model, list(f.keys()))
        saved, pruned.meta = load_tier_maps(tier_file, model)
        pruned.block_size = pruned.meta["block_size"]
        for name, tiers in saved.items():
            if name in pruned.masks:
                continue
            # Saved dense (a dense checkpoint, or a Conv1D the kernels do not replace): the zeros
            # are the pruning.
            weight = get_weight(model.get_submodule(name)).detach()
            pruned.masks[name] = (weight != 0).cpu()
            pruned.tier_maps[name] = tiers
            pruned.topks[name] = pruned.meta["topks"][name]
    if not pruned.masks and getattr(model.config, "structured_layers", None):
        # Structurally pruned only: nothing inside the matrices is pruned, every weight trains.
        pruned.masks = BitMasks({n: torch.ones_like(get_weight(m), dtype=torch.bool,
                                                     device="cpu")
                                 for n, m in named_linears(model).items()})
    if not pruned.masks:
        raise ValueError(f"{str(folder)!r} holds no pruned model: no packed modules, no "
                         f"tier_maps.safetensors and no structured sizes (write it with "
                         f"hybrid-prune prune --save or hybrid-prune structured --save)")
    return pruned


def packable_tier_maps(model: nn.Module, tier_maps: dict) -> dict:
    """The tier maps of modules the kernels can replace (``nn.Linear``; GPT-2's ``Conv1D``
    stays dense)."""
    return {n: t for n, t in tier_maps.items()
            if isinstance(model.get_submodule(n), nn.Linear)}


def pack_model(model: nn.Module, tier_maps: dict[str, torch.Tensor], topks: dict[str, int],
               block_size: int = DEFAULT_BLOCK_SIZE, *, bits: dict[str, int] | None = None,
               scales: dict[str, torch.Tensor] | None = None,
               group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Swap the pruned Linears named in ``tier_maps`` for ``HybridSparseLinear`` (K of each in
    ``topks``; low-bit values where ``bits`` says so, on the grid of their ``scales`` or rounded
    to it), in place, one at a time; returns how many. The weights must follow the maps;
    modules the kernels cannot replace (GPT-2's ``Conv1D``) stay as they are."""
    maps = packable_tier_maps(model, tier_maps)
    bits = bits or {}
    sk.sparsify_model(model, maps, topk={n: topks[n] for n in maps}, block_size=block_size,
                      bits={n: bits.get(n, 16) for n in maps}, group_size=group_size,
                      scales=scales)
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


def save_pruned(folder: str | os.PathLike, model: nn.Module, tokenizer, tiers, report: dict, *,
                source_model: str | None = None, dense_copy: bool = False,
                overwrite: bool = False, extra=None) -> dict:
    """Write a pruned model to ``folder``: the packed checkpoint (``config.json`` with the
    packed format's ``quantization_config``, the packed tensors of every tiered Linear, every
    other weight as it is), its tokenizer (when not None), ``tier_maps.safetensors`` and
    ``report.json``.
    ``tiers``: the ``PruneResult`` or :class:`PrunedModel` the weights follow;
    ``dense_copy`` also writes the zero-filled dense model to ``folder/dense``. A prune without
    tier maps (unstructured, N:M other than 2:4) has nothing to pack: the dense model is written.

    The tiered Linears are swapped for ``HybridSparseLinear`` in place (the packing); ``folder``
    follows :func:`sparse_kernels.atomic.write_into_folder` (``overwrite`` to replace files in a
    non-empty folder); ``extra(tmp)`` may write more files beside them. Returns ``report`` with
    ``checkpoint`` sizes added.
    """
    dense_bytes = _dense_checkpoint_bytes(model)
    packed_modules = 0

    def write(tmp: Path) -> None:
        nonlocal packed_modules
        if dense_copy:
            model.save_pretrained(tmp / "dense")
            tokenizer.save_pretrained(tmp / "dense")
        if tiers.tier_maps and not any(isinstance(m, sk.HybridSparseLinear)
                                       for m in model.modules()):
            packed_modules = tiers.pack(model)
        elif tiers.tier_maps:
            packed_modules = sum(isinstance(m, sk.HybridSparseLinear) for m in model.modules())
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if tiers.tier_maps:
            tiers.save_tier_maps(tmp / "tier_maps.safetensors", source_model)
        written = sum(p.stat().st_size for p in tmp.glob("*.safetensors")
                      if p.name != "tier_maps.safetensors")
        report["checkpoint"] = {"bytes": written, "dense_bytes": dense_bytes,
                                "fraction": written / dense_bytes,
                                "packed_modules": packed_modules,
                                "dtype": str(next(model.parameters()).dtype)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        if extra is not None:
            extra(tmp)

    write_into_folder(folder, write, overwrite=overwrite)
    return report


def write_report(folder: str | os.PathLike, report: dict) -> None:
    """Replace ``folder/report.json`` (atomically)."""
    with atomic_file(Path(folder) / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
