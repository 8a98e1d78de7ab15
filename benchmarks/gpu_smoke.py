"""Smoke test of the hybrid matmul on a device: is every output right, before anything is timed?

Two checks, every result a JSON line appended the moment it is known:

1. **2:4 metadata, position by position.** One 16x16 block in the 2:4 tier whose 16 rows each
   keep a different pair in each group of four columns, times the 16 one-hot tokens: output
   ``[t, o]`` must be weight ``[o, t]``, so a wrong entry names the metadata row and bit that
   misplaced it (compared with the weight unpacked on the CPU by the torch reference).
2. **Large shapes.** The default tier mix on each ``--shapes`` weight at each ``--batches``
   against ``F.linear`` on the masked weight (relative tolerance by dtype), with several K
   chunks and split paths exercised as the tests' small shapes cannot.

  python benchmarks/gpu_smoke.py --device cuda --jsonl out/smoke.jsonl
  python benchmarks/gpu_smoke.py --shapes 64x48 --batches 1,3     # CPU, seconds

Exit status 1 if any output is wrong.
"""
import argparse
import functools
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from bench_linear import (DTYPES, TOLERANCE, applies, kernel_variant,  # noqa: E402
                          make_weight, output_error, parse_shapes)
from common import TIER_MIXES, append_jsonl, default_backends, significant  # noqa: E402
from sparse_kernels.backends import CUDA_KERNELS  # noqa: E402
from sparse_kernels.reference import unpack_blocks  # noqa: E402

# The six ways to keep 2 of 4 columns.
PAIRS = list(itertools.combinations(range(4), 2))


def pattern_block(dtype: torch.dtype) -> torch.Tensor:
    """A 16x16 2:4 weight: row r keeps pair ``(r + 3 g) % 6`` of column group g, so no two rows
    share a pattern; every kept value distinct (and exact in 16 bits)."""
    weight = torch.zeros(16, 16)
    for r in range(16):
        for g in range(4):
            for c in PAIRS[(r + 3 * g) % 6]:
                weight[r, 4 * g + c] = 1 + (r * 16 + 4 * g + c) / 8
    return weight.to(dtype)


def check_metadata(backend: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Check 1 of the module docstring for one backend: the wrong entries, if any."""
    weight = pattern_block(dtype)
    tiers = torch.full((1, 1), sk.SPARSE_24, dtype=torch.int8)
    packed = sk.HybridWeight.from_dense(weight, tiers, 15).to(device)
    expected = unpack_blocks(*packed.to("cpu").packed_tensors(), 16, 16).float()  # [out, in]
    tokens = torch.eye(16, dtype=dtype, device=device)  # token t is one-hot at input t
    got = sk.hybrid_linear(tokens, packed, backend=backend).float().cpu().t()  # [out, in]
    wrong = (got != expected).nonzero().tolist()
    return dict(record="smoke", check="metadata-2:4", backend=backend,
                dtype=str(dtype).removeprefix("torch."),
                ok=not wrong, wrong_entries=len(wrong),
                first_wrong=[dict(row=r, col=c, expected=float(expected[r, c]),
                                  got=float(got[r, c]), group=c // 4, meta_row=r)
                             for r, c in wrong[:8]])


@functools.lru_cache(maxsize=4)
def shape_weight(shape, topk, dtype, device):
    """(masked, packed) of a shape, built once for every backend, kernel and batch."""
    return make_weight(*shape, TIER_MIXES["hybrid"], topk, dtype, device)[2:]


def check_shape(backend: str, shape, batch: int, device, dtype, topk: int = 15) -> dict:
    """Check 2 of the module docstring for one backend, shape and batch."""
    masked, packed = shape_weight(tuple(shape), topk, dtype, device)
    x = torch.randn(batch, shape[1], device=device).to(dtype)
    error = output_error(lambda v: sk.hybrid_linear(v, packed, backend=backend), x, masked)
    return dict(record="smoke", check="large-shape", backend=backend,
                dtype=str(dtype).removeprefix("torch."),
                out_features=shape[0], in_features=shape[1], batch=batch,
                max_rel_error=significant(error), ok=error <= TOLERANCE[dtype])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default float16 on cuda, float32 on cpu")
    p.add_argument("--backends", default=None,
                   help="default: the compiled ones that natively serve --device")
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--batches", default="1,16,2048")
    p.add_argument("--jsonl", default=None, help="append every result to this JSON-lines file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    backends = args.backends.split(",") if args.backends else default_backends(device)
    for b in backends:
        sk.backends.resolve_backend(b, device)
    # The cuda backend once per kernel (v1, v2, unpack), v1 first: a newer kernel's fault that
    # spoils the CUDA context then costs only the checks after it.
    variants = [(b, v) for b in backends for v in (CUDA_KERNELS if b == "cuda" else [None])]
    active_isa = sk.cpu_isa()
    failed = 0
    # The metadata check multiplies 16 one-hot tokens: v1 and v2 (unpack has no 2:4 metadata).
    results = [(b, v, lambda b=b: check_metadata(b, device, dtype)) for b, v in variants
               if applies(b, v, 16)]
    results += [(b, v, lambda b=b, s=s, n=n: check_shape(b, s, n, device, dtype))
                for b, v in variants for s in parse_shapes(args.shapes)
                for n in map(int, args.batches.split(",")) if applies(b, v, n)]
    for backend, variant, make in results:
        try:
            with kernel_variant(backend, variant, active_isa):
                result = make()
        except Exception as exc:  # a crash is a result too; the next check still runs
            result = dict(record="smoke", check="error", backend=backend, ok=False,
                          error=f"{type(exc).__name__}: {exc}")
        if variant is not None:
            result["backend"] = f"{backend}/{variant}"
        append_jsonl(args.jsonl, result)
        failed += not result["ok"]
        shown = {k: v for k, v in result.items() if k not in ("check", "ok")}
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {result['check']:13} {shown}", flush=True)
    print(f"{len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
