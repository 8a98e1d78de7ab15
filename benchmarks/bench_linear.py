"""Hybrid matmul vs dense F.linear on LLM weight shapes, measured side by side in one run.

For every shape x tier mix x batch it first times the baselines - dense ``F.linear`` on the
masked weight (kernel ``cublas`` on CUDA, ``F.linear`` elsewhere) and, on CUDA with 16-bit
values, the one a 2:4 user would pick: ``F.linear`` on the whole weight pruned 2:4 (its mask from
the torch reference) and converted with ``torch.sparse.to_sparse_semi_structured`` (kernel
``torch-2:4``; 50 % sparse, not the hybrid mix) - and writes their records; then each of our
kernels (``cuda-v1``, ``cuda-v2``, ``cuda-unpack``, ``triton``, ``cpu-<isa>``, ``torch``) in a
guard: its output is checked against ``F.linear`` on the weight it stands for (relative tolerance
by dtype; a wrong output or an exception is recorded as such and not timed), then it is timed.
Every record names its ``kernel``; ours carry ``speedup`` over the dense baseline of the same
run, v2 also its task count, blocks and achieved GB/s. Prints a table and writes
``benchmarks/results/<device>-<YYYYMMDD>.json`` (``--jsonl``: also one line per record the moment
it is measured).

CPU times are the median of --iters calls, each after a cache flush. GPU times are kernel-only:
CUDA events around --iters calls queued without a synchronisation, each after an L2 flush, minus
the flushes alone, measured --repeats times (all written, ``ms`` is their median); the per-call
time with its host overhead (sync, Python, dispatch) is recorded beside it (``call_ms``).

  python benchmarks/bench_linear.py                  # LLaMA-2-7B shapes, batch 1/4/16/128
  python benchmarks/bench_linear.py --quick          # one small shape, a few seconds
  python benchmarks/bench_linear.py --device cuda --dtype float16
"""
import argparse
import contextlib
import dataclasses
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from common import (TIER_MIXES, CacheFlusher, append_jsonl, default_backends,  # noqa: E402
                    kernel_ms, median_ms, relative_error, results_path, significant,
                    write_results)
from sparse_kernels import apply_tier_map, assign_tiers  # noqa: E402
from sparse_kernels.quant import dequantize, group_scales, quantize  # noqa: E402
from sparse_kernels.rules import QMAX, group_size_for  # noqa: E402
from sparse_kernels.backends import (CUDA_KERNELS, DECODE_ENV, DECODE_MAX_ROWS,  # noqa: E402
                                     PREFILL_ENV)

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008,1024x1024"
QUICK_SHAPES = "1024x1024"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest |hybrid - dense| over the largest |dense| output a correct kernel stays within: the two
# sum the same products in different orders (and 16-bit outputs round once more).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated OUTxIN weight shapes (default {DEFAULT_SHAPES})")
    p.add_argument("--batches", default="1,4,16,128", help="rows of x (default 1,4,16,128)")
    p.add_argument("--mixes", default=",".join(TIER_MIXES),
                   help=f"tier mixes among {', '.join(TIER_MIXES)}")
    p.add_argument("--topk", type=int, default=15, help="K of top-K blocks (default 15)")
    p.add_argument("--bits", default="16,8,4",
                   help="precisions of the hybrid values, side by side: 16 (the float dtype), 8 "
                        "or 4 (codes with fp16 group scales; these also time torch's dense int8 / "
                        "int4 weight-only CPU kernels); default 16,8,4")
    p.add_argument("--group-size", type=int, default=128,
                   help="preferred quantization group (rules.group_size_for; default 128)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="value dtype (default float32 on cpu, float16 on cuda)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: the compiled ones that natively serve "
                        "--device)")
    p.add_argument("--cpu-isas", default=None,
                   help="comma-separated instruction sets the cpu backend is timed with, side by "
                        "side (generic, avx2, avx512; default: the best this CPU runs)")
    p.add_argument("--cuda-kernels", default=",".join(CUDA_KERNELS),
                   help="comma-separated CUDA kernels timed side by side where they apply: v1 "
                        "(canonical format, any batch), v2 (prepared layout, batch <= 16), unpack "
                        "(dense matrix + cuBLAS, batch > 16); default all three")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement")
    p.add_argument("--repeats", type=int, default=None,
                   help="independent measurements of each (all written, the median is `ms`; "
                        "default 3 on cuda, 1 on cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--warm-cache", action="store_true",
                   help="do not evict the weight from the caches between calls (by default each "
                        "timed call starts cold, as a layer does in decode)")
    p.add_argument("--quick", action="store_true",
                   help=f"only {QUICK_SHAPES}, batches 1 and 16, hybrid mix")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--jsonl", default=None,
                   help="also append every record to this JSON-lines file as it is measured")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.batches, args.mixes = "1,16", "hybrid"
    args.shapes = args.shapes or DEFAULT_SHAPES
    return args


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        try:
            out_f, in_f = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not OUTxIN (e.g. 4096x11008)")
        shapes.append((out_f, in_f))
    return shapes


