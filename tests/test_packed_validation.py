"""Packed tensors are validated before any kernel sees them: every broken rule of the layout
raises naming the tensor and the first bad entry, from a file and from a state dict; a fuzzer
corrupts saved files and the process survives every one."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sparse_kernels as sk
from conftest import random_hybrid
from sparse_kernels.format import CorruptWeightError, validate_packed


def valid():
    hw, _ = random_hybrid(37, 70, ratios=(0.3, 0.4, 0.3), seed=3)
    return hw


def _set(field, change):
    def apply(t):
        t[field] = change(t[field].clone())
    return apply


def _shift_first_col(t):
    # Move the first 2:4 block onto the column of its row's next block: two tiers share it.
    t["s24_cols"] = t["s24_cols"].clone()
    t["s24_cols"][0] = t["s24_cols"][1]


def _bad_meta(c):
    c[0, 3] = 0b0101  # group 0 picks column 1 twice
    return c


CORRUPTIONS = {
    "dense_rowptr decreases": (_set("dense_rowptr", lambda r: r.flip(0)), "dense_rowptr"),
    "rowptr ends early": (_set("topk_rowptr", lambda r: r - (r == r[-1]).int()),
                          "topk_rowptr ends at"),
    "column past the edge": (_set("s24_cols", lambda c: c + 100),
                             r"s24_cols\[0\] = \d+ is outside"),
    "columns out of order": (_shift_first_col, "s24_cols"),
    "block in the wrong tier": (_set("tier_map", lambda m: (m + 1) % 3), "tier_map says"),
    "top-K position past the block": (_set("topk_pos", lambda p: p.fill_(255).add_(1)),
                                      "topk_pos"),
    "repeated top-K position": (_set("topk_pos", lambda p: torch.zeros_like(p)), r"topk_pos\[0\]"),
    "2:4 metadata picks one column twice": (_set("s24_meta", _bad_meta), r"s24_meta\[0, 3\]"),
    "index dtype": (_set("dense_cols", lambda c: c.long()), "dense_cols has dtype torch.int64"),
    "value dtypes differ": (_set("topk_vals", lambda v: v.half()), "must share one"),
    "value shape": (_set("dense_vals", lambda v: v[:, :8]), "dense_vals has shape"),
    "missing tensor": (lambda t: t.pop("s24_meta"), "s24_meta is missing"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_each_broken_rule_is_named(corruption, tmp_path):
    change, message = CORRUPTIONS[corruption]
    hw = valid()
    tensors = hw.tensors()
    change(tensors)
    with pytest.raises(CorruptWeightError, match=message):
        validate_packed(tensors, hw.out_features, hw.in_features, hw.block_size, hw.topk)
    # From a file: the same error, naming the file.
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=hw.metadata())
    with pytest.raises(CorruptWeightError, match=message):
        sk.HybridWeight.load(path)
    # From a state dict: the module refuses before copying anything.
    module = sk.HybridSparseLinear.from_weight(hw)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {k: v for k, v in tensors.items()}
    if all(f in state for f in ("tier_map",) + sk.format.PACKED_FIELDS):
        with pytest.raises(CorruptWeightError, match=message):
            module.load_state_dict(state, strict=False)
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("block_size, topk", [(4, 3), (8, 64), (12, 20), (16, 1), (16, 256)])
@pytest.mark.parametrize("shape", [(1, 1), (37, 70), (16, 16), (5, 131)])
def test_every_valid_packing_passes(block_size, topk, shape):
    hw, _ = random_hybrid(*shape, block_size=block_size, topk=min(topk, block_size ** 2))
    hw.validate()
    sk.HybridWeight.empty(*shape, hw.tier_map, hw.topk, block_size).validate()


def test_bad_metadata_is_named(tmp_path):
    hw = valid()
    path = tmp_path / "w.safetensors"
    meta = dict(hw.metadata(), in_features="seventy")
    save_file({k: v.contiguous() for k, v in hw.tensors().items()}, path, metadata=meta)
    with pytest.raises(CorruptWeightError, match="whole number"):
        sk.HybridWeight.load(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptWeightError, match="not a readable safetensors file"):
        sk.HybridWeight.load(path)


@pytest.mark.slow
def test_fuzzed_files_raise_clear_errors_and_never_crash():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_fuzz.py")
    done = subprocess.run([sys.executable, script, "300", "0"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, \
        f"the fuzzing process died ({done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == 300
    # Every kind of corruption was tried, and most were refused with a clear error.
    kinds = {k.split(":")[0] for k in outcomes}
    assert kinds == {"truncate", "flip", "flip-header", "swap", "dtype"}
    errors = sum(v for k, v in outcomes.items() if k.endswith(":error"))
    assert errors > 150 and outcomes.get("truncate:loaded", 0) == 0
    assert set(report["errors"]) <= {"CorruptWeightError", "RuntimeError", "SafetensorError"}
