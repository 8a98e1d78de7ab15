"""The CUDA decode kernel's execution layout, prepared once per weight from the packed format.

The canonical format (``format.py``) is what is saved and validated; the decode kernel
(``csrc/cuda/hybrid_decode.cu``, 1-16 rows of x, fp16 / bf16, ``B = 16``) reads this layout
instead, built from it on the weight's device and cached beside it (``DecodeLayoutCache``).
Its contract mirrors ``csrc/cuda/decode_layout.cuh``:

* a **task** is one block-row over one segment of its block columns; the segments of a row are
  cut so that every task of the weight carries about ``total bytes / target_tasks`` bytes (one
  wave of warps on the GPU); ``tasks`` int32 ``[n_tasks, 8]`` = (stream16, length16, first_col,
  n_blocks, block_row, code_word, segment, n_segments); the tasks of a row are consecutive.
* ``stream`` uint8: every block's image in row-major block order (so each task's blocks are one
  contiguous run, starting at ``16 * stream16``), images of
  dense 512 B (lane L's four mma A registers at ``16 L``), 2:4 288 B (the kept values, lane L's
  two sparse A registers at ``8 L``, then the metadata registers ``meta[g] | meta[g + 8] << 16``,
  g = 0..7), top-K
  ``round_up(3K, 16)`` B (K values, then K slot bytes ``8 * lane + element``, zero padding).
* ``codes`` int32: 2-bit tier codes, block i of a task in bits ``2 (i % 16)`` of word
  ``code_word + i // 16``.
* ``counters`` int64 ``[n_block_rows]``: the kernel's split-K words (a launch tag and the
  row's finished tasks, ``sk_decode::arrive``); any contents are safe, zero at first.

``layout_to_dense`` reads a layout back into the weight (the op's reference and the tests'
oracle); ``tests/test_decode_layout.py`` also replays the kernel's own walk and loads over it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import block_ids, decompress_24
from .rules import tier_grid

BLOCK = 16
CHUNK_BYTES = 512
MAX_TOKENS = 16           # rows of x the decode kernel takes (sk_decode::kMaxTokens)
WARPS_PER_CTA, CTAS_PER_SM = 4, 8     # what the kernel is built for (decode_layout.cuh)
SHARED_PER_CTA = WARPS_PER_CTA * (8 * 512 + 512) + 1024  # rings + top-K tiles + system reserve
MAX_TOPK = 170            # K whose top-K image fits in one 512-byte chunk (sk_decode::kMaxTopk)
# Smallest task worth its partials, atomic and share of the row's reduction: one ring of
# chunks, so even a small layer's tasks stream a full pipeline.
MIN_TASK_BYTES = 8 * CHUNK_BYTES
CODES_PER_WORD = 16
DENSE_BYTES, S24_BYTES = 512, 288
TASK_FIELDS = ("stream16", "length16", "first_col", "n_blocks", "block_row", "code_word",
               "segment", "n_segments")


def topk_nbytes(k: int) -> int:
    """Bytes of a top-K block image: K 16-bit values and K slot bytes, rounded up to 16."""
    return (3 * k + 15) // 16 * 16


def _tier_nbytes(k: int, device) -> torch.Tensor:
    return torch.tensor([DENSE_BYTES, S24_BYTES, topk_nbytes(k)], dtype=torch.int64,
                        device=device)


def _dense_element_order() -> torch.Tensor:
    """[256]: the block element (row * 16 + col) at half ``8 * lane + e`` of a dense image.

    Lane (g, t)'s A register r holds two consecutive columns of row ``g + 8 (r % 2)``, starting
    at column ``4 t + 2 (r // 2)`` (mma_layout.cuh's permuted k axis); element e is half ``e % 2``
    of register ``e // 2`` (decode_layout.cuh ``dense_element``).
    """
    lane, e = torch.arange(32).repeat_interleave(8), torch.arange(8).repeat(32)
    g, t, reg = lane // 4, lane % 4, e // 2
    return (g + 8 * (reg % 2)) * BLOCK + 4 * t + 2 * (reg // 2) + e % 2


def _s24_element_order() -> torch.Tensor:
    """[128]: the kept value (row * 8 + slot) at half ``4 * lane + e`` of a 2:4 image: lane
    (g, t)'s A register r holds slots 2t, 2t + 1 of row ``g + 8 r`` (decode_layout.cuh
    ``s24_element``)."""
    lane, e = torch.arange(32).repeat_interleave(4), torch.arange(4).repeat(32)
    return (lane // 4 + 8 * (e // 2)) * (BLOCK // 2) + 2 * (lane % 4) + e % 2


DENSE_ORDER = _dense_element_order()
S24_ORDER = _s24_element_order()
SLOT_OF_ELEMENT = torch.argsort(DENSE_ORDER)  # inverse: the top-K slot of each block element


def unsupported_reason(dtype: torch.dtype, block_size: int, out_features: int,
                       in_features: int, topk: int) -> str | None:
    """Why a weight cannot have a decode layout, or None when it can."""
    if out_features == 0 or in_features == 0:
        return f"an empty weight [{out_features}, {in_features}] has nothing to stream"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the decode kernel runs fp16 / bf16 on tensor cores, got {dtype}"
    if block_size != BLOCK:
        return f"the decode kernel needs block_size {BLOCK}, got {block_size}"
    if in_features % 4:
        return f"the decode kernel loads x 4 columns at a time: in_features {in_features} % 4 != 0"
    if topk > MAX_TOPK:
        return (f"the decode kernel streams blocks of at most 512 bytes: top-K images need "
                f"K <= {MAX_TOPK}, got {topk}")
    return None


def default_target_tasks(device: torch.device) -> int:
    """Tasks for one wave of the decode kernel on ``device`` (a CUDA device): its SMs times the
    warps that fit on one (8 CTAs of 4 warps, fewer where shared memory is smaller than
    8 x ``SHARED_PER_CTA``, as on sm_86 / sm_89)."""
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_multiprocessor", 0) or 8 * SHARED_PER_CTA
    ctas = max(1, min(CTAS_PER_SM, shared // SHARED_PER_CTA))
    return props.multi_processor_count * ctas * WARPS_PER_CTA


@dataclass
class DecodeLayout:
    """A prepared execution layout (contract in the module docstring)."""

    out_features: int
    in_features: int
    topk: int
    stream: torch.Tensor
    tasks: torch.Tensor
    codes: torch.Tensor
    counters: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``stream, tasks, codes, counters``: the op's arguments after x."""
        return self.stream, self.tasks, self.codes, self.counters

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call, besides x: the stream, tasks and codes."""
        return sum(t.numel() * t.element_size() for t in (self.stream, self.tasks, self.codes))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same 32 bits."""
    return (words - ((words >= 2 ** 31).long() << 32)).to(torch.int32)


