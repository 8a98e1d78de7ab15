"""Masks kept as bits: one bit per weight instead of torch.bool's byte.

A 7B model's masks are 6.7 GB as bool tensors, as much as its bf16 weights; as bits, 0.8 GB.
:class:`BitMasks` is the ``{module name: bool mask}`` mapping ``prune`` returns and the
fine-tune reads: it stores each mask packed and expands it, on the CPU, when it is read.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping

import torch

__all__ = ["BitMasks", "pack_bits", "unpack_bits"]

_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """uint8 ``[ceil(numel / 8)]``: ``mask`` (bool, any shape) flattened row-major, 8 per byte,
    the first element in the lowest bit."""
    if mask.dtype != torch.bool:
        raise TypeError(f"a mask must be torch.bool (True = kept), got {mask.dtype}")
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_VALUES.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """bool ``shape``: the mask :func:`pack_bits` packed, on ``bits``' device."""
    expanded = bits.unsqueeze(1) & _BIT_VALUES.to(bits.device)
    return (expanded != 0).reshape(-1)[:math.prod(shape)].view(shape)


class BitMasks(MutableMapping):
    """``{module name: bool mask}`` stored as bits on the CPU; reading a mask expands a new bool
    tensor (writing into it does not change the stored mask: assign it back)."""

    def __init__(self, masks=None):
        self._bits: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if masks:
            self.update(masks)

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._bits[name] = pack_bits(mask.detach().cpu())
        self._shapes[name] = tuple(mask.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_bits(self._bits[name], self._shapes[name])

    def __delitem__(self, name: str) -> None:
        del self._bits[name], self._shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    @property
    def nbytes(self) -> int:
        """What the masks hold in memory."""
        return sum(b.numel() for b in self._bits.values())

    def __repr__(self) -> str:
        return f"BitMasks({len(self)} masks, {self.nbytes:,} bytes)"
