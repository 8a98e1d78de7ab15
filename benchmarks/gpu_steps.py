"""The GPU check's own steps (benchmarks/gpu_check.py runs each in its own process):

  env        versions, the GPU, nvcc, the build target and the copy bandwidth -> env.json
  backends   which backends loaded and which ops have CUDA kernels -> env.json; exit 3 when the
             CUDA kernels cannot run (the driver then skips every step that needs them)
  case       small decode cases run a few times and checked against F.linear: what the sanitizer
             and the profiler watch
  sanitize   compute-sanitizer memcheck, racecheck and synccheck over `case` (a record per tool)
  profile    one ncu reading of the v2 decode kernel (DRAM throughput, occupancy, registers, grid)

Every record goes to ``--jsonl`` as it is made. On a machine without compute-sanitizer or ncu
(the dry run on a CPU) ``sanitize`` runs the cases without the tool and ``profile`` records why
it read nothing.

  python benchmarks/gpu_steps.py env --out OUT/env.json [--dry-run]
  python benchmarks/gpu_steps.py case --device cuda
  python benchmarks/gpu_steps.py profile --env OUT/env.json --jsonl OUT/kernels.jsonl
"""
import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (TIER_MIXES, append_jsonl, device_name, git_commit, median_ms,  # noqa: E402
                    relative_error, significant)
from sparse_kernels.atomic import atomic_file  # noqa: E402

HERE = os.path.abspath(__file__)
# Small decode cases with several tasks per block-row (split K): (kernel, dtype, rows, shape).
CASES = [("v2", "float16", 1, "40x2048"), ("v2", "float16", 9, "40x2048"),
         ("v2", "bfloat16", 1, "40x2048"), ("v2", "bfloat16", 9, "40x2048"),
         ("v1", "float16", 5, "40x2048")]
TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# What one ncu reading asks for (the CSV's columns), and the names a record gives them.
NCU_METRICS = {
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
    "dram__bytes_read.sum": "dram_bytes_read",
    "dram__bytes_write.sum": "dram_bytes_write",
    "gpu__time_duration.sum": "duration_ns",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
    "launch__grid_size": "grid_size",
    "launch__block_size": "block_size",
    "launch__shared_mem_per_block_dynamic": "shared_bytes_per_block",
}


