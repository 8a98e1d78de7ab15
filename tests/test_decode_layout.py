"""The CUDA decode kernel's prepared layout (sparse_kernels/decode_layout.py), on the CPU.

* The layout reads back into exactly the packed weight (odd shapes, every tier mix, K, dtype,
  task count), its tasks tile every block-row in byte-balanced segments, and the op's reference
  agrees with the canonical ``hybrid_linear``.
* tests/csrc/decode_replay.cpp runs the kernel's own walk (csrc/cuda/decode_layout.cuh) over the
  layout with a strict model of the warp's cp.async ring, building every lane's registers with
  the kernel's functions; the PTX-layout emulator (tests/mma_emulator.py) multiplies them, the
  tasks' partial sums are added per block-row as the kernel's epilogue does, and the result must
  equal x @ W^T.
"""
import os
import re
import subprocess

import numpy as np
import pytest
import torch

import mma_emulator as emu
from conftest import build_host_tool, random_hybrid
import sparse_kernels as sk
from sparse_kernels import decode_layout as dl
from sparse_kernels.tiers import apply_tier_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 16
MIXES = {"default": (0.35, 0.45, 0.20), "dense": (1, 0, 0), "2:4": (0, 1, 0), "top-K": (0, 0, 1),
         "mixed": (0.3, 0.3, 0.4)}


def make_weight(out_f, in_f, mix, k, dtype, seed=0):
    """(masked weight, HybridWeight) with the mix's tier fractions at random blocks."""
    packed, masked = random_hybrid(out_f, in_f, dtype, topk=k, ratios=MIXES[mix], seed=seed)
    return masked, packed


def prepare(packed, target, min_task_bytes=16):
    """The layout with ``target`` tasks at most; no floor on their size by default, so small
    weights get the many segments per row that large ones get on a GPU."""
    return dl.prepare_decode_layout(packed.packed_tensors(), packed.out_features,
                                    packed.in_features, packed.topk, target, min_task_bytes)


CASES = [  # out, in, mix, K, dtype, target tasks
    (1, 4, "default", 15, torch.float16, 1),
    (17, 100, "mixed", 15, torch.bfloat16, 5),
    (40, 1000, "default", 15, torch.float16, 7),
    (33, 260, "dense", 15, torch.float16, 9),
    (20, 500, "2:4", 15, torch.bfloat16, 3),
    (24, 1024, "top-K", 5, torch.float16, 4),
    (16, 300, "mixed", 64, torch.float16, 2),
    (18, 96, "mixed", 1, torch.bfloat16, 1000),
    (20, 320, "mixed", 170, torch.float16, 6),
]