def make_weight(out_f, in_f, ratios, topk, dtype, device):
    """A random weight pruned to ``ratios`` by Wanda-style block scores (unit activations):
    ``(weight, tier map, masked weight, packed)``, the last two on ``device``."""
    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    weight = torch.randn(out_f, in_f, generator=g)
    scores, block_scores = sk.wanda_scores(weight, torch.ones(in_f))
    tiers = assign_tiers(block_scores, ratios)
    masked = apply_tier_map(weight, tiers, topk, scores=scores).to(dtype)
    packed = sk.HybridWeight.from_dense(masked, tiers, topk)
    return weight, tiers, masked.to(device), packed.to(device)


def torch_lowbit_baseline(weight: torch.Tensor, bits: int, group_size: int):
    """torch's own dense weight-only kernel at ``bits`` on the CPU (the one torchao uses), on the
    whole unpruned ``weight``: ``((dequantized weight, {x dtype: x -> y}, bytes), None)``, or
    ``(None, why not)``. int4: symmetric codes in groups of ``group_size`` (stored as code + 8
    with zero points 0) and bf16 scales; int8: one scale per row."""
    if weight.device.type != "cpu":
        return None, "torch's int4 / int8 weight-only kernels here are the CPU ones"
    w = weight.float()
    in_f = w.shape[1]
    # Off these widths torch's kernels read past a row (int8 with bf16 x crashes at 200 columns).
    if in_f % 32 or bits == 4 and in_f % group_size:
        return None, (f"torch's int{bits} CPU kernel needs in_features a multiple of 32"
                      f"{f' and of the group {group_size}' if bits == 4 else ''}, got {in_f}")
    if bits == 4:
        scales = group_scales(w, 4, group_size).to(torch.bfloat16)
        codes = quantize(w, scales, 4, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int() + 8, 2)
        scale_zero = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).contiguous()
        calls = {dt: (lambda x, sz=scale_zero.to(dt): torch.ops.aten._weight_int4pack_mm_for_cpu(
                     x, packed, group_size, sz)) for dt in (torch.float32, torch.bfloat16)}
        return (dequantize(codes, scales, group_size), calls,
                packed.numel() + scale_zero.numel() * 2), None
    scales = (w.abs().amax(1) / QMAX[8]).clamp_min(1e-12)
    codes = (w / scales[:, None]).round().clamp(-QMAX[8], QMAX[8]).to(torch.int8)
    calls = {dt: (lambda x, s=scales.to(dt): torch.ops.aten._weight_int8pack_mm(x, codes, s))
             for dt in (torch.float32, torch.bfloat16)}
    return (codes.float() * scales[:, None], calls, codes.numel() + scales.numel() * 2), None


