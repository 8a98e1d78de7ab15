"""``HybridWeight``: the packed three-tier format the kernels consume.

A weight ``W [out, in]`` (rows = output features, columns = input features) is cut into
``B x B`` blocks, ``B`` in ``rules.BLOCK_SIZES`` (4, 8, 12, 16); edge blocks are zero-padded to
``B x B``. Its tier map ``[ceil(out/B), ceil(in/B)]`` (int8) gives each block a tier (the codes,
defaults and byte costs live in ``rules.py``):

====  =======  ===============================================================
code  tier     kept
====  =======  ===============================================================
0     dense    all ``B*B`` values
1     2:4      at most 2 non-zeros in each aligned group of 4 input columns of a row
2     top-K    at most ``K`` non-zeros anywhere in the block
====  =======  ===============================================================

Layout contract (every tensor contiguous; ``n_t`` = number of blocks of tier ``t``):

* per tier, a CSR index over block-rows: ``<tier>_rowptr`` int32 ``[nbr + 1]`` and
  ``<tier>_cols`` int32 ``[n_t]``, the block columns, ascending within a block-row. The value
  tensors below list the blocks in the same order.
* ``dense_vals`` ``[n_dense, B, B]``, the block row-major, in the weight's dtype.
* ``s24_vals`` ``[n_24, B, B/2]`` and ``s24_meta`` int16 ``[n_24, B]``: the kept half of each
  row and the 2-bit positions; slot ``j`` of a row is column ``4*(j//2) + ((meta >> 2j) & 3)``
  of the block (see ``reference.compress_24``).
* ``topk_vals`` ``[n_topk, K]`` and ``topk_pos`` uint8 ``[n_topk, K]``: values and positions
  ``row * B + col`` inside the block, ascending. A block with fewer than K non-zeros pads with
  zero values at unused positions (possibly in the zero padding of an edge block).
* ``tier_map`` int8 ``[nbr, nbc]`` is kept beside them for reports.

Low-bit values (``rules.py``, ``quant.py``): the three value tensors hold int8 codes (same
shapes), or int4 codes two per byte, uint8 with the last dimension halved (rounded up): dense
``[n_dense, B, B/2]``, 2:4 ``[n_24, B, B/4]``, top-K ``[n_topk, ceil(K/2)]``; beside them
``scales`` fp16 ``[out, ceil(in / G)]`` and the group size ``G``. The weight is the codes times
their row's scale of their column's group.

Bytes of an fp16 16x16 block at the ideal: dense 512, 2:4 256 + 32, top-K(15) 30 + 15; int4:
dense 128, 2:4 64 + 32, top-K(15) 8 + 15.
"""
from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import _ops
from .atomic import atomic_file
from .decode_layout import DecodeLayoutCache
from .quant import expand_scales, group_scales, pack_int4, quantize
from .rules import (BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE, DEFAULT_TOPK, DENSE,
                    QMAX, SCALE_DTYPE, SPARSE_24, TIER_NAMES, TOPK, check_bits, check_block_size,
                    check_topk, group_size_for, tier_grid)