def prepare_decode_layout(packed: tuple[torch.Tensor, ...], out_features: int,
                          in_features: int, topk: int, target_tasks: int,
                          min_task_bytes: int = MIN_TASK_BYTES) -> DecodeLayout:
    """The decode layout of a packed weight (``HybridWeight.packed_tensors()`` order), on its
    device, with at most ``target_tasks`` byte-balanced tasks (at least one per block-row) of
    about ``min_task_bytes`` or more where the rows allow."""
    (dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
     topk_rowptr, topk_cols, topk_vals, topk_pos) = packed
    reason = unsupported_reason(dense_vals.dtype, dense_vals.shape[1], out_features,
                                in_features, topk)
    if reason is not None:
        raise ValueError(reason)
    if target_tasks < 1:
        raise ValueError(f"target_tasks must be >= 1, got {target_tasks}")
    device = dense_vals.device
    nbr, nbc = tier_grid(out_features, in_features, BLOCK)
    ids = [block_ids(rowptr, cols, nbc) for rowptr, cols in
           ((dense_rowptr, dense_cols), (s24_rowptr, s24_cols), (topk_rowptr, topk_cols))]
    tiers = torch.zeros(nbr * nbc, dtype=torch.int64, device=device)
    for tier, tier_ids in enumerate(ids):
        tiers[tier_ids] = tier
    sizes = _tier_nbytes(topk, device)[tiers]
    starts = torch.cumsum(sizes, 0) - sizes

    # Block images, placed at their blocks' starts.
    stream = torch.zeros(int(sizes.sum()), dtype=torch.uint8, device=device)
    order, slot_of = DENSE_ORDER.to(device), SLOT_OF_ELEMENT.to(device)
    n24 = s24_vals.shape[0]
    meta = s24_meta.to(torch.int64) & 0xFFFF
    images = (
        dense_vals.reshape(-1, BLOCK * BLOCK)[:, order].contiguous().view(torch.uint8),
        torch.cat([s24_vals.reshape(n24, BLOCK * BLOCK // 2)[:, S24_ORDER.to(device)]
                   .contiguous().view(torch.uint8),
                   _as_int32(meta[:, :8] | meta[:, 8:] << 16).view(torch.uint8)], dim=1),
        F.pad(torch.cat([topk_vals.contiguous().view(torch.uint8),
                         slot_of[topk_pos.long()].to(torch.uint8)], dim=1),
              (0, topk_nbytes(topk) - 3 * topk)),
    )
    for tier_ids, image in zip(ids, images):
        at = starts[tier_ids, None] + torch.arange(image.shape[1], device=device)
        stream[at.reshape(-1)] = image.reshape(-1)

    # Byte-balanced segments of each block-row: segment = share of the row's bytes before it.
    row_sizes = sizes.view(nbr, nbc)
    row_bytes = row_sizes.sum(1)
    splits = _segments_per_row(row_bytes, nbc, target_tasks, min_task_bytes)
    before = torch.cumsum(row_sizes, 1) - row_sizes
    segment = before * splits[:, None] // row_bytes[:, None]
    key = (torch.arange(nbr, device=device)[:, None] * (nbc + 1) + segment).reshape(-1)
    task_key, n_blocks = torch.unique_consecutive(key, return_counts=True)
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    block_row = task_key // (nbc + 1)
    row_tasks = torch.bincount(block_row, minlength=nbr)
    segment_of_task = (torch.arange(len(task_key), device=device)
                       - (torch.cumsum(row_tasks, 0) - row_tasks)[block_row])
    task_bytes = torch.zeros_like(n_blocks).index_add_(
        0, torch.repeat_interleave(torch.arange(len(task_key), device=device), n_blocks), sizes)
    words = (n_blocks + CODES_PER_WORD - 1) // CODES_PER_WORD
    code_word = torch.cumsum(words, 0) - words
    tasks = torch.stack([starts[first_block] // 16, task_bytes // 16, first_block % nbc,
                         n_blocks, block_row, code_word, segment_of_task,
                         row_tasks[block_row]], dim=1).to(torch.int32)

    # Tier codes: block i of a task in bits 2 (i % 16) of the task's word i // 16.
    task_of_block = torch.repeat_interleave(torch.arange(len(task_key), device=device), n_blocks)
    index = torch.arange(nbr * nbc, device=device) - first_block[task_of_block]
    codes = torch.zeros(int(words.sum()), dtype=torch.int64, device=device).index_add_(
        0, code_word[task_of_block] + index // CODES_PER_WORD,
        tiers << (2 * (index % CODES_PER_WORD)))
    return DecodeLayout(out_features, in_features, topk, stream, tasks.contiguous(),
                        _as_int32(codes), torch.zeros(nbr, dtype=torch.int64, device=device))


def _segments_per_row(row_bytes: torch.Tensor, nbc: int, target_tasks: int,
                      min_task_bytes: int) -> torch.Tensor:
    """Segments of each row, ``ceil(row bytes / cap)`` (at most one per block), for the smallest
    byte cap of at least ``min_task_bytes`` that keeps the tasks within ``target_tasks`` (at least
    one per row): every task carries at most ``cap`` bytes plus one block."""
    rows = row_bytes.double()

    def count(cap):
        return (rows / cap).ceil().clamp(1, nbc)

    lo = max(float(rows.sum()) / target_tasks, min_task_bytes)
    hi = max(float(rows.max()), lo)
    if count(lo).sum() <= target_tasks:
        return count(lo).long()
    for _ in range(40):  # bisection on the cap: the task count only falls as the cap grows
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count(mid).sum() <= target_tasks else (mid, hi)
    return count(hi).long()


def layout_to_dense(stream: torch.Tensor, tasks: torch.Tensor, codes: torch.Tensor,
                    out_features: int, in_features: int, topk: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[out, in]`` a decode layout stands for, read as the kernel reads it: each
    block's tier from the codes, its image at the running offset inside its task's stream."""
    device = stream.device
    nbr, nbc = tier_grid(out_features, in_features, BLOCK)
    t = tasks.long()
    n_blocks = t[:, 3]
    task_of_block = torch.repeat_interleave(torch.arange(len(t), device=device), n_blocks)
    first = torch.cumsum(n_blocks, 0) - n_blocks
    index = torch.arange(int(n_blocks.sum()), device=device) - first[task_of_block]
    word = codes.long()[t[task_of_block, 5] + index // CODES_PER_WORD] & 0xFFFFFFFF
    tiers = (word >> (2 * (index % CODES_PER_WORD))) & 3
    sizes = _tier_nbytes(topk, device)[tiers]
    running = torch.cumsum(sizes, 0) - sizes
    offset = 16 * t[task_of_block, 0] + running - running[first][task_of_block]
    flat = t[task_of_block, 4] * nbc + t[task_of_block, 2] + index

    def image(select, start, nbytes, view_dtype):  # bytes start.. of the selected images
        at = offset[select, None] + start + torch.arange(nbytes, device=device)
        return stream[at].view(view_dtype)

    blocks = torch.zeros(nbr * nbc, BLOCK * BLOCK, dtype=dtype, device=device)
    dense = tiers == 0
    blocks[flat[dense, None], DENSE_ORDER.to(device)] = image(dense, 0, DENSE_BYTES, dtype)
    s24 = tiers == 1
    values = torch.empty(int(s24.sum()), BLOCK * BLOCK // 2, dtype=dtype, device=device)
    values[:, S24_ORDER.to(device)] = image(s24, 0, 256, dtype)
    values = values.view(-1, BLOCK, BLOCK // 2)
    regs = image(s24, 256, 32, torch.int32).long()
    meta = torch.cat([regs & 0xFFFF, (regs >> 16) & 0xFFFF], dim=1)
    meta = (meta - ((meta >= 2 ** 15).long() << 16)).to(torch.int16)
    blocks[flat[s24]] = decompress_24(values, meta).reshape(-1, BLOCK * BLOCK)
    top = tiers == 2
    positions = DENSE_ORDER.to(device)[image(top, 2 * topk, topk, torch.uint8).long()]
    blocks[flat[top, None], positions] = image(top, 0, 2 * topk, dtype)
    weight = blocks.view(nbr, nbc, BLOCK, BLOCK).permute(0, 2, 1, 3).reshape(nbr * BLOCK,
                                                                            nbc * BLOCK)
    return weight[:out_features, :in_features]


def hybrid_linear_decode(x: torch.Tensor, stream: torch.Tensor, tasks: torch.Tensor,
                         codes: torch.Tensor, counters: torch.Tensor, out_features: int,
                         topk: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the ``hybrid_linear_decode`` op: ``x [M, in] @ W^T + bias`` for the weight a
    decode layout stands for, accumulated in fp32 (``counters`` is the kernel's scratch)."""
    weight = layout_to_dense(stream, tasks, codes, out_features, x.shape[-1], topk, x.dtype)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


class DecodeLayoutCache:
    """The decode layout of one packed weight, rebuilt when its tensors change.

    The key is each packed tensor's storage address and version counter, so an in-place
    update (``load_state_dict``, ``copy_``) or a move (``.to``) rebuilds it on the next call.
    """

    def __init__(self):
        self._key = None
        self._layout = None

    @property
    def layout(self) -> DecodeLayout | None:
        """The layout built by the last ``get`` (None before any)."""
        return self._layout

    def get(self, packed: tuple[torch.Tensor, ...], out_features: int, in_features: int,
            topk: int) -> DecodeLayout:
        key = tuple((t.data_ptr(), t._version) for t in packed)
        if key != self._key:
            self._layout = None  # free the old layout before building the new one
            device = packed.dense_vals.device
            target = default_target_tasks(device) if device.type == "cuda" else 1
            self._layout = prepare_decode_layout(packed, out_features, in_features, topk, target)
            self._key = key
        return self._layout
