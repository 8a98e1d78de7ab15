"""Compile every Triton kernel for GPU targets, without a GPU.

``python -m sparse_kernels.triton.compile_check [--arch 80 90] [--dtypes fp16 ...]`` lowers each
kernel through Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) for
each compute capability, each dtype it serves and each of its autotune configs, checks that the
config's shared memory fits the target, and asks ptxas for its registers and spills (a spill
fails: it means a config too big for the register file). So a kernel that cannot run, or runs
badly, fails here rather than on the first GPU it meets. Run it without ``TRITON_INTERPRET`` (interpreted kernels cannot
compile).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, compile as triton_compile
from triton.runtime.autotuner import Autotuner

from . import compress, hybrid_linear, scores, select

_DTYPES = ("fp32", "fp16", "bf16")
# Shared memory one CTA may use (opt-in maximum), per compute capability.
_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_PACKED = ["d_rowptr", "d_cols", "d_vals", "s_rowptr", "s_cols", "s_vals", "s_meta",
           "t_rowptr", "t_cols", "t_vals", "t_pos"]
_PACKED_INDEX_TYPES = {"d_rowptr": "*i32", "d_cols": "*i32", "s_rowptr": "*i32",
                       "s_cols": "*i32", "s_meta": "*i16", "t_rowptr": "*i32", "t_cols": "*i32",
                       "t_pos": "*u8"}
_TILES16 = dict(B=16, BP=16, HP=8, TOPK=15, TOPK_STRIDE=15, BITS=16, HAS_BIAS=True)
# Low-bit values: (pointer type of the codes, K, K's stride in elements) per bits.
_CODES = {8: ("*i8", 52, 52), 4: ("*u8", 41, 42)}


def _packed_signature(values: str) -> dict:
    return {name: _PACKED_INDEX_TYPES.get(name, values) for name in _PACKED}


def _cases(dtype: str) -> list[tuple]:
    """(name, kernel, signature, constexprs) for every kernel at one value dtype."""
    linear_io = {"x": f"*{dtype}", "out": f"*{dtype}", "bias": f"*{dtype}"}
    dims = {"M": "i32", "N": "i32", "K_in": "i32", "stride_xm": "i32", "N_GROUPS": "i32",
            "GS": "i32"}
    gemm_kernel = hybrid_linear.gemm_fp32 if dtype == "fp32" else hybrid_linear.gemm_16bit
    gemm = {**linear_io, "tiers": "*i8", "slots": "*i32", "d_vals": f"*{dtype}",
            "s_vals": f"*{dtype}", "s_meta": "*i16", "t_dense": f"*{dtype}",
            "scales": f"*{dtype}", **dims, "NBR": "i32", "NBC": "i32"}
    decode = {**linear_io, "partials": "*fp32", "counters": "*i32", "scales": f"*{dtype}",
              **_packed_signature(f"*{dtype}"), **dims, "split": "i32"}
    int4, k4, stride4 = _CODES[4]
    int8, k8, stride8 = _CODES[8]
    return [
        ("hybrid_linear gemm", gemm_kernel, gemm,
         dict(B=16, BP=16, BITS=16, HAS_BIAS=True, DOT_FP32=dtype == "fp32")),
        ("hybrid_linear decode", hybrid_linear.decode_tuned, decode,
         dict(_TILES16, BM=16, SPLIT_K=False)),
        ("hybrid_linear decode split-K", hybrid_linear.decode_tuned, decode,
         dict(_TILES16, BM=1, SPLIT_K=True)),
        ("hybrid_linear_q gemm int4", gemm_kernel,
         {**gemm, "d_vals": int4, "s_vals": int4, "t_dense": "*fp32", "scales": "*fp16"},
         dict(B=16, BP=16, BITS=4, HAS_BIAS=True, DOT_FP32=dtype == "fp32")),
        ("hybrid_linear_q decode int4 split-K", hybrid_linear.decode_tuned,
         {**decode, **_packed_signature(int4), "scales": "*fp16"},
         dict(_TILES16, TOPK=k4, TOPK_STRIDE=stride4, BITS=4, BM=1, SPLIT_K=True)),
        ("hybrid_linear_q decode int8", hybrid_linear.decode_tuned,
         {**decode, **_packed_signature(int8), "scales": "*fp16"},
         dict(_TILES16, TOPK=k8, TOPK_STRIDE=stride8, BITS=8, BM=16, SPLIT_K=False)),
        ("wanda_scores", scores.wanda_kernel,
         {"w": f"*{dtype}", "norm": "*fp32", "scores": "*fp32", "block_scores": "*fp32",
          "N": "i32", "K_in": "i32", "NBC": "i32"}, dict(B=16, BP=16, CB=16)),
        ("block_topk_mask", select.block_topk_kernel,
         {"scores": f"*{dtype}", "mask": "*i8", "N": "i32", "K_in": "i32", "NBC": "i32",
          "k": "i32"}, dict(B=16, BP=16, CB=4)),
        ("nm_mask", select.nm_kernel,
         {"scores": f"*{dtype}", "mask": "*i8", "N": "i32", "K_in": "i32", "n_groups": "i32",
          "n": "i32", "m": "i32"}, dict(MP=4, GROUPS=256)),
        ("compress_24", compress.compress_kernel,
         {"blocks": f"*{dtype}", "values": f"*{dtype}", "meta": "*i16", "total_rows": "i32"},
         dict(B=16, GP=4)),
    ]


def _variants(kernel, constexprs: dict) -> list[tuple[str, object, dict, dict]]:
    """(label, jit function, constexprs, compile options) for each autotune config."""
    if not isinstance(kernel, Autotuner):
        return [("", kernel, constexprs, {})]
    variants = []
    for config in kernel.configs:
        tuned = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
        label = f" [{tuned} warps={config.num_warps} stages={config.num_stages}]"
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        variants.append((label.replace("[ ", "["), kernel.fn, {**constexprs, **config.kwargs},
                         options))
    return variants


def _ptxas(capability: int) -> str:
    try:
        return get_ptxas(capability).path  # Triton >= 3.7 picks a ptxas per architecture
    except TypeError:
        return get_ptxas().path


def registers_and_spills(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill bytes stored) that ptxas reports for a kernel's PTX."""
    gpu = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        report = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={gpu}", source,
                                 "-o", os.path.join(folder, "kernel.o")],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def _jobs(archs, dtypes) -> list[tuple[int, str, int, int]]:
    """(capability, dtype, case index, variant index) of every compilation."""
    return [(capability, dtype, c, v)
            for capability in archs for dtype in dtypes
            for c, (_, kernel, _, constexprs) in enumerate(_cases(dtype))
            for v in range(len(_variants(kernel, constexprs)))]