# Meta of an all-zero 2:4 block row: every group of 4 keeps columns 0 and 1 (nibble 0b0100).
ZERO_BLOCK_META = {b: int("4" * (b // 4), 16) for b in BLOCK_SIZES}
# 2: low-bit values (scales, group size); files of version 1 (float values only) still load.
FORMAT_VERSION = 2
FLOAT_VALUES = (torch.float32, torch.float16, torch.bfloat16)
# The stored dtype of low-bit codes, by bits.
CODE_DTYPES = {8: torch.int8, 4: torch.uint8}


def value_bits(dtype: torch.dtype) -> int:
    """16 for float values, 8 for int8 codes, 4 for packed int4 codes (uint8)."""
    return {torch.int8: 8, torch.uint8: 4}.get(dtype, 16)


# The packed tensors' names, in the argument order of the hybrid_linear op (and of PackedArgs /
# PackedView in csrc/).
PACKED_FIELDS = ("dense_rowptr", "dense_cols", "dense_vals",
                 "s24_rowptr", "s24_cols", "s24_vals", "s24_meta",
                 "topk_rowptr", "topk_cols", "topk_vals", "topk_pos")


class PackedTensors(NamedTuple("PackedTuple", [(name, torch.Tensor) for name in PACKED_FIELDS])):
    """A packed weight's tensors by name (``PACKED_FIELDS``). Layout: the module docstring."""

    __slots__ = ()

    @property
    def topk(self) -> int:
        return self.topk_vals.shape[1]

    @property
    def block_size(self) -> int:
        return self.dense_vals.shape[1]



def check_tier_map(tier_map: torch.Tensor, out_features: int, in_features: int,
                   block_size: int) -> torch.Tensor:
    """Validate a tier map for a weight shape and return it as int8 on the CPU."""
    grid = tier_grid(out_features, in_features, block_size)
    if not isinstance(tier_map, torch.Tensor) or tier_map.dtype.is_floating_point \
            or tier_map.dtype.is_complex or tier_map.dtype == torch.bool:
        raise TypeError(f"tier_map must be an integer tensor (int8 codes 0=dense, 1=2:4, "
                        f"2=top-K), got {getattr(tier_map, 'dtype', type(tier_map))}")
    if tuple(tier_map.shape) != grid:
        raise ValueError(f"tier_map has shape {tuple(tier_map.shape)}, but a "
                         f"[{out_features}, {in_features}] weight in {block_size}x{block_size} "
                         f"blocks needs {grid}")
    bad = (tier_map < 0) | (tier_map > 2)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"tier_map[{r}, {c}] = {int(tier_map[r, c])}: tier codes must be "
                         f"0 (dense), 1 (2:4) or 2 (top-K)")
    return tier_map.to(device="cpu", dtype=torch.int8).contiguous()


def _csr(is_tier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers, block columns and flat block ids of the blocks where ``is_tier``."""
    counts = is_tier.sum(1, dtype=torch.int32)
    rowptr = torch.zeros(is_tier.shape[0] + 1, dtype=torch.int32, device=is_tier.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    flat = is_tier.flatten().nonzero().flatten()
    return rowptr, (flat % is_tier.shape[1]).to(torch.int32), flat


def _check_24_pattern(blocks: torch.Tensor, ids: torch.Tensor, nbc: int, b: int) -> None:
    groups = (blocks[ids] != 0).reshape(len(ids), b, b // 4, 4).sum(-1)
    bad = groups > 2
    if bad.any():
        i, row, g = (int(v) for v in bad.nonzero()[0])
        br, bc = divmod(int(ids[i]), nbc)
        raise ValueError(
            f"block ({br}, {bc}) is tier 2:4 but row {br * b + row} has {int(groups[i, row, g])} "
            f"non-zeros in input columns {bc * b + 4 * g}..{bc * b + 4 * g + 3} (2:4 keeps at "
            f"most 2 of every 4); mask the weight first (pruning.apply_tier_map)")


def _check_topk_pattern(blocks: torch.Tensor, ids: torch.Tensor, nbc: int, k: int) -> None:
    counts = (blocks[ids] != 0).flatten(1).sum(-1)
    bad = counts > k
    if bad.any():
        i = int(bad.nonzero()[0])
        br, bc = divmod(int(ids[i]), nbc)
        raise ValueError(f"block ({br}, {bc}) is tier top-K but has {int(counts[i])} non-zeros "
                         f"(K = {k}); mask the weight first (pruning.apply_tier_map)")


def _checked_blocks(weight: torch.Tensor, tier_map: torch.Tensor, topk: int, block_size: int):
    """``(tier map on the weight's device, the weight as [n_blocks, B, B] zero-padded blocks)``
    after checking the weight follows the map (``ValueError`` naming the first bad block)."""
    _ops.check_2d("weight", weight)
    _ops.check_float("weight", weight)
    check_block_size(block_size)
    check_topk(topk, block_size)
    out_f, in_f = weight.shape
    tiers = check_tier_map(tier_map, out_f, in_f, block_size).to(weight.device)
    nbr, nbc = tiers.shape
    b = block_size
    padded = torch.nn.functional.pad(weight.detach(), (0, nbc * b - in_f, 0, nbr * b - out_f))
    blocks = padded.reshape(nbr, b, nbc, b).permute(0, 2, 1, 3).reshape(nbr * nbc, b, b)
    flat = tiers.flatten()
    _check_24_pattern(blocks, (flat == SPARSE_24).nonzero().flatten(), nbc, b)
    _check_topk_pattern(blocks, (flat == TOPK).nonzero().flatten(), nbc, topk)
    return tiers, blocks


def check_packable(weight: torch.Tensor, tier_map: torch.Tensor, topk: int = DEFAULT_TOPK,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Raise ``ValueError`` (naming the block) unless ``HybridWeight.from_dense`` would accept
    ``weight`` with ``tier_map``; packs nothing."""
    _checked_blocks(weight, tier_map, topk, block_size)


def _codes(weight: torch.Tensor, bits: int, group_size: int, block_size: int,
           scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, codes as fp32 [out, in])`` of a weight packed with low-bit values: its own
    group scales, or the ``scales`` given with a check that the weight lies on their grid (a
    bf16 / fp16 rounding of ``code * scale`` is within a quarter of a step of it)."""
    if group_size < block_size or group_size % block_size:
        raise ValueError(f"group_size must be a positive multiple of the block size "
                         f"{block_size}, got {group_size}")
    shape = (weight.shape[0], -(-weight.shape[1] // group_size))
    if scales is None:
        scales = group_scales(weight, bits, group_size)
        return scales, quantize(weight, scales, bits, group_size).float()
    if tuple(scales.shape) != shape or not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales must be finite, [out, ceil(in / group_size)] = {list(shape)}, "
                         f"got {tuple(scales.shape)}")
    scales = scales.to(device=weight.device, dtype=SCALE_DTYPE)
    codes = quantize(weight, scales, bits, group_size).float()
    step = expand_scales(scales, group_size, weight.shape[1])
    off = (weight.float() - codes * step).abs() > 0.25 * step
    off &= weight != 0
    if bool(off.any()):
        r, c = (int(i) for i in off.nonzero()[0])
        raise ValueError(f"weight[{r}, {c}] = {float(weight[r, c])} is not on its int{bits} grid "
                         f"(scale {float(step[r, c])}); round it there first "
                         f"(sparse_kernels.quant.round_to_grid), or pass scales=None")
    return scales, codes


def _store_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 codes -> what the format stores: int8, or int4 two per byte (uint8)."""
    codes = values.to(torch.int8)
    return codes if bits == 8 else pack_int4(codes)


def _pack_topk(blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, B*B] blocks with <= k non-zeros -> values [n, k], positions uint8 [n, k] ascending."""
    nonzero = (blocks != 0).to(torch.int8)
    pos = torch.sort(nonzero, dim=1, descending=True, stable=True).indices[:, :k]
    pos = torch.sort(pos, dim=1).values
    return torch.gather(blocks, 1, pos).contiguous(), pos.to(torch.uint8)


class CorruptWeightError(ValueError):
    """Packed tensors that break the layout contract (a corrupt or crafted file)."""


_INDEX_DTYPES = {"rowptr": torch.int32, "cols": torch.int32, "s24_meta": torch.int16,
                 "topk_pos": torch.uint8, "tier_map": torch.int8}


def _first_bad(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def validate_packed(tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                    block_size: int, topk: int, *, group_size: int = 0,
                    where: str = "HybridWeight") -> None:
    """Check packed tensors against the layout contract in O(n), before any kernel reads them.

    ``tensors``: ``tier_map`` and every name of ``PACKED_FIELDS``. Checked: shapes and dtypes
    consistent with ``out_features`` / ``in_features`` / ``block_size`` / ``topk``; row pointers
    starting at 0, non-decreasing and ending at the tier's block count; block columns in range
    and strictly increasing within a block-row; every block in exactly one tier, the one the
    tier map gives it; top-K positions below ``B*B`` and strictly increasing within a block;
    2:4 metadata selecting two distinct ascending columns of every group of 4; low-bit values
    (:func:`_check_codes`): their scales and ``group_size`` and codes in range. Raises
    :class:`CorruptWeightError` naming ``where``, the tensor and the first bad entry.
    """
    def fail(name, message):  # "s24_cols[3] = ...", "s24_cols has shape ..."
        sep = "" if message.startswith("[") else " "
        raise CorruptWeightError(f"{where}: {name}{sep}{message}")

    b = block_size
    if block_size not in BLOCK_SIZES:
        fail("block_size", f"is {block_size}; it must be one of {BLOCK_SIZES}")
    if not (isinstance(topk, int) and 1 <= topk <= b * b):
        fail("topk", f"is {topk!r}; it must be in 1..{b * b}")
    if not (isinstance(out_features, int) and isinstance(in_features, int)
            and out_features > 0 and in_features > 0):
        fail("shape", f"[{out_features}, {in_features}] is not a weight shape")
    missing = [f for f in ("tier_map",) + PACKED_FIELDS if f not in tensors]
    if missing:
        fail(missing[0], "is missing")
    nbr, nbc = tier_grid(out_features, in_features, b)
    t = tensors
    for name in ("tier_map",) + PACKED_FIELDS:
        key = name.split("_", 1)[1] if name.endswith(("rowptr", "cols")) else name
        want = _INDEX_DTYPES.get(key)
        if want is not None and t[name].dtype != want:
            fail(name, f"has dtype {t[name].dtype}, expected {want}")
    values = {t[f].dtype for f in ("dense_vals", "s24_vals", "topk_vals")}
    if len(values) != 1 or not values <= {*FLOAT_VALUES, *CODE_DTYPES.values()}:
        fail("dense_vals/s24_vals/topk_vals", f"have dtypes {sorted(map(str, values))}; they "
             f"must share one of float32, float16, bfloat16, int8 (8-bit codes), uint8 (4-bit)")
    bits = value_bits(values.pop())
    if bits < 16:
        _check_codes(t, out_features, in_features, b, topk, bits, group_size, fail)
    per_byte = 2 if bits == 4 else 1
    if tuple(t["tier_map"].shape) != (nbr, nbc):
        fail("tier_map", f"has shape {tuple(t['tier_map'].shape)}, expected {(nbr, nbc)}")
    value_shapes = {"dense": ("dense_vals", (b, -(-b // per_byte))),
                    "s24": ("s24_vals", (b, -(-(b // 2) // per_byte))),
                    "topk": ("topk_vals", (-(-topk // per_byte),))}
    owner = torch.zeros(nbr * nbc, dtype=torch.int64, device=t["tier_map"].device)
    for code, prefix in ((DENSE, "dense"), (SPARSE_24, "s24"), (TOPK, "topk")):
        rowptr, cols = t[f"{prefix}_rowptr"], t[f"{prefix}_cols"]
        if tuple(rowptr.shape) != (nbr + 1,):
            fail(f"{prefix}_rowptr", f"has shape {tuple(rowptr.shape)}, expected {(nbr + 1,)}")
        if cols.dim() != 1:
            fail(f"{prefix}_cols", f"has shape {tuple(cols.shape)}, expected 1-D")
        n = cols.shape[0]
        vals_name, block_shape = value_shapes[prefix]
        extra = {"s24": [("s24_meta", (n, b))], "topk": [("topk_pos", (n, topk))]}
        for name, shape in [(vals_name, (n, *block_shape))] + extra.get(prefix, []):
            if tuple(t[name].shape) != shape:
                fail(name, f"has shape {tuple(t[name].shape)}, expected {shape} "
                     f"({n} {prefix} blocks)")
        r = rowptr.long()
        if int(r[0]) != 0:
            fail(f"{prefix}_rowptr", f"[0] is {int(r[0])}, expected 0")
        steps = r[1:] - r[:-1]
        if bool((steps < 0).any()):
            i = _first_bad(steps < 0)
            fail(f"{prefix}_rowptr", f"decreases at [{i + 1}] ({int(r[i])} -> {int(r[i + 1])})")
        if int(r[-1]) != n:
            fail(f"{prefix}_rowptr", f"ends at {int(r[-1])}, but {prefix}_cols holds {n} blocks")
        c = cols.long()
        outside = (c < 0) | (c >= nbc)
        if bool(outside.any()):
            i = _first_bad(outside)
            fail(f"{prefix}_cols", f"[{i}] = {int(c[i])} is outside 0..{nbc - 1}")
        row = torch.repeat_interleave(torch.arange(nbr, device=c.device), steps)
        same_row = row[1:] == row[:-1]
        unordered = same_row & (c[1:] <= c[:-1])
        if bool(unordered.any()):
            i = _first_bad(unordered)
            fail(f"{prefix}_cols", f"[{i + 1}] = {int(c[i + 1])} does not increase after "
                 f"{int(c[i])} in block-row {int(row[i])}")
        flat = row * nbc + c
        wrong_tier = t["tier_map"].flatten()[flat].long() != code
        if bool(wrong_tier.any()):
            i = _first_bad(wrong_tier)
            fail(f"{prefix}_cols", f"[{i}] puts block ({int(row[i])}, {int(c[i])}) in tier "
                 f"{TIER_NAMES[code]}, but tier_map says "
                 f"{int(t['tier_map'].flatten()[flat[i]])}")
        owner.index_add_(0, flat, torch.ones_like(flat))
    if bool((owner != 1).any()):
        i = _first_bad(owner != 1)
        fail("tier_map", f"block ({i // nbc}, {i % nbc}) is listed by {int(owner[i])} tiers, "
             f"expected exactly 1")
    pos = t["topk_pos"].long()
    if pos.numel():
        bad = (pos >= b * b).any(1) | (pos[:, 1:] <= pos[:, :-1]).any(1)
        if bool(bad.any()):
            i = _first_bad(bad)
            fail("topk_pos", f"[{i}] = {pos[i].tolist()} must be strictly increasing positions "
                 f"below {b * b}")
    meta = t["s24_meta"].int() & 0xFFFF
    if meta.numel():
        shift = torch.arange(b // 4, device=meta.device) * 4
        first = (meta.unsqueeze(-1) >> shift) & 3
        second = (meta.unsqueeze(-1) >> (shift + 2)) & 3
        bad = (first >= second).any(-1) | ((meta >> b) != 0)
        if bool(bad.any()):
            i, row = (int(v) for v in bad.nonzero()[0])
            fail("s24_meta", f"[{i}, {row}] = {int(meta[i, row]):#06x} does not pick two "
                 f"ascending columns in every group of 4")


def _check_codes(t: dict, out_features: int, in_features: int, b: int, topk: int, bits: int,
                 group_size: int, fail) -> None:
    """Low-bit values: ``scales`` fp16 ``[out, ceil(in / G)]``, finite and >= 0; ``G`` a
    positive multiple of B; every code in ``[-qmax, qmax]`` (int8 -128 and the int4 nibble 8 are
    not codes); an odd K's padding nibble 0."""
    if not (isinstance(group_size, int) and group_size >= b and group_size % b == 0):
        fail("group_size", f"is {group_size!r}; low-bit values need a positive multiple of the "
             f"block size {b}")
    scales = t.get("scales")
    if scales is None:
        fail("scales", "is missing (low-bit values need their scales)")
    shape = (out_features, -(-in_features // group_size))
    if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != shape:
        fail("scales", f"is {scales.dtype} {tuple(scales.shape)}, expected {SCALE_DTYPE} {shape}")
    bad = ~torch.isfinite(scales) | (scales < 0)
    if bool(bad.any()):
        r, g = (int(v) for v in bad.nonzero()[0])
        fail("scales", f"[{r}, {g}] = {float(scales[r, g])} is not a finite scale >= 0")
    for name in ("dense_vals", "s24_vals", "topk_vals"):
        v = t[name]
        if bits == 8:
            bad = v == -128
        else:
            bad = ((v & 0xF) == 8) | ((v >> 4) == 8)
            if name == "topk_vals" and topk % 2 and v.numel():
                bad[..., -1] |= (v[..., -1] >> 4) != 0
        if bool(bad.any()):
            i = tuple(int(x) for x in bad.nonzero()[0])
            fail(name, f"{list(i)} = {int(v[i])} holds a value outside the int{bits} codes "
                 f"[-{QMAX[bits]}, {QMAX[bits]}] (or a non-zero padding nibble)")


@dataclass
class HybridWeight:
    """A weight in the packed three-tier format (layout in the module docstring)."""

    out_features: int
    in_features: int
    block_size: int
    topk: int
    tier_map: torch.Tensor
    dense_rowptr: torch.Tensor
    dense_cols: torch.Tensor
    dense_vals: torch.Tensor
    s24_rowptr: torch.Tensor
    s24_cols: torch.Tensor
    s24_vals: torch.Tensor
    s24_meta: torch.Tensor
    topk_rowptr: torch.Tensor
    topk_cols: torch.Tensor
    topk_vals: torch.Tensor
    topk_pos: torch.Tensor
    # Low-bit values only: fp16 [out, ceil(in / group_size)] (module docstring); None and 0 for
    # float values.
    scales: torch.Tensor | None = None
    group_size: int = 0
    # The CUDA decode kernel's execution layout, prepared on first use (decode_layout.py).
    decode_cache: DecodeLayoutCache = field(default_factory=DecodeLayoutCache, init=False,
                                            repr=False, compare=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, tier_map: torch.Tensor, topk: int = DEFAULT_TOPK,
                   block_size: int = DEFAULT_BLOCK_SIZE, *, bits: int = 16,
                   group_size: int | None = None,
                   scales: torch.Tensor | None = None) -> HybridWeight:
        """Pack ``weight [out, in]``, which already carries its zeros, by ``tier_map``.

        ``bits`` 8 or 4 stores every tier's values as codes with group scales (module
        docstring): ``group_size`` G (default ``rules.group_size_for`` the input width);
        ``scales`` fp16 ``[out, ceil(in / G)]`` of a weight already on its grid (a joint prune
        and quantization), checked, or None to round the weight to the nearest codes of its own
        group maxima. Raises ``ValueError`` naming the block if a 2:4 block has more than 2
        non-zeros in a group of 4 or a top-K block more than ``topk``, and naming the entry if
        the weight is not on the grid of the ``scales`` given.
        """
        check_bits(bits)
        if bits < 16:
            group_size = group_size or group_size_for(weight.shape[1], DEFAULT_GROUP_SIZE,
                                                      block_size)
            scales, weight = _codes(weight, bits, group_size, block_size, scales)
        tiers, blocks = _checked_blocks(weight, tier_map, topk, block_size)
        b = block_size
        out_f, in_f = weight.shape
        dense_rowptr, dense_cols, dense_ids = _csr(tiers == DENSE)
        s24_rowptr, s24_cols, s24_ids = _csr(tiers == SPARSE_24)
        topk_rowptr, topk_cols, topk_ids = _csr(tiers == TOPK)

        s24_vals, s24_meta = _ops.compress_24(blocks[s24_ids].contiguous())
        topk_vals, topk_pos = _pack_topk(blocks[topk_ids].reshape(-1, b * b), topk)
        dense_vals = blocks[dense_ids].contiguous()
        if bits < 16:
            dense_vals, s24_vals, topk_vals = (_store_codes(v, bits)
                                               for v in (dense_vals, s24_vals, topk_vals))
        return cls(out_f, in_f, b, topk, tiers,
                   dense_rowptr, dense_cols, dense_vals,
                   s24_rowptr, s24_cols, s24_vals, s24_meta,
                   topk_rowptr, topk_cols, topk_vals, topk_pos,
                   scales, group_size if bits < 16 else 0)

    # ------------------------------------------------------------------ views
    def packed_tensors(self) -> PackedTensors:
        """The packed tensors by name, in the argument order of the ``hybrid_linear`` op."""
        return PackedTensors(*(getattr(self, name) for name in PACKED_FIELDS))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the format, ``tier_map`` and (low-bit) ``scales`` included, by field
        name."""
        extra = {} if self.scales is None else {"scales": self.scales}
        return {"tier_map": self.tier_map, **dict(zip(PACKED_FIELDS, self.packed_tensors())),
                **extra}

    @property
    def dtype(self) -> torch.dtype:
        """The stored values' dtype (int8 / uint8 for low-bit codes)."""
        return self.dense_vals.dtype

    @property
    def bits(self) -> int:
        return value_bits(self.dense_vals.dtype)

    @property
    def device(self) -> torch.device:
        return self.dense_vals.device

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def to_dense(self) -> torch.Tensor:
        """The masked weight ``[out, in]``, bit-exact (zeros come back as +0.0): in the values'
        dtype, or for low-bit values fp32, the codes times their scales; on the GPU by the CUDA
        unpack kernel where it is built."""
        if self.scales is not None:
            return torch.ops.sparse_kernels.unpack_hybrid_q(
                *self.packed_tensors(), self.scales, self.group_size, self.out_features,
                self.in_features)
        return torch.ops.sparse_kernels.unpack_hybrid(*self.packed_tensors(), self.out_features,
                                                      self.in_features)

    def kept_mask(self) -> torch.Tensor:
        """Bool ``[out, in]``: the positions this packing has a slot for (dense blocks whole, the
        2:4 slots, the top-K positions), whatever the values there. Training a weight inside
        these positions keeps it packable with the same tier map."""
        one = 0x11 if self.bits == 4 else 1  # every int4 code of the byte 1
        ones = {name: torch.full_like(getattr(self, name), one)
                for name in ("dense_vals", "s24_vals", "topk_vals")}
        if self.scales is not None:
            ones["scales"] = torch.ones_like(self.scales)
        slots = dataclasses.replace(self, **ones)
        return slots.to_dense() != 0

    def to(self, device=None, dtype: torch.dtype | None = None) -> HybridWeight:
        """Copy to another device and/or float value dtype (indices, low-bit codes and their
        scales keep their dtypes)."""
        values = set() if self.scales is not None else {"dense_vals", "s24_vals", "topk_vals"}
        moved = {name: t.to(device=device, dtype=dtype if name in values else None)
                 for name, t in self.tensors().items()}
        moved["tier_map"] = self.tier_map  # reports only; stays on the CPU
        return HybridWeight(self.out_features, self.in_features, self.block_size, self.topk,
                            **moved, group_size=self.group_size)

    # ------------------------------------------------------------------ sizes
    def tier_counts(self) -> dict[str, int]:
        return {TIER_NAMES[t]: int((self.tier_map == t).sum()) for t in TIER_NAMES}

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor, block index and tier map included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def ideal_nbytes(self) -> int:
        """Bytes if each block stored only its kept values and their positions (and a low-bit
        weight its scales), no index."""
        es = self.dense_vals.element_size() if self.bits == 16 else self.bits / 8
        bb = self.block_size ** 2
        counts = self.tier_counts()
        scales = 0 if self.scales is None else self.scales.numel() * 2
        return int(counts["dense"] * bb * es + counts["2:4"] * (bb // 2 * es + bb // 8)
                   + counts["top-K"] * self.topk * (es + 1) + scales)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the weight unpacked: in its float dtype, or in fp16 for low-bit values."""
        es = self.dense_vals.element_size() if self.bits == 16 else 2
        return self.out_features * self.in_features * es

    # ------------------------------------------------------------------ disk
    def metadata(self) -> dict[str, str]:
        return {"format": "sparse_kernels.HybridWeight", "format_version": str(FORMAT_VERSION),
                "out_features": str(self.out_features), "in_features": str(self.in_features),
                "block_size": str(self.block_size), "topk": str(self.topk),
                "group_size": str(self.group_size)}

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file atomically (a temp file renamed into place)."""
        from safetensors.torch import save_file

        with atomic_file(path) as tmp:
            save_file({k: t.contiguous().cpu() for k, t in self.tensors().items()}, tmp,
                      metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> HybridWeight:
        """Read a file written by ``save``, validated (:func:`validate_packed`) before any
        kernel can see it: a truncated, corrupted or crafted file raises
        :class:`CorruptWeightError` (``FileNotFoundError`` when there is no file)."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HybridWeight file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as err:  # truncated, garbled header, data out of bounds
            raise CorruptWeightError(f"{path!r} is not a readable safetensors file: "
                                     f"{err}") from None
        if meta.get("format") != "sparse_kernels.HybridWeight":
            raise CorruptWeightError(f"{path!r} is not a HybridWeight file (metadata: "
                                     f"{json.dumps(meta)[:200]})")
        try:
            version, *shape = (int(meta[k]) for k in ("format_version", "out_features",
                                                      "in_features", "block_size", "topk"))
        except (KeyError, ValueError) as err:
            raise CorruptWeightError(f"{path!r}: its metadata lacks a whole number for "
                                     f"{err}") from None
        if version > FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {version}; this package reads up "
                             f"to {FORMAT_VERSION}: upgrade it")
        try:  # version 1 files have float values and no group size
            group_size = int(meta.get("group_size", 0))
        except ValueError:
            raise CorruptWeightError(f"{path!r}: its group_size metadata is not a whole "
                                     f"number: {meta['group_size']!r}") from None
        validate_packed(tensors, *shape, group_size=group_size, where=repr(path))
        weight = cls(*shape, **tensors, group_size=group_size)
        return weight.to(device)

    def validate(self) -> HybridWeight:
        """:func:`validate_packed` on this weight's tensors; returns it."""
        validate_packed(self.tensors(), self.out_features, self.in_features, self.block_size,
                        self.topk, group_size=self.group_size)
        return self

    @classmethod
    def empty(cls, out_features: int, in_features: int, tier_map: torch.Tensor,
              topk: int = DEFAULT_TOPK, block_size: int = DEFAULT_BLOCK_SIZE,
              dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None, *, bits: int = 16,
              group_size: int = 0) -> HybridWeight:
        """Zero-filled tensors of the shapes ``tier_map`` implies (a target for loading); with
        ``bits`` 8 / 4 low-bit codes (``dtype`` is then unused) and zero scales of
        ``group_size``."""
        tiers = check_tier_map(tier_map, out_features, in_features, block_size)
        b = block_size
        index = {}
        for prefix, code in (("dense", DENSE), ("s24", SPARSE_24), ("topk", TOPK)):
            rowptr, cols, _ = _csr(tiers == code)
            index[prefix] = (rowptr.to(device), cols.to(device), len(cols))
        n_dense, n_24, n_topk = index["dense"][2], index["s24"][2], index["topk"][2]
        zeros = lambda *shape, dt=dtype: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        # Exactly the packing of an all-zero weight (2:4 slots at columns 0 and 1 of each group,
        # top-K positions 0..K-1), so an unloaded weight is a well-formed one for every kernel.
        zero_meta = torch.full((n_24, b), ZERO_BLOCK_META[b], dtype=torch.int16, device=device)
        first_positions = torch.arange(topk, dtype=torch.uint8, device=device).repeat(n_topk, 1)
        if check_bits(bits) == 16:
            return cls(out_features, in_features, b, topk, tiers,
                       *index["dense"][:2], zeros(n_dense, b, b),
                       *index["s24"][:2], zeros(n_24, b, b // 2), zero_meta,
                       *index["topk"][:2], zeros(n_topk, topk), first_positions)
        per_byte, code = (2, torch.uint8) if bits == 4 else (1, torch.int8)
        scales = zeros(out_features, -(-in_features // group_size), dt=SCALE_DTYPE)
        return cls(out_features, in_features, b, topk, tiers,
                   *index["dense"][:2], zeros(n_dense, b, -(-b // per_byte), dt=code),
                   *index["s24"][:2], zeros(n_24, b, -(-(b // 2) // per_byte), dt=code),
                   zero_meta, *index["topk"][:2], zeros(n_topk, -(-topk // per_byte), dt=code),
                   first_positions, scales, group_size)

