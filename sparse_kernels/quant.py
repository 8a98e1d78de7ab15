"""Low-bit values of the packed format: symmetric integer codes times group scales.

A weight ``W [out, in]`` quantized to ``bits`` (8 or 4) in groups of ``G`` input columns has
``scales`` fp16 ``[out, ceil(in / G)]`` and codes ``q`` int8 ``[out, in]`` in ``[-qmax, qmax]``
(``rules.QMAX``): ``W = q * scales[:, col // G]``, exactly (a small integer times an fp16 number
is exact in fp32). Pure torch: the packing, the references of the kernels and the pruning
methods' quantizers all use these.
"""
from __future__ import annotations

import torch

from .rules import QMAX, SCALE_DTYPE

__all__ = ["group_scales", "expand_scales", "quantize", "dequantize", "round_to_grid",
           "pack_int4", "unpack_int4"]


def expand_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``[out, n_groups]`` scales -> fp32 ``[out, in_features]``, each column its group's."""
    return scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]


def group_scales(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """fp16 ``[out, ceil(in / G)]``: each group's largest ``|w|`` over ``qmax``, so the largest
    weight of a group is a code exactly (0 for an all-zero group)."""
    out_f, in_f = weight.shape
    groups = -(-in_f // group_size)
    padded = torch.nn.functional.pad(weight.detach().float().abs(),
                                     (0, groups * group_size - in_f))
    amax = padded.reshape(out_f, groups, group_size).amax(-1)
    return (amax / QMAX[bits]).to(SCALE_DTYPE)


def quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int,
             group_size: int) -> torch.Tensor:
    """int8 codes ``[out, in]``: ``round(w / scale)`` clamped to ``[-qmax, qmax]`` (0 where the
    scale is 0)."""
    s = expand_scales(scales, group_size, weight.shape[1])
    q = torch.where(s > 0, weight.float() / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
    return q.round().clamp(-QMAX[bits], QMAX[bits]).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 ``[out, in]``: ``codes * scale`` (exact)."""
    return codes.float() * expand_scales(scales, group_size, codes.shape[1])


def round_to_grid(weight: torch.Tensor, bits: int, group_size: int,
                  scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight on the grid fp32, scales)``: round-to-nearest quantization of ``weight`` with
    ``scales`` (default: :func:`group_scales` of the weight itself); zeros stay zero."""
    scales = group_scales(weight, bits, group_size) if scales is None else scales
    return dequantize(quantize(weight, scales, bits, group_size), scales, group_size), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[..., n]`` in ``[-8, 7]`` -> uint8 ``[..., ceil(n / 2)]``: element ``2j`` in
    the low nibble of byte ``j``, ``2j + 1`` in the high one (two's complement; an odd ``n``
    leaves the last high nibble 0)."""
    n = codes.shape[-1]
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if n % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    pairs = nibbles.reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., ceil(n / 2)]`` -> int8 codes ``[..., n]``."""
    low, high = packed & 0xF, packed >> 4
    nibbles = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1],
                                                       2 * packed.shape[-1])[..., :n]
    signed = nibbles.to(torch.int16)
    return torch.where(signed >= 8, signed - 16, signed).to(torch.int8)