def _run_job(job) -> tuple[bool, str]:
    capability, dtype, c, v = job
    name, kernel, signature, constexprs = _cases(dtype)[c]
    label, fn, values, options = _variants(kernel, constexprs)[v]
    what = f"sm_{capability} {dtype:4} {name}{label}"
    start = time.perf_counter()
    try:
        compiled = compile_kernel(fn, signature, values, capability, options)
        registers, spills = registers_and_spills(compiled.asm["ptx"], capability)
        if spills:
            raise RuntimeError(f"spills {spills} bytes of registers ({registers} used)")
    except Exception as exc:  # report every failing kernel, then fail
        return False, f"FAIL {what}: {exc}"
    return True, (f"ok   {what}: {registers} registers, {compiled.metadata.shared} bytes of "
                  f"shared memory, {time.perf_counter() - start:.2f} s")


def compile_kernel(fn, signature: dict, constexprs: dict, capability: int, options: dict):
    """Compile one kernel for ``sm_<capability>``; returns Triton's compiled kernel."""
    full = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in full.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or value for {missing}")
    source = ASTSource(fn, full, constexprs)
    compiled = triton_compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    limit = _SHARED_BYTES.get(capability)
    if limit is not None and compiled.metadata.shared > limit:
        raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, "
                           f"sm_{capability} has {limit}")
    return compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--dtypes", nargs="+", choices=_DTYPES, default=list(_DTYPES),
                        help="value dtypes (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compilations in parallel (default: one per CPU)")
    args = parser.parse_args(argv)
    jobs = _jobs(args.arch, args.dtypes)
    passed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for ok, line in pool.map(_run_job, jobs):
            passed += ok
            print(line, flush=True)
    print(f"compiled {passed} of {len(jobs)}")
    return 0 if passed == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
