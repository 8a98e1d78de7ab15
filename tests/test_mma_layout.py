"""The CUDA kernel's per-lane fragment index math against an emulator of the PTX layouts (CPU).

tests/csrc/mma_layout_dump.cpp builds every lane's registers from canonical packed blocks with the
index functions the kernel uses (csrc/cuda/mma_layout.cuh); tests/mma_emulator.py rebuilds the
matrices from those registers as the tensor cores would. Their product must equal x @ W^T of the
block the packed format stands for.
"""
import os
import subprocess

import numpy as np
import pytest
import torch

import mma_emulator as emu
from conftest import build_host_tool
import sparse_kernels as sk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, TOKENS, K = 16, 8, 15


@pytest.fixture(scope="module")
def dump_binary(tmp_path_factory):
    return build_host_tool(tmp_path_factory, "mma_layout_dump")


def _two_four_block(g):
    """A 16x16 block with 0, 1 or 2 non-zeros in each aligned group of 4 (padded slots included)."""
    block = torch.zeros(B, B)
    for row in range(B):
        for group in range(B // 4):
            kept = torch.randperm(4, generator=g)[:int(torch.randint(0, 3, (1,), generator=g))]
            block[row, 4 * group + kept] = torch.randn(len(kept), generator=g)
    return block


def _topk_block(g, nonzeros):
    block = torch.zeros(B * B)
    block[torch.randperm(B * B, generator=g)[:nonzeros]] = torch.randn(nonzeros, generator=g)
    return block.reshape(B, B)


def make_case(seed, topk_nonzeros=K):
    """A 16x48 weight packed with tier map [dense, 2:4, top-K], and an x tile [8, 16]."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.cat([torch.randn(B, B, generator=g), _two_four_block(g),
                        _topk_block(g, topk_nonzeros)], dim=1)
    packed = sk.HybridWeight.from_dense(weight, torch.tensor([[0, 1, 2]], dtype=torch.int8), K, B)
    x = torch.randn(TOKENS, B, generator=g)
    return packed, x


def run_dump(exe, packed, x):
    fields = [packed.dense_vals.flatten(), packed.s24_vals.flatten(), packed.s24_meta.flatten(),
              torch.tensor([packed.topk]), packed.topk_vals.flatten(), packed.topk_pos.flatten(),
              x.flatten()]
    text = " ".join(" ".join(repr(v) for v in f.tolist()) for f in fields)
    out = subprocess.run([exe], input=text, capture_output=True, text=True, check=True).stdout
    return parse_dump(out)


def parse_dump(text):
    regs = {"dense_a": np.zeros((32, 4, 2)), "topk_a": np.zeros((32, 4, 2)),
            "dense_b": np.zeros((32, 2, 2)), "s24_b": np.zeros((32, 2, 2)),
            "s24_a": np.zeros((32, 2, 2)), "s24_meta": np.zeros(32, np.uint32),
            "acc": np.zeros((32, 4, 2), np.int64)}
    for line in text.splitlines():
        name, *vals = line.split()
        if name == "selector":
            regs["selector"] = int(vals[0])
        elif name == "s24_meta":
            regs[name][int(vals[0])] = int(vals[1])
        elif name == "acc":
            lane, i, row, token = map(int, vals)
            regs[name][lane, i] = row, token
        else:
            lane, reg = int(vals[0]), int(vals[1])
            regs[name][lane, reg] = float(vals[2]), float(vals[3])
    return regs


def stored_output(d_regs, acc_map):
    """[tokens, 16] output as the kernel's epilogue stores the accumulator registers."""
    out = np.full((TOKENS, B), np.nan)
    for lane in range(32):
        for i in range(4):
            row, token = acc_map[lane, i]
            assert np.isnan(out[token, row]), f"two accumulators stored to ({token}, {row})"
            out[token, row] = d_regs[lane, i]
    return out


def products(regs):
    """Per tier, the emulated tensor-core result as stored by the kernel: [tokens, 16]."""
    zero = np.zeros((32, 4))
    dense = emu.mma_sync(regs["dense_a"], regs["dense_b"], zero)
    s24 = emu.mma_sp(regs["s24_a"], regs["s24_b"], zero, regs["s24_meta"], regs["selector"])
    topk = emu.mma_sync(regs["topk_a"], regs["dense_b"], zero)
    return {t: stored_output(d, regs["acc"]) for t, d in
            (("dense", dense), ("2:4", s24), ("top-K", topk))}


def expected(packed, x):
    w = packed.to_dense().double().numpy()
    xd = x.double().numpy()
    return {t: xd @ w[:, B * i:B * (i + 1)].T for i, t in enumerate(("dense", "2:4", "top-K"))}


# --------------------------------------------------------------------- the emulator itself
def test_emulator_dense_matches_matmul_from_ptx_tables():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 8))
    c = rng.standard_normal((16, 8))
    a_regs = np.array([[[a[emu.a_coord(l, 2 * r + h)] for h in range(2)] for r in range(4)]
                       for l in range(32)])
    b_regs = np.array([[[b[emu.b_coord(l, 2 * r + h)] for h in range(2)] for r in range(2)]
                       for l in range(32)])
    d = emu.gather_c(emu.mma_sync(a_regs, b_regs, emu.scatter_d(c)))
    np.testing.assert_allclose(d, a @ b + c, rtol=1e-12)