def semi_structured_baseline(masked: torch.Tensor):
    """``((W_24, x -> F.linear(x, W_24 semi-structured)), None)``: torch's 2:4 kernels on the
    weight pruned 2:4, with the dense ``W_24`` to check them against; or ``(None, why not)``."""
    if masked.device.type != "cuda" or masked.dtype not in (torch.float16, torch.bfloat16):
        return None, "torch's semi-structured 2:4 needs CUDA and float16/bfloat16"
    weight_24 = masked * sk.nm_mask(masked.abs(), 2, 4, backend="torch")
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight_24)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return None, f"to_sparse_semi_structured failed: {exc}"
    return (weight_24, lambda x: F.linear(x, sparse)), None


def output_error(fn, x: torch.Tensor, weight: torch.Tensor) -> float:
    """max |fn(x) - F.linear(x, weight)| / max |F.linear(x, weight)|, in fp32."""
    expected = F.linear(x, weight)
    got = fn(x)
    if got.shape != expected.shape:
        return float("inf")
    return relative_error(got, expected)


class Timer:
    """Times a call as the device allows (see the module docstring): a ``Timing`` whose
    ``ms_repeats`` are ``repeats`` independent measurements (kernel-only on a GPU) and whose
    ``call_ms`` includes the host (None on the CPU, where the two are one measurement)."""

    def __init__(self, device, warmup, iters, flush, repeats):
        self.device, self.warmup, self.iters, self.flush = device, warmup, iters, flush
        self.repeats = repeats

    def __call__(self, fn) -> "Timing":
        if self.device.type != "cuda":
            return Timing([median_ms(fn, self.device, self.warmup, self.iters, self.flush)
                           for _ in range(self.repeats)], None)
        call = median_ms(fn, self.device, self.warmup, self.iters, self.flush)
        return Timing([kernel_ms(fn, self.device, self.iters, self.flush)
                       for _ in range(self.repeats)], call)


class Timing:
    def __init__(self, ms_repeats: list[float], call_ms: float | None):
        self.ms_repeats, self.call_ms = ms_repeats, call_ms
        self.ms = statistics.median(ms_repeats)

    def fields(self) -> dict:
        rec = dict(ms=significant(self.ms), ms_repeats=[significant(v) for v in self.ms_repeats])
        if self.call_ms is not None:
            rec["call_ms"] = significant(self.call_ms)
        return rec


def kernel_label(backend: str, variant: str | None, device: torch.device) -> str:
    """What a record calls the code it timed: ``cublas`` / ``F.linear`` (the dense baseline on
    CUDA / elsewhere), ``torch-2:4``, ``cuda-v1`` / ``cuda-v2`` / ``cuda-unpack``, ``triton``,
    ``cpu-<isa>``, ``torch`` (the reference)."""
    if backend == "dense":
        return "cublas" if device.type == "cuda" else "F.linear"
    return backend if variant is None else f"{backend}-{variant}"


def measure(fn, reference, x, tolerance, timer) -> dict:
    """Check ``fn(x)`` against ``reference`` (the dense weight it stands for), then time it; a
    wrong output is recorded and not timed, and an exception is recorded as the error."""
    try:
        error = output_error(fn, x, reference)
        if error > tolerance:
            return dict(output_ok=False, max_rel_error=significant(error))
        timing = timer(lambda: fn(x))
        return dict(output_ok=True, max_rel_error=significant(error), **timing.fields())
    except Exception as exc:  # a crash is a result: the records after it still get made
        return dict(output_ok=False, error=f"{type(exc).__name__}: {exc}")


def with_speedup(rec: dict, dense: dict) -> dict:
    """``rec`` with the dense baseline's time of the same shape and batch, and its speedup."""
    if "ms" not in rec or "ms" not in dense:
        return rec
    return dict(rec, dense_ms=dense["ms"], speedup=significant(dense["ms"] / rec["ms"]))