@pytest.mark.parametrize("out_f,in_f,mix,k,dtype,target", CASES)
def test_layout_reads_back_into_the_packed_weight(out_f, in_f, mix, k, dtype, target):
    masked, packed = make_weight(out_f, in_f, mix, k, dtype)
    layout = prepare(packed, target)
    back = dl.layout_to_dense(layout.stream, layout.tasks, layout.codes, out_f, in_f, k, dtype)
    assert torch.equal(back, masked)
    assert torch.equal(layout.counters, torch.zeros(-(-out_f // B), dtype=torch.int32))


@pytest.mark.parametrize("out_f,in_f,mix,k,dtype,target", CASES)
def test_tasks_tile_every_block_row(out_f, in_f, mix, k, dtype, target):
    _, packed = make_weight(out_f, in_f, mix, k, dtype)
    layout = prepare(packed, target)
    t = dict(zip(dl.TASK_FIELDS, layout.tasks.long().T))
    nbr, nbc = -(-out_f // B), -(-in_f // B)
    # Rows in order, each a run of tasks with segments 0..n-1 covering columns 0..nbc-1.
    assert torch.equal(t["block_row"], torch.sort(t["block_row"]).values)
    assert torch.equal(torch.unique(t["block_row"]), torch.arange(nbr))
    for row in range(nbr):
        mine = t["block_row"] == row
        n = int(mine.sum())
        assert torch.equal(t["segment"][mine], torch.arange(n))
        assert (t["n_segments"][mine] == n).all()
        cols, counts = t["first_col"][mine], t["n_blocks"][mine]
        assert cols[0] == 0 and (counts > 0).all() and int(cols[-1] + counts[-1]) == nbc
        assert torch.equal(cols[1:], (cols + counts)[:-1])
    # Streams back to back from byte 0, 16-byte aligned by construction (units of 16 bytes).
    ends = t["stream16"] + t["length16"]
    assert t["stream16"][0] == 0 and torch.equal(t["stream16"][1:], ends[:-1])
    assert int(ends[-1]) * 16 == layout.stream.numel()
    words = (t["n_blocks"] + 15) // 16
    assert torch.equal(t["code_word"], torch.cumsum(words, 0) - words)
    assert len(t["block_row"]) <= max(target, nbr)  # never more than one wave (or one per row)
    # Within a row, cut at equal shares of its bytes: at most one block's bytes off the share.
    row_bytes = torch.zeros(nbr, dtype=torch.long).index_add_(0, t["block_row"],
                                                               t["length16"] * 16)
    share = row_bytes[t["block_row"]] / t["n_segments"]
    assert ((t["length16"] * 16 - share).abs() <= dl.DENSE_BYTES).all()


def test_small_layers_keep_tasks_of_a_full_ring():
    """A layer too small to fill one wave is not cut below MIN_TASK_BYTES per task (each extra
    task costs partials, an atomic and a share of the row's reduction)."""
    _, packed = make_weight(1024, 1024, "dense", 15, torch.float16)
    layout = prepare(packed, 4224, dl.MIN_TASK_BYTES)
    t = dict(zip(dl.TASK_FIELDS, layout.tasks.long().T))
    assert len(t["n_blocks"]) == 1024 * 1024 * 2 // dl.MIN_TASK_BYTES
    assert (t["length16"] * 16 == dl.MIN_TASK_BYTES).all()
    assert "empty weight" in dl.unsupported_reason(torch.float16, 16, 0, 64, 15)


def test_rows_with_more_bytes_get_more_segments():
    """Segments follow bytes across rows too: a dense row is cut into more tasks than a top-K
    row, so no task carries much more than total / target."""
    tiers = torch.stack([torch.zeros(64), torch.full((64,), 2)]).to(torch.int8)
    masked = apply_tier_map(torch.randn(32, 64 * B), tiers, 15).half()
    layout = prepare(sk.HybridWeight.from_dense(masked, tiers, 15), 12)
    t = dict(zip(dl.TASK_FIELDS, layout.tasks.long().T))
    dense_row, topk_row = (t["n_segments"][t["block_row"] == r][0] for r in (0, 1))
    assert dense_row >= 8 * topk_row and len(t["n_segments"]) <= 12
    assert int(t["length16"].max()) * 16 <= 1.5 * layout.stream.numel() / 12 + dl.DENSE_BYTES


def test_segments_are_balanced_by_bytes_not_blocks():
    """A row whose first half is dense and second half top-K splits near the dense end."""
    tiers = torch.cat([torch.zeros(1, 32), torch.full((1, 32), 2)], dim=1).to(torch.int8)
    masked = apply_tier_map(torch.randn(16, 64 * B), tiers, 15).half()
    packed = sk.HybridWeight.from_dense(masked, tiers, 15)
    layout = prepare(packed, 2)
    t = dict(zip(dl.TASK_FIELDS, layout.tasks.long().T))
    row_bytes = 32 * dl.DENSE_BYTES + 32 * dl.topk_nbytes(15)
    assert t["n_segments"].tolist() == [2, 2]
    assert (t["length16"] * 16 - row_bytes / 2).abs().max() <= dl.DENSE_BYTES
    assert t["n_blocks"][0] < 32 < t["n_blocks"][1] + 32  # by bytes: fewer blocks in the first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_reference_matches_hybrid_linear(dtype):
    masked, packed = make_weight(37, 520, "mixed", 15, dtype, seed=3)
    layout = prepare(packed, 11)
    x = torch.randn(5, 520).to(dtype)
    bias = torch.randn(37).to(dtype)
    got = torch.ops.sparse_kernels.hybrid_linear_decode(x, *layout.tensors(), 37, 15, bias)
    want = sk.hybrid_linear(x, packed, bias, backend="torch")
    assert torch.equal(got, want)


@pytest.mark.parametrize("in_f,mix,k,dtype,target,message", [
    (64, "default", 15, torch.float32, 4, "fp16 / bf16"),
    (62, "default", 15, torch.float16, 4, "in_features 62 % 4"),
    (64, "top-K", 171, torch.float16, 4, "K <= 170, got 171"),
    (64, "default", 15, torch.float16, 0, "target_tasks"),
])
def test_unsupported_weights_name_the_reason(in_f, mix, k, dtype, target, message):
    _, packed = make_weight(16, in_f, mix, k, dtype)
    with pytest.raises(ValueError, match=message):
        prepare(packed, target)


def test_constants_match_the_kernel_header():
    text = open(os.path.join(ROOT, "csrc", "cuda", "decode_layout.cuh")).read()
    const = {m.group(1): int(m.group(2))
             for m in re.finditer(r"constexpr int (k\w+) = (\d+);", text)}
    assert (const["kWarpsPerCta"], const["kCtasPerSm"]) == (dl.WARPS_PER_CTA, dl.CTAS_PER_SM)
    ring = const["kChunkBytes"] * const["kRingChunks"]
    assert dl.SHARED_PER_CTA == const["kWarpsPerCta"] * (ring + const["kTileBytes"]) + 1024
    assert const["kMaxTopk"] == dl.MAX_TOPK and dl.topk_nbytes(dl.MAX_TOPK) <= dl.CHUNK_BYTES
    assert dl.topk_nbytes(dl.MAX_TOPK + 1) > dl.CHUNK_BYTES
    assert const["kChunkBytes"] == dl.CHUNK_BYTES and const["kMaxTokens"] == dl.MAX_TOKENS
    assert const["kDenseBytes"] == dl.DENSE_BYTES and const["kCodesPerWord"] == dl.CODES_PER_WORD


def test_cache_rebuilds_when_the_weight_changes():
    _, packed = make_weight(32, 64, "default", 15, torch.float16)
    cache = dl.DecodeLayoutCache()
    args = (packed.packed_tensors(), 32, 64, 15)
    first = cache.get(*args)
    assert cache.get(*args) is first
    packed.dense_vals.mul_(2)  # in place: same storage, new version
    second = cache.get(*args)
    assert second is not first
    assert torch.equal(dl.layout_to_dense(second.stream, second.tasks, second.codes, 32, 64, 15,
                                          torch.float16), packed.to_dense())


# --------------------------------------------------------------------- replay of the kernel
@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory):
    return build_host_tool(tmp_path_factory, "decode_replay")


def run_replay(exe, layout, tmp_path, tasks=None):
    files = []
    for name, t in (("stream", layout.stream), ("tasks", layout.tasks if tasks is None else tasks),
                    ("codes", layout.codes)):
        path = tmp_path / f"{name}.bin"
        t.numpy().tofile(path)
        files.append(str(path))
    return subprocess.run([exe, *files, str(layout.topk)], capture_output=True, text=True)


def parse_replay(text):
    """[(task, index, tier, offset, regs uint32 [32, 4])], s24 B sources [32, 3]."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines) and lines[i].startswith("block"):
        task, index, tier, offset = map(int, lines[i].split()[1:])
        regs = np.array([[int(v) for v in line.split()[1:]] for line in lines[i + 1:i + 33]],
                        dtype=np.uint64).astype(np.uint32)
        blocks.append((task, index, tier, offset, regs))
        i += 33
    sources = np.array([[int(v) for v in line.split()[2:]] for line in lines[i:]])
    assert sources.shape == (32, 3)
    return blocks, sources


def halves(regs, dtype):
    """uint32 registers [..., r] -> their 16-bit halves as float64 [..., r, 2] (low first)."""
    lo, hi = (regs & 0xFFFF).astype(np.uint16), (regs >> 16).astype(np.uint16)
    pair = np.stack([lo, hi], axis=-1)
    if dtype == torch.float16:
        return pair.view(np.float16).astype(np.float64)
    return (pair.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def emulate(blocks, sources, layout, x, dtype):
    """y [tokens, out] from the replayed registers, as the kernel computes and stores it."""
    tasks = dict(zip(dl.TASK_FIELDS, layout.tasks.long().T.numpy()))
    tokens, in_f = x.shape
    n_tiles = -(-tokens // 8)
    nbc = -(-in_f // B)
    xp = np.zeros((8 * n_tiles, nbc * B))
    xp[:tokens, :in_f] = x.double().numpy()
    lanes = np.arange(32)
    partial = np.zeros((len(tasks["block_row"]), 8 * n_tiles, B))
    for task, index, tier, _, regs in blocks:
        col = (tasks["first_col"][task] + index) * B
        for n in range(n_tiles):
            # Each lane's run of 4 x values (token 8n + g, block columns 4t..4t+3) = 2 registers.
            cols = col + 4 * (lanes % 4)[:, None] + np.arange(4)
            runs = xp[8 * n + lanes[:, None] // 4, cols].reshape(32, 2, 2)
            if tier == 1:
                a = halves(regs[:, :2], dtype)
                b = np.stack([runs[sources[:, 0], sources[:, 2]],
                              runs[sources[:, 1], sources[:, 2]]], axis=1)
                d = emu.mma_sp(a, b, np.zeros((32, 4)), regs[:, 2], 0)
            else:
                d = emu.mma_sync(halves(regs, dtype), runs, np.zeros((32, 4)))
            partial[task, 8 * n:8 * n + 8] += emu.gather_c(d).T
    y = np.zeros((8 * n_tiles, len(set(tasks["block_row"])) * B))
    for task in range(len(partial)):  # the epilogue: a row's segments summed in order
        row = tasks["block_row"][task]
        y[:, row * B:(row + 1) * B] += partial[task]
    return y[:tokens, :layout.out_features]


REPLAY_CASES = [  # out, in, mix, K, dtype, target tasks, tokens
    (40, 1000, "default", 15, torch.float16, 7, 1),
    (17, 4100, "mixed", 5, torch.bfloat16, 3, 16),
    (16, 9600, "default", 15, torch.float16, 1, 3),  # 600 blocks in one task: two code windows
    (24, 1024, "top-K", 64, torch.float16, 4, 9),
    (33, 260, "dense", 15, torch.bfloat16, 9, 2),
    (20, 500, "2:4", 15, torch.float16, 30, 8),
    (40, 2000, "mixed", 170, torch.bfloat16, 11, 5),  # 512-byte top-K images
    (32, 1600, "top-K", 100, torch.float16, 5, 1),
]


@pytest.mark.parametrize("out_f,in_f,mix,k,dtype,target,tokens", REPLAY_CASES)
def test_replayed_kernel_computes_x_times_w(replay_binary, tmp_path, out_f, in_f, mix, k, dtype,
                                            target, tokens):
    masked, packed = make_weight(out_f, in_f, mix, k, dtype, seed=out_f + in_f)
    layout = prepare(packed, target)
    done = run_replay(replay_binary, layout, tmp_path)
    assert done.returncode == 0, done.stderr
    blocks, sources = parse_replay(done.stdout)
    assert len(blocks) == -(-out_f // B) * -(-in_f // B)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = emulate(blocks, sources, layout, x, dtype)
    want = x.double().numpy() @ masked.double().numpy().T
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_replay_refuses_a_stream_shorter_than_its_blocks(replay_binary, tmp_path):
    _, packed = make_weight(16, 256, "default", 15, torch.float16)
    layout = prepare(packed, 1)
    tasks = layout.tasks.clone()
    tasks[0, 1] -= 2  # 32 bytes fewer: the last block never lands
    done = run_replay(replay_binary, layout, tmp_path, tasks)
    assert done.returncode == 1 and "multiplied" in done.stderr


def test_a_launch_after_one_that_stopped_part_way_reduces_at_its_own_last_task(replay_binary):
    """The split-K handshake (sk_decode::arrive) whatever count a stopped launch left: every
    launch's last task, and only it, reduces; a replayed CUDA graph (same tag) too."""
    done = subprocess.run([replay_binary, "handshake"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cases = [tuple(map(int, line.split()[1:])) for line in done.stdout.splitlines()]
    assert len(cases) == sum(range(2, 65))  # every row width 2..64 x every stopping point
    for segments, stopped, fired, left, replay in cases:
        assert (fired, left, replay) == (segments, 0, segments), (segments, stopped)