def test_emulator_rejects_unordered_metadata():
    regs = np.zeros((32, 2, 2))
    meta = np.full(32, 0b0100_0100_0100_0100 * 0x10001, np.uint32)  # chunk indices (0, 1): valid
    emu.mma_sp(regs, np.zeros((32, 2, 2)), np.zeros((32, 4)), meta, 0)
    meta[4] = 0  # indices (0, 0) for rows 1 and 9
    with pytest.raises(ValueError, match="strictly increasing"):
        emu.mma_sp(regs, np.zeros((32, 2, 2)), np.zeros((32, 4)), meta, 0)


# --------------------------------------------------------------------- the kernel's index math
@pytest.mark.parametrize("seed,topk_nonzeros", [(0, K), (1, K), (2, 6), (3, 0)])
def test_kernel_fragments_give_block_product(dump_binary, seed, topk_nonzeros):
    packed, x = make_case(seed, topk_nonzeros)
    got = products(run_dump(dump_binary, packed, x))
    for tier, want in expected(packed, x).items():
        np.testing.assert_allclose(got[tier], want, rtol=1e-6, atol=1e-6, err_msg=tier)


def test_two_four_case_covers_padded_slots():
    packed, _ = make_case(0)
    kept = (sk.reference.decompress_24(packed.s24_vals, packed.s24_meta) != 0)
    per_group = kept.reshape(B, B // 4, 4).sum(-1)
    assert {0, 1, 2} <= set(per_group.flatten().tolist())


@pytest.mark.parametrize("mutation", ["swap meta rows", "swap dense regs", "shift store token",
                                      "wrong selector"])
def test_wrong_layout_is_detected(dump_binary, mutation):
    """Guards the test itself: a plausible layout mistake must change the stored product."""
    packed, x = make_case(0)
    regs = run_dump(dump_binary, packed, x)
    if mutation == "swap meta rows":
        m = regs["s24_meta"]
        regs["s24_meta"] = ((m >> 16) | (m << 16)).astype(np.uint32)
    elif mutation == "swap dense regs":
        regs["dense_a"] = regs["dense_a"][:, [0, 2, 1, 3]]
    elif mutation == "shift store token":
        regs["acc"][:, :, 1] = (regs["acc"][:, :, 1] + 1) % TOKENS
    else:
        regs["selector"] = 1
        regs["s24_meta"] = np.where(np.arange(32) % 4 == 1, 0x4444_4444, regs["s24_meta"])
    try:
        got = products(regs)
    except ValueError:
        return  # the emulator refused the registers: detected
    want = expected(packed, x)
    assert any(not np.allclose(got[t], want[t], rtol=1e-6, atol=1e-6) for t in want)