def decode_layout_fields(packed: sk.HybridWeight, x: torch.Tensor, ms: float) -> dict:
    """The v2 kernel's layout: its tasks, the weight's blocks, the bytes a call moves (layout,
    x, y) and the rate that makes at ``ms``."""
    layout = packed.decode_cache.layout
    if layout is None:
        return {}
    moved = layout.nbytes + (x.numel() + x.shape[0] * packed.out_features) * x.element_size()
    return dict(tasks=int(layout.tasks.shape[0]), blocks=int(packed.tier_map.numel()),
                layout_bytes=layout.nbytes, bytes_moved=moved,
                gb_per_s=significant(moved / ms / 1e6))


def applies(backend, variant, batch) -> bool:
    """Whether a CUDA kernel serves ``batch`` rows (v2 decode only, unpack prefill only)."""
    if backend != "cuda" or variant in (None, "v1"):
        return True
    return (variant == "v2") == (batch <= DECODE_MAX_ROWS)


@contextlib.contextmanager
def kernel_variant(backend, variant, active_isa):
    """Run the block with the cpu backend's ISA or the CUDA kernel ``variant`` (both the decode
    and the prefill choice set to it where it is one)."""
    if backend == "cpu":
        sk.cpu_isa(variant)
    saved = {name: os.environ.get(name) for name in (DECODE_ENV, PREFILL_ENV)}
    if backend == "cuda" and variant is not None:
        os.environ[DECODE_ENV] = "v2" if variant == "v2" else "v1"
        os.environ[PREFILL_ENV] = "unpack" if variant == "unpack" else "v1"
    try:
        yield
    finally:
        sk.cpu_isa(active_isa)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure_hybrid(hw, reference, x, backend, variant, active_isa, tolerance, timer, dense):
    """One of our kernels on packed weight ``hw`` (checked against ``reference``, the weight it
    stands for), with its speedup over the ``dense`` record; v2 also with its layout."""
    def hybrid(v):
        return sk.hybrid_linear(v, hw, backend=backend)
    with kernel_variant(backend, variant, active_isa):
        rec = with_speedup(measure(hybrid, reference.to(x.dtype), x, tolerance, timer), dense)
    if kernel_label(backend, variant, x.device) == "cuda-v2" and "ms" in rec:
        rec.update(decode_layout_fields(hw, x, rec["ms"]))
    return rec


def print_row(rec):
    shape = f"{rec['out_features']}x{rec['in_features']}"
    start = (f"{rec['kernel']:12} {rec['dtype']:9} {rec.get('bits', 16):>4} {shape:>11} "
             f"{rec['mix']:9} {rec['batch']:>5}")
    if not rec["output_ok"]:
        why = rec.get("error") or f"wrong output (max relative error {rec['max_rel_error']:.3g})"
        print(f"{start}  !! {why}: not timed", flush=True)
        return
    speedup = f"{rec['speedup']:>6.2f}x" if "speedup" in rec else f"{'':>7}"
    calls = f"  (per call {rec['call_ms']:.4f})" if "call_ms" in rec else ""
    rate = f"  {rec['gb_per_s']:.0f} GB/s, {rec['tasks']} tasks" if "gb_per_s" in rec else ""
    print(f"{start} {rec['ms']:>9.4f} {speedup} "
          f"{rec['packed_bytes'] / rec['dense_bytes']:>12.3f}{calls}{rate}", flush=True)


@dataclasses.dataclass
class Run:
    """What every measurement of one bench_linear run shares."""
    device: torch.device
    dtype: torch.dtype
    topk: int
    bits: list
    group_size: int  # the preferred one (rules.group_size_for picks per input width)
    batches: list
    variants: list  # (backend, variant) of the float kernels
    lowbit_variants: list  # and of the low-bit ones
    active_isa: str
    timer: "Timer"
    keep: object  # record -> None: prints and saves it
    torch_lowbit_ms: dict = dataclasses.field(default_factory=dict)  # (shape, batch, bits)


