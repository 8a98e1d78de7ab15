"""Builds ``sparse_kernels._C``: the C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  SPARSE_KERNELS_NO_EXT=1     build no native code at all (the torch reference serves every op)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0a"; targets below 8.0 are dropped)
  SPARSE_KERNELS_REQUIRE_CUDA=1  fail, naming the reason, instead of building the CPU kernels only
                              when the CUDA kernels cannot be built (the GPU check sets it)
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# The .cu files include no torch headers, so they keep to C++17 (what .ci/cuda_check compiles
# them with). No --use_fast_math: the pruning kernels must match the reference bit for bit
# (IEEE sqrt and division, no flushing of subnormals).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def _sources(folder, pattern):
    return sorted(glob.glob(os.path.join("csrc", folder, pattern)))


def _cuda_skip_reason(torch_module):
    """Why the CUDA kernels cannot be built here, or None when they can."""
    if not _sources("cuda", "*.cu"):
        return "csrc/cuda has no .cu sources yet"
    if torch_module.version.cuda is None:
        return f"torch {torch_module.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") without the targets below sm_80.

    The kernels use sm_80 instructions (mma.sync / mma.sp on bf16, warp reductions); an older
    target in an inherited list (NGC images export 7.x) would fail the whole build.
    """
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    entries = [e for e in wanted.replace(" ", ";").split(";") if e]
    kept = [e for e in entries if float(e.split("+")[0].rstrip("af")) >= 8.0]
    dropped = [e for e in entries if e not in kept]
    if dropped:
        print(f"sparse_kernels: skipping CUDA targets {dropped} (the kernels need sm_80 or newer)")
    if not kept:
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={wanted!r} has no target >= 8.0; the CUDA kernels "
                         f"need sm_80 or newer (e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0a')")
    return ";".join(kept)


def _extensions():
    if os.environ.get("SPARSE_KERNELS_NO_EXT", "0") == "1":
        print("sparse_kernels: SPARSE_KERNELS_NO_EXT=1, building no native code; "
              "the torch reference serves every op")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # No -std here: torch's build adds the standard its own headers need (C++20 since 2.13).
    # No -march: the build runs on any x86-64 CPU; the matmul kernels are compiled once per ISA
    # (csrc/cpu/hybrid_isa_*.cpp) and picked at run time. -Wno-psabi: they pass 256-bit vector
    # types between inline functions, which GCC warns about when the baseline ISA has no AVX.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    sources = _sources("cpu", "*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]
    skip = _cuda_skip_reason(torch)
    if skip is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        sources += _sources("cuda", "*.cu") + _sources("cuda", "*.cpp")
        ext = cpp_extension.CUDAExtension(
            "sparse_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"], py_limited_api=False)
    elif os.environ.get("SPARSE_KERNELS_REQUIRE_CUDA", "0") == "1":
        raise SystemExit(f"sparse_kernels: SPARSE_KERNELS_REQUIRE_CUDA=1 but the CUDA kernels "
                         f"cannot be built: {skip}")
    else:
        print(f"sparse_kernels: CUDA kernels skipped ({skip}); building the C++ CPU kernels only")
        ext = cpp_extension.CppExtension(
            "sparse_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
