"""Corrupt saved packed weights at random and load them: run as a script (in a subprocess, so a
crash shows as a dead child instead of killing pytest) by test_packed_validation.py.

  python tests/packed_fuzz.py CASES SEED

Each case saves a random valid HybridWeight (and the state dict of a HybridSparseLinear), then
truncates it, flips bytes, swaps two tensors' names or rewrites one tensor in another dtype, and
loads it back. Every load must either raise a clear error or give a weight that passes
validation, and then the kernels must run on it. Prints one JSON line: outcome counts and the
error types seen.
"""
import json
import os
import random
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from conftest import random_hybrid  # noqa: E402
from sparse_kernels.format import CorruptWeightError  # noqa: E402

EXPECTED_ERRORS = (CorruptWeightError, RuntimeError)  # RuntimeError: load_state_dict's own


def corrupt(path: str, rng: random.Random) -> str:
    data = bytearray(open(path, "rb").read())
    kind = rng.choice(["truncate", "flip", "flip-header", "swap", "dtype"])
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind in ("flip", "flip-header"):
        header = int.from_bytes(data[:8], "little") + 8
        lo, hi = (0, header) if kind == "flip-header" else (header, len(data))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    else:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        names = sorted(tensors)
        if kind == "swap":
            a, b = rng.sample(names, 2)
            tensors[a], tensors[b] = tensors[b], tensors[a]
        else:
            name = rng.choice(names)
            tensors[name] = tensors[name].to(rng.choice([torch.int64, torch.float32,
                                                         torch.int8, torch.float16]))
        save_file(tensors, path, metadata=meta)
        return kind
    open(path, "wb").write(data)
    return kind


def run_kernels(weight: sk.HybridWeight) -> None:
    x = torch.randn(3, weight.in_features).to(weight.dtype)
    for backend in sk.available_backends():
        if backend in ("cpu", "torch"):
            sk.hybrid_linear(x, weight, backend=backend)


def main(cases: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes, errors = {}, {}
    folder = tempfile.mkdtemp()
    for case in range(cases):
        shape = (rng.randint(1, 40), rng.randint(1, 70))
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        hw, _ = random_hybrid(*shape, dtype=dtype, topk=rng.choice([1, 7, 15, 64]), seed=case)
        via_module = case % 2 == 1
        path = os.path.join(folder, f"{case}.safetensors")
        if via_module:
            module = sk.HybridSparseLinear.from_weight(hw)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
        else:
            hw.save(path)
        kind = corrupt(path, rng)
        try:
            if via_module:
                fresh = sk.HybridSparseLinear.from_weight(hw)
                fresh.load_state_dict(load_file(path))
                loaded = fresh.hybrid_weight
            else:
                loaded = sk.HybridWeight.load(path)
            loaded.validate()
            run_kernels(loaded)
            result = "loaded"
        except EXPECTED_ERRORS as err:
            result = "error"
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
        except Exception as err:  # safetensors' errors, when load_file reads a broken file
            if via_module and type(err).__name__ == "SafetensorError":
                result = "error"
                errors["SafetensorError"] = errors.get("SafetensorError", 0) + 1
            else:
                raise
        outcomes[f"{kind}:{result}"] = outcomes.get(f"{kind}:{result}", 0) + 1
    return {"outcomes": outcomes, "errors": errors}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
