"""Compile every Triton kernel for GPU targets, without a GPU.

``python -m sparse_kernels.triton.compile_check [--arch 80 90]`` lowers each kernel through
Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) for each compute
capability and each dtype it serves, so a kernel that cannot lower fails here rather than on the
first GPU it meets. Run it without ``TRITON_INTERPRET`` (interpreted kernels cannot compile).
"""
import argparse
import sys
import time

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from triton.runtime.autotuner import Autotuner

from . import compress, hybrid_linear, scores, select

_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_PACKED = ["d_rowptr", "d_cols", "d_vals", "s_rowptr", "s_cols", "s_vals", "s_meta",
           "t_rowptr", "t_cols", "t_vals", "t_pos"]
_PACKED_INDEX_TYPES = {"d_rowptr": "*i32", "d_cols": "*i32", "s_rowptr": "*i32",
                       "s_cols": "*i32", "s_meta": "*i16", "t_rowptr": "*i32", "t_cols": "*i32",
                       "t_pos": "*u8"}
_TILES16 = dict(B=16, BP=16, HP=8, TOPK=15, KP=16, HAS_BIAS=True)


def _packed_signature(dtype: str) -> dict:
    return {name: _PACKED_INDEX_TYPES.get(name, f"*{dtype}") for name in _PACKED}


def _cases(dtype: str) -> list[tuple]:
    """(name, kernel, signature, constexprs) for every kernel at one value dtype."""
    linear_io = {"x": f"*{dtype}", "out": f"*{dtype}", "bias": f"*{dtype}"}
    dims = {"M": "i32", "N": "i32", "K_in": "i32", "stride_xm": "i32"}
    gemm = {**linear_io, **_packed_signature(dtype), **dims}
    decode = {**linear_io, **_packed_signature(dtype), **dims, "split": "i32"}
    decode_partial = {**decode, "out": "*fp32"}
    return [
        ("hybrid_linear gemm", hybrid_linear._gemm_kernel, gemm,
         dict(_TILES16, DOT_FP32=dtype == "fp32", BLOCK_M=128)),
        ("hybrid_linear decode", hybrid_linear._decode_kernel, decode,
         dict(_TILES16, BM=16, FINAL=True)),
        ("hybrid_linear decode split-K", hybrid_linear._decode_kernel, decode_partial,
         dict(_TILES16, BM=1, FINAL=False)),
        ("wanda_scores", scores._wanda_kernel,
         {"w": f"*{dtype}", "norm": "*fp32", "scores": "*fp32", "block_scores": "*fp32",
          "N": "i32", "K_in": "i32", "NBC": "i32"}, dict(B=16, BP=16, CB=16)),
        ("block_topk_mask", select._block_topk_kernel,
         {"scores": f"*{dtype}", "mask": "*i8", "N": "i32", "K_in": "i32", "NBC": "i32",
          "k": "i32"}, dict(B=16, BP=16, CB=4)),
        ("nm_mask", select._nm_kernel,
         {"scores": f"*{dtype}", "mask": "*i8", "N": "i32", "K_in": "i32", "n_groups": "i32",
          "n": "i32", "m": "i32"}, dict(MP=4, GROUPS=256)),
        ("compress_24", compress._compress_kernel,
         {"blocks": f"*{dtype}", "values": f"*{dtype}", "meta": "*i16", "total_rows": "i32"},
         dict(B=16, CP=16, ROWS=64)),
    ]


def _jit_function(kernel):
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, signature: dict, constexprs: dict, capability: int):
    """Compile one kernel for ``sm_<capability>``; returns Triton's compiled kernel."""
    fn = _jit_function(kernel)
    full = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in full.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or value for {missing}")
    source = ASTSource(fn, full, constexprs)
    return triton_compile(source, target=GPUTarget("cuda", capability, 32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    args = parser.parse_args(argv)
    failures = 0
    for capability in args.arch:
        for dtype in _DTYPES:
            for name, kernel, signature, constexprs in _cases(dtype):
                start = time.perf_counter()
                try:
                    compiled = compile_kernel(kernel, signature, constexprs, capability)
                except Exception as exc:  # report every failing kernel, then fail
                    failures += 1
                    print(f"FAIL sm_{capability} {dtype:4} {name}: {exc}", flush=True)
                    continue
                print(f"ok   sm_{capability} {dtype:4} {name}: {len(compiled.asm['cubin'])} "
                      f"bytes of cubin, {compiled.metadata.num_warps} warps, "
                      f"{time.perf_counter() - start:.2f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