def bench_shape(run: Run, shape, mix: str, with_baselines: bool) -> None:
    """Every record of one weight shape and tier mix: per batch the baselines (``F.linear``; with
    ``with_baselines`` also torch-2:4 and torch's dense int8 / int4), then each of our kernels on
    the same structure at each precision of ``run.bits``."""
    device, dtype, tolerance = run.device, run.dtype, TOLERANCE[run.dtype]
    ratios = TIER_MIXES[mix]
    group_size = group_size_for(shape[1], run.group_size)
    weight, tiers, masked, packed = make_weight(*shape, ratios, run.topk, dtype, device)
    # The same structure at every precision: (the weight it stands for, packed).
    weights = {16: (masked, packed)} if 16 in run.bits else {}
    for bits in (b for b in run.bits if b < 16):
        low = sk.HybridWeight.from_dense(masked.float().cpu(), tiers, run.topk, bits=bits,
                                         group_size=group_size).to(device)
        weights[bits] = (low.to_dense(), low)
    baseline_24, why_not = (semi_structured_baseline(masked) if with_baselines
                            else (None, None))
    if why_not:
        print(f"(no torch-2:4 baseline for {shape}: {why_not})")
    lowbit_baselines = {}
    for bits in (b for b in run.bits if b < 16 and with_baselines):
        lowbit_baselines[bits], why_not = torch_lowbit_baseline(weight, bits, group_size)
        if why_not:
            print(f"(no torch int{bits} baseline for {shape}: {why_not})")
    for batch in run.batches:
        x = torch.randn(batch, shape[1], device=device).to(dtype)
        common = dict(record="linear", mix=mix, dtype=str(dtype).removeprefix("torch."), bits=16,
                      out_features=shape[0], in_features=shape[1], batch=batch,
                      tier_ratios=list(ratios), topk=run.topk, packed_bytes=packed.nbytes,
                      ideal_bytes=packed.ideal_nbytes, dense_bytes=packed.dense_nbytes)
        # The baselines first, each written before any of our kernels runs: a kernel that brings
        # the process down cannot take them with it.
        dense = dict(common, kernel=kernel_label("dense", None, device), backend="torch",
                     **measure(lambda v: F.linear(v, masked), masked, x, tolerance, run.timer))
        run.keep(dense)
        if baseline_24 is not None:
            weight_24, call_24 = baseline_24
            half = shape[0] * shape[1] * masked.element_size()
            run.keep(dict(common, kernel="torch-2:4", backend="torch", mix="all-2:4",
                          tier_ratios=[0.0, 1.0, 0.0], packed_bytes=half // 2 + half // 16,
                          ideal_bytes=half // 2 + half // 16, dense_bytes=half,
                          **with_speedup(measure(call_24, weight_24, x, tolerance, run.timer),
                                         dense)))
        for bits, baseline in lowbit_baselines.items():
            if baseline is not None:
                bench_torch_lowbit(run, baseline, bits, x, common, dense,
                                   group_size if bits == 4 else shape[1])
        for bits, (reference, hw) in weights.items():
            fields = dict(common, bits=bits, packed_bytes=hw.nbytes, ideal_bytes=hw.ideal_nbytes,
                          dense_bytes=hw.dense_nbytes)
            if bits < 16:
                fields["group_size"] = group_size
            for backend, variant in (run.variants if bits == 16 else run.lowbit_variants):
                if not applies(backend, variant, batch):
                    continue
                rec = measure_hybrid(hw, reference, x, backend, variant, run.active_isa,
                                     tolerance, run.timer, dense)
                versus = run.torch_lowbit_ms.get((shape, batch, bits))
                if versus is not None and "ms" in rec:
                    rec.update(torch_lowbit_ms=versus,
                               speedup_vs_torch_lowbit=significant(versus / rec["ms"]))
                run.keep(dict(fields, kernel=kernel_label(backend, variant, device),
                              backend=backend, **rec))


