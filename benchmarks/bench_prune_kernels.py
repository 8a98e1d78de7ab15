"""Pruning-side kernels against the memory: achieved bandwidth as a fraction of a plain copy's.

Each op is one pass over a weight-sized tensor, so its speed limit is the memory bandwidth. For
every op x backend this times the op on an OUTxIN weight (median of --iters calls), counts the
bytes it must move (read + write, listed in ``BYTES_PER_ENTRY``), and divides by the bandwidth of
``Tensor.copy_`` on a 1 GiB buffer measured in the same run. Each op's output is first compared
with the pure-torch reference's (a mismatch is recorded and not timed). Writes
``benchmarks/results/prune-kernels-<device>-<YYYYMMDD>.json`` (``--jsonl``: also a line per
record as it is measured).

  python benchmarks/bench_prune_kernels.py --device cuda          # 4096x11008, fp16
  python benchmarks/bench_prune_kernels.py --shape 1024x1024      # a quick CPU run
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from common import (append_jsonl, default_backends, median_ms, results_path,  # noqa: E402
                    significant, write_results)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bytes_moved(op: str, out_f: int, in_f: int, elem: int) -> int:
    """Bytes an ideal one-pass kernel reads and writes for one call on an out x in weight."""
    n = out_f * in_f
    if op == "wanda_scores":       # read W and the norms, write fp32 scores (+ tiny block means)
        return n * (elem + 4) + in_f * 4 + (n // 256) * 4
    if op in ("block_topk_mask", "nm_mask"):  # read scores, write a bool mask
        return n * (elem + 1)
    if op == "compress_24":        # read the blocks, write half the values + 2 bytes per row
        return n * elem + n // 2 * elem + (n // 16) * 2
    raise ValueError(op)


def copy_bandwidth_gbs(device: torch.device, warmup: int, iters: int) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / ms / 1e6


def op_calls(weight: torch.Tensor, backend: str) -> dict:
    in_f = weight.shape[1]
    norm = torch.rand(in_f, generator=torch.Generator().manual_seed(in_f)).to(weight.device)
    scores = weight.float().abs()
    blocks = sk.nm_mask(weight, 2, 4, backend="torch").to(weight.dtype) * weight
    blocks = blocks[: weight.shape[0] // 16 * 16, : in_f // 16 * 16]
    blocks = blocks.reshape(-1, 16, in_f // 16, 16).permute(0, 2, 1, 3).reshape(-1, 16, 16)
    blocks = blocks.contiguous()
    return {
        "wanda_scores": lambda: sk.wanda_scores(weight, norm, 16, backend=backend),
        "block_topk_mask": lambda: sk.block_topk_mask(scores, 15, 16, backend=backend),
        "nm_mask": lambda: sk.nm_mask(scores, 2, 4, backend=backend),
        "compress_24": lambda: sk.compress_24(blocks, backend=backend),
    }


def same_output(got, expected) -> bool:
    """Equal masks and positions, scores and values within fp32 rounding (tuples: each)."""
    if isinstance(expected, (tuple, list)):
        return len(got) == len(expected) and all(map(same_output, got, expected))
    if expected.dtype == torch.bool or not expected.is_floating_point():
        return torch.equal(got.cpu(), expected.cpu())
    return torch.allclose(got.float().cpu(), expected.float().cpu(), rtol=1e-3, atol=1e-5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x11008", help="OUTxIN (default 4096x11008)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default float16 on cuda, float32 on cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: the compiled ones that natively serve "
                        "--device)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--jsonl", default=None,
                   help="also append every record to this JSON-lines file as it is measured")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    backends = args.backends.split(",") if args.backends else default_backends(device)
    for b in backends:
        sk.backends.resolve_backend(b, device)

    copy_gbs = copy_bandwidth_gbs(device, args.warmup, args.iters)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s\n")
    weight = torch.randn(out_f, in_f, device=device).to(dtype)
    elem = weight.element_size()
    header = f"{'backend':8} {'op':16} {'ms':>9} {'GB/s':>8} {'of copy':>8}"
    print(header)
    print("-" * len(header))
    records = []
    reference = {op: call() for op, call in op_calls(weight, "torch").items()}
    for backend in backends:
        for op, call in op_calls(weight, backend).items():
            if not same_output(call(), reference[op]):
                records.append(dict(record="prune-kernel", backend=backend, op=op,
                                    output_ok=False))
                append_jsonl(args.jsonl, records[-1])
                print(f"{backend:8} {op:16} !! output differs from the reference: not timed")
                continue
            ms = median_ms(call, device, args.warmup, args.iters)
            moved = bytes_moved(op, out_f, in_f, elem)
            gbs = moved / ms / 1e6
            records.append(dict(record="prune-kernel", backend=backend, op=op,
                                dtype=str(dtype).removeprefix("torch."),
                                out_features=out_f, in_features=in_f, ms=significant(ms),
                                bytes=moved, gb_per_s=significant(gbs),
                                fraction_of_copy=significant(gbs / copy_gbs), output_ok=True))
            append_jsonl(args.jsonl, records[-1])
            print(f"{backend:8} {op:16} {ms:>9.3f} {gbs:>8.1f} {gbs / copy_gbs:>7.0%}",
                  flush=True)
    path = args.out or results_path(device, prefix="prune-kernels-")
    write_results(path, device, records, copy_gb_per_s=significant(copy_gbs),
                  command=" ".join(["bench_prune_kernels.py", *(argv or sys.argv[1:])]))
    print(f"\nwrote {path}")
    return records


if __name__ == "__main__":
    main()
