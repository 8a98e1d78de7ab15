"""Which kernel backends this install can run, and which one serves a call.

Backends, fastest first:

* ``cuda``: the CUDA kernels in csrc/cuda (CUDA tensors; built when torch is a CUDA build and
  nvcc is found, usable when a GPU is present);
* ``triton``: the Triton kernels in sparse_kernels/triton (CUDA tensors; CPU tensors too under
  ``TRITON_INTERPRET=1``, for checking the kernels without a GPU);
* ``cpu``: the C++ kernels in csrc/cpu (CPU tensors);
* ``torch``: the pure-torch reference (any device, always present).

A call picks, in order: its ``backend=`` argument, the ``SPARSE_KERNELS_BACKEND`` environment
variable, then the fastest available backend that natively serves the tensor's device (the
interpreter is never picked by default).
"""
import os

import torch

from . import _loader
from . import triton as triton_backend

ENV_VAR = "SPARSE_KERNELS_BACKEND"
KNOWN_BACKENDS = ("cuda", "triton", "cpu", "torch")

# The device type each compiled backend is the default for; "torch" serves any.
_NATIVE_DEVICE = {"cuda": "cuda", "triton": "cuda", "cpu": "cpu"}


def cuda_kernels_registered() -> bool:
    """Whether the compiled library registered CUDA kernels (a CUDA build of the extension)."""
    return (_loader.native_loaded() and
            torch._C._dispatch_has_kernel_for_dispatch_key("sparse_kernels::hybrid_linear",
                                                           "CUDA"))


def native_load_error() -> str | None:
    """Why the compiled library did not load (None when it did)."""
    return None if _loader.native_loaded() else _loader.native_load_error


def _unavailable_reason(backend: str) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpu":
        return None if _loader.native_loaded() else _loader.native_load_error
    if backend == "triton":
        return triton_backend.UNAVAILABLE_REASON
    if not _loader.native_loaded():
        return _loader.native_load_error
    if not cuda_kernels_registered():
        return ("the compiled library has no CUDA kernels (build with a CUDA build of torch "
                "and nvcc on PATH or in CUDA_HOME)")
    return None if torch.cuda.is_available() else "no CUDA GPU is visible"


def _devices(backend: str) -> tuple[str, ...] | None:
    """Device types a backend accepts when forced; None for any."""
    if backend == "triton":
        return triton_backend.DEVICES
    return (_NATIVE_DEVICE[backend],) if backend in _NATIVE_DEVICE else None


# Fixed at import, once the library has (or has not) loaded: every op call reads these, and
# torch.compile reads plain values without tracing how they were found.
_AVAILABLE = tuple(b for b in KNOWN_BACKENDS if _unavailable_reason(b) is None)
_DEFAULT = {device: next(b for b in _AVAILABLE if _NATIVE_DEVICE.get(b, device) == device)
            for device in ("cpu", "cuda")}


def available_backends() -> list[str]:
    """Backends this install can run, fastest first (``torch`` is always last and present)."""
    return list(_AVAILABLE)


def native_backends(device_type: str) -> list[str]:
    """Available compiled backends whose kernels natively serve ``device_type`` tensors,
    fastest first (the reference and the Triton interpreter excluded): what a benchmark times."""
    return [b for b in _AVAILABLE if _NATIVE_DEVICE.get(b) == device_type]


def _default_backend(device_type: str) -> str:
    return _DEFAULT.get(device_type, "torch")


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend that serves a call on ``device``; raises if ``requested`` cannot."""
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is None:
        return _default_backend(device.type)
    if requested not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; known: {', '.join(KNOWN_BACKENDS)}")
    reason = _unavailable_reason(requested)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} is not available: {reason}. "
                           f"Available: {', '.join(available_backends())}")
    wanted = _devices(requested)
    if wanted is not None and device.type not in wanted:
        raise RuntimeError(f"backend {requested!r} runs on {' or '.join(wanted)} tensors, got "
                           f"tensors on {device}; move them or pick another backend")
    return requested


CPU_ISAS = ("generic", "avx2", "avx512")


def cpu_isa(name: str | None = None) -> str | None:
    """The instruction set the ``cpu`` backend's matmul kernels run: ``generic``, ``avx2`` or
    ``avx512`` (None when the compiled library is not loaded).

    The library is built for baseline x86-64 and carries one variant of its hot kernels per
    ISA; the best the CPU supports is used unless ``SPARSE_KERNELS_CPU_ISA`` (read when the
    library loads) or ``name`` here forces another (``auto``: back to the best). Forcing an ISA
    the CPU lacks raises. Benchmarks use this to time the variants side by side.
    """
    if not _loader.native_loaded():
        if name is not None:
            raise RuntimeError(f"cannot set the CPU ISA: {_loader.native_load_error}")
        return None
    return torch.ops.sparse_kernels.cpu_isa(name)


def supported_cpu_isas() -> list[str]:
    """The ISAs this CPU can run, from ``generic`` up to the best (empty without the library)."""
    if not _loader.native_loaded():
        return []
    best = torch.ops.sparse_kernels.cpu_isa_detected()
    return list(CPU_ISAS[:CPU_ISAS.index(best) + 1])


# The CUDA matmul kernels of the hybrid_linear path, for fp16 / bf16 values with B = 16:
#   v1      the canonical-format tensor-core kernel (csrc/cuda/hybrid_linear.cu), any rows;
#   v2      the decode kernel on a prepared layout (hybrid_decode.cu), at most 16 rows;
#   unpack  the dense matrix unpacked on the GPU (unpack.cu), then cuBLAS, for many rows.
CUDA_KERNELS = ("v1", "v2", "unpack")
DECODE_ENV, PREFILL_ENV = "SPARSE_KERNELS_CUDA_DECODE", "SPARSE_KERNELS_CUDA_PREFILL"
DECODE_KERNELS, PREFILL_KERNELS = ("v1", "v2"), ("v1", "unpack", "auto")
DECODE_MAX_ROWS = 16
UNPACK_MIN_ROWS = 1024  # prefill "auto": from here the GEMM's rate outweighs the unpacking


def _kernel_from_env(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def cuda_matmul_kernel(rows: int) -> str:
    """Which CUDA kernel multiplies ``rows`` rows of x: ``v2`` for 1-16 rows
    (``SPARSE_KERNELS_CUDA_DECODE=v1`` keeps them on v1), ``unpack`` from 1024 rows and ``v1``
    in between (``SPARSE_KERNELS_CUDA_PREFILL=v1|unpack`` forces one above 16 rows)."""
    if rows <= DECODE_MAX_ROWS:
        return _kernel_from_env(DECODE_ENV, DECODE_KERNELS, "v2")
    prefill = _kernel_from_env(PREFILL_ENV, PREFILL_KERNELS, "auto")
    if prefill == "auto":
        return "unpack" if rows >= UNPACK_MIN_ROWS else "v1"
    return prefill