def bench_torch_lowbit(run: Run, baseline, bits: int, x, common: dict, dense: dict,
                       group_size: int) -> None:
    """torch's dense int``bits`` kernel with x in each dtype it takes; keeps its fastest time
    for our low-bit records of the same shape and batch to compare with."""
    reference, calls, nbytes = baseline
    for x_dtype, call in calls.items():
        xb = x.to(x_dtype)
        rec = with_speedup(measure(call, reference.to(x_dtype), xb, TOLERANCE[x_dtype],
                                   run.timer), dense)
        run.keep(dict(common, kernel=f"torch-int{bits}", backend="torch", mix="all-dense",
                      dtype=str(x_dtype).removeprefix("torch."), bits=bits,
                      group_size=group_size, tier_ratios=[1.0, 0.0, 0.0], packed_bytes=nbytes,
                      ideal_bytes=nbytes, dense_bytes=common["out_features"] * x.shape[1] * 2,
                      **rec))
        if "ms" in rec:
            key = ((common["out_features"], x.shape[1]), x.shape[0], bits)
            run.torch_lowbit_ms[key] = min(rec["ms"], run.torch_lowbit_ms.get(key, rec["ms"]))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    backends = args.backends.split(",") if args.backends else default_backends(device)
    for b in backends:
        sk.backends.resolve_backend(b, device)  # fail now, not after an hour
    isas = args.cpu_isas.split(",") if args.cpu_isas else [sk.cpu_isa()]
    if "cpu" in backends:
        unsupported = [i for i in isas if i not in sk.supported_cpu_isas()]
        if unsupported:
            raise SystemExit(f"--cpu-isas: this CPU runs {sk.supported_cpu_isas()}, "
                             f"not {unsupported}")
    kernels = args.cuda_kernels.split(",")
    if any(k not in CUDA_KERNELS for k in kernels):
        raise SystemExit(f"--cuda-kernels: choose from {', '.join(CUDA_KERNELS)}, got "
                         f"{args.cuda_kernels}")
    # (backend, variant): the cpu backend once per instruction set, the cuda backend once per
    # kernel, side by side.
    choices = {"cpu": isas, "cuda": kernels}
    variants = [(b, v) for b in backends for v in choices.get(b, [None])]
    active_isa = sk.cpu_isa()
    mixes = args.mixes.split(",")
    unknown = [m for m in mixes if m not in TIER_MIXES]
    if unknown:
        raise SystemExit(f"--mixes: unknown {unknown}; choose from {list(TIER_MIXES)}")
    batches = [int(b) for b in args.batches.split(",")]
    try:
        bits_list = [sk.rules.check_bits(int(b)) for b in args.bits.split(",")]
    except ValueError as exc:
        raise SystemExit(f"--bits: {exc}")
    # Low-bit values have one CUDA path (hybrid_linear_q), not the three float kernels.
    lowbit_variants = list(dict.fromkeys((b, None if b == "cuda" else v) for b, v in variants))
    flush = None if args.warm_cache else CacheFlusher(device)
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    timer = Timer(device, args.warmup, args.iters, flush, repeats)

    records = []

    def keep(rec):
        records.append(rec)
        append_jsonl(args.jsonl, rec)
        print_row(rec)

    run = Run(device, dtype, args.topk, bits_list, args.group_size, batches, variants,
              lowbit_variants, active_isa, timer, keep)
    header = (f"{'kernel':12} {'dtype':9} {'bits':>4} {'shape':>11} {'mix':9} {'batch':>5} "
              f"{'ms':>9} {'speedup':>7} {'packed/dense':>12}")
    print(header)
    print("-" * len(header))
    for shape in parse_shapes(args.shapes):
        for mix_index, mix in enumerate(mixes):
            bench_shape(run, shape, mix, with_baselines=mix_index == 0)
    path = args.out or results_path(device)
    write_results(path, device, records, threads=torch.get_num_threads(), cpu_isa=active_isa,
                  cache="warm" if args.warm_cache else "cold",
                  flush_bytes=0 if flush is None else flush.buffer.numel() * 4,
                  command=" ".join(["bench_linear.py", *(argv if argv else sys.argv[1:])]))
    print(f"\nwrote {path}")
    return records


if __name__ == "__main__":
    main()