def write_json(path: str, payload: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def nvcc_release() -> str | None:
    """``"13.0"`` from nvcc on PATH or in CUDA_HOME, or None."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                "bin", "nvcc")
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def build_arch(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST for this GPU only (sm_90 gets its arch-specific 9.0a)."""
    major, minor = capability
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def copy_gb_per_s(device: torch.device, nbytes: int) -> float:
    """A device-to-device copy's rate, bytes read plus written (the memory's practical peak)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 3, 20)
    return 2 * nbytes / ms / 1e6


def package_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 - absent or broken: the check records that, it goes on
        return None


def env(args) -> int:
    info = dict(dry_run=args.dry_run, python=sys.version.split()[0], torch=torch.__version__,
                torch_cuda=torch.version.cuda, triton=package_version("triton"),
                transformers=package_version("transformers"), commit=git_commit(),
                cpu=device_name(torch.device("cpu")), cpu_count=os.cpu_count(),
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), nvcc=nvcc_release())
    problems = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = torch.cuda.get_device_capability(0)
        info.update(gpu=props.name, capability=list(capability), sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), arch=build_arch(capability),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
        info["copy_gb_per_s"] = significant(copy_gb_per_s(torch.device("cuda"), 1 << 30))
    else:
        info["copy_gb_per_s"] = significant(copy_gb_per_s(torch.device("cpu"), 64 << 20))
        if not args.dry_run:
            problems.append("no CUDA GPU is visible to torch")
    if not args.dry_run:
        if info["nvcc"] is None:
            problems.append("nvcc was not found (PATH, CUDA_HOME): the CUDA kernels cannot be "
                            "built")
        elif torch.version.cuda and info["nvcc"].split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"nvcc is CUDA {info['nvcc']} but torch was built with CUDA "
                            f"{torch.version.cuda}: the extension would not load; put the matching "
                            f"nvcc first on PATH")
    info["problems"] = problems
    write_json(args.out, info)
    print(json.dumps(info, indent=1))
    for problem in problems:
        print(f"!! {problem}")
    return 2 if problems else 0


def backends(args) -> int:
    import sparse_kernels as sk

    info = read_json(args.out)
    cuda_ops = sk.ops_with_kernel("CUDA")
    info.update(backends=sk.available_backends(), cuda_ops=cuda_ops,
                native_load_error=sk.backends.native_load_error(),
                triton_unavailable=sk.triton.UNAVAILABLE_REASON)
    missing = [op for op in sk.ops_with_kernel("CompositeExplicitAutograd") if op not in cuda_ops]
    reason = None
    if "cuda" not in info["backends"]:
        try:
            sk.backends.resolve_backend("cuda", torch.device("cuda"))
        except (RuntimeError, ValueError) as exc:
            reason = str(exc)
    elif missing:
        reason = f"the CUDA build registered no kernel for {missing}"
    info["cuda_unavailable"] = reason
    write_json(args.out, info)
    print(f"backends: {info['backends']}\nCUDA kernels registered for: {cuda_ops}")
    if reason:
        print(f"!! the CUDA kernels cannot run: {reason}")
    return 3 if reason and not info.get("dry_run") else 0


# ------------------------------------------------------------------------------ the cases
def run_case(kernel: str, dtype_name: str, rows: int, shape: str, device: torch.device,
             calls: int) -> float:
    """Build the default-mix weight of ``shape`` on the CPU, then call the CUDA ``kernel`` (the
    device's own kernel elsewhere) ``calls`` times on ``rows`` rows; the largest relative error
    against F.linear on the masked weight."""
    from bench_linear import kernel_variant, make_weight, parse_shapes

    import sparse_kernels as sk

    dtype = getattr(torch, dtype_name)
    (out_f, in_f), = parse_shapes(shape)
    _, _, masked, packed = make_weight(out_f, in_f, TIER_MIXES["hybrid"], 15, dtype, device)
    backend = "cuda" if device.type == "cuda" else None
    worst = 0.0
    with kernel_variant(backend, kernel if backend else None, sk.cpu_isa()):
        for call in range(calls):
            x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(call)).to(dtype)
            x = x.to(device)
            got = sk.hybrid_linear(x, packed, backend=backend)
            worst = max(worst, relative_error(got, F.linear(x, masked)))
    return worst


def case(args) -> int:
    device = torch.device(args.device)
    cases = CASES if args.kernel is None else [(args.kernel, args.dtype, args.rows, args.shape)]
    failed = 0
    for kernel, dtype_name, rows, shape in cases:
        error = run_case(kernel, dtype_name, rows, shape, device, args.calls)
        ok = error <= TOLERANCE[dtype_name]
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} case {kernel} {dtype_name} rows {rows} {shape}: "
              f"max relative error {error:.3g} over {args.calls} calls", flush=True)
    return 1 if failed else 0


def case_command(*extra: str) -> list[str]:
    return [sys.executable, HERE, "case", *extra]


# ------------------------------------------------------------------------------ the sanitizer
def sanitizer_errors(tool: str, text: str) -> int | None:
    """Errors compute-sanitizer's summary line reports (None: no summary, the run broke)."""
    found = re.search(r"(?:ERROR|RACECHECK|SYNCCHECK) SUMMARY: (\d+) (?:errors?|hazards?)", text)
    if tool == "racecheck":
        errors = re.search(r"\((\d+) errors?", text)
        if errors:
            return int(errors.group(1))
    return int(found.group(1)) if found else None


def sanitize(args) -> int:
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if sanitizer is None:
        print("compute-sanitizer not found: the cases run without it (plumbing only)")
        done = subprocess.run(case_command("--device", device), text=True, capture_output=True)
        print(done.stdout + done.stderr)
        append_jsonl(args.jsonl, dict(record="sanitizer", tool=None, ok=False,
                                      error="compute-sanitizer not found",
                                      cases_exit=done.returncode))
        return 0 if args.dry_run and done.returncode == 0 else 1
    failed = 0
    for tool in SANITIZER_TOOLS:
        t0 = time.perf_counter()
        # Only our kernels are watched: instrumenting every torch kernel would take minutes.
        options = [sanitizer, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20"]
        cases = case_command("--device", device)
        done = subprocess.run([*options, "--kernel-name", "kns=hybrid", *cases], text=True,
                              capture_output=True)
        text = done.stdout + done.stderr
        if re.search(r"(?i)(unrecognized|unknown|invalid) option", text):  # an older sanitizer
            done = subprocess.run([*options, *cases], text=True, capture_output=True)
            text = done.stdout + done.stderr
        print(f"---- compute-sanitizer --tool {tool} (exit {done.returncode})\n{text}", flush=True)
        errors = sanitizer_errors(tool, text)
        ok = done.returncode == 0 and errors == 0
        failed += not ok
        append_jsonl(args.jsonl, dict(record="sanitizer", tool=tool, ok=ok, errors=errors,
                                      exit=done.returncode,
                                      seconds=round(time.perf_counter() - t0, 1),
                                      cases=[" ".join(map(str, c)) for c in CASES]))
    return 1 if failed else 0


# ------------------------------------------------------------------------------ the profiler
def parse_ncu_csv(text: str) -> dict:
    """The metrics of the first profiled kernel in ``ncu --csv --page raw`` output, by
    ``NCU_METRICS`` name (numbers as floats; thousands separators dropped)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        return {}
    header = rows[0]
    data = [r for r in rows[1:] if r and r[0] not in ("", "ID") and len(r) == len(header)]
    if not data:
        return {}
    row = dict(zip(header, data[0]))
    out = {"kernel_name": row.get("Kernel Name")}
    for metric, name in NCU_METRICS.items():
        if metric in row:
            try:
                out[name] = float(row[metric].replace(",", ""))
            except ValueError:
                out[name] = row[metric]
    return out


def profile(args) -> int:
    ncu = shutil.which("ncu")
    info = read_json(args.env)
    rec = dict(record="ncu", kernel="cuda-v2", shape=args.shape, rows=args.rows,
               dtype=args.dtype, copy_gb_per_s=info.get("copy_gb_per_s"))
    if ncu is None or not torch.cuda.is_available():
        rec.update(ok=False, error="ncu not found" if ncu is None else "no CUDA GPU")
        append_jsonl(args.jsonl, rec)
        print(f"no ncu reading: {rec['error']}")
        return 0 if args.dry_run else 1
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "ncu.csv")
        command = [ncu, "--kernel-name", "regex:hybrid_decode", "--launch-skip", "2",
                   "--launch-count", "1", "--clock-control", "none", "--csv", "--page", "raw",
                   "--metrics", ",".join(NCU_METRICS), "--log-file", log,
                   *case_command("--kernel", "v2", "--dtype", args.dtype, "--rows",
                                 str(args.rows), "--shape", args.shape, "--calls", "4")]
        done = subprocess.run(command, text=True, capture_output=True)
        print(done.stdout[-4000:] + done.stderr[-4000:])
        text = open(log).read() if os.path.exists(log) else ""
    print(text[-4000:])
    metrics = parse_ncu_csv(text)
    rec.update(metrics, exit=done.returncode, ok=done.returncode == 0 and bool(metrics))
    if metrics.get("duration_ns"):
        moved = metrics.get("dram_bytes_read", 0) + metrics.get("dram_bytes_write", 0)
        rec["dram_gb_per_s"] = significant(moved / metrics["duration_ns"])
        if rec["copy_gb_per_s"]:
            rec["fraction_of_copy"] = significant(rec["dram_gb_per_s"] / rec["copy_gb_per_s"])
    append_jsonl(args.jsonl, rec)
    print(json.dumps(rec, indent=1))
    return 0 if rec["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("env", "backends"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="the env.json to write")
        s.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("case")
    s.add_argument("--device", default="cuda")
    s.add_argument("--kernel", choices=("v1", "v2"), default=None,
                   help="one case (default: every case of CASES)")
    s.add_argument("--dtype", default="float16", choices=TOLERANCE)
    s.add_argument("--rows", type=int, default=1)
    s.add_argument("--shape", default="40x2048")
    s.add_argument("--calls", type=int, default=3)
    s = sub.add_parser("sanitize")
    s.add_argument("--jsonl", default=None)
    s.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("profile")
    s.add_argument("--env", required=True, help="env.json (for the copy bandwidth)")
    s.add_argument("--jsonl", default=None)
    s.add_argument("--shape", default="11008x4096")
    s.add_argument("--rows", type=int, default=1)
    s.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    s.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    return {"env": env, "backends": backends, "case": case, "sanitize": sanitize,
            "profile": profile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
