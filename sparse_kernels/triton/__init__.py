"""The Triton backend: every op of ``_ops.py`` as Triton kernels (one module per family).

It runs on CUDA tensors when Triton and a GPU are present, and on CPU tensors through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before ``sparse_kernels`` is imported, so the
kernels can be checked on any machine (slowly: keep shapes small). Whether it can run is decided
once, at import; the kernel modules are imported only then (Triton costs about a second).
"""
import importlib
import importlib.util
import logging
import os

import torch

log = logging.getLogger("sparse_kernels")

#: Op name -> "module:function" of its Triton implementation (each a ``triton_op``).
_IMPLEMENTATIONS = {
    "hybrid_linear": "hybrid_linear:hybrid_linear",
    "hybrid_linear_q": "hybrid_linear:hybrid_linear_q",
    "wanda_scores": "scores:wanda_scores",
    "block_topk_mask": "select:block_topk_mask",
    "nm_mask": "select:nm_mask",
    "compress_24": "compress:compress_24",
}

#: Ops the compiled CUDA library does not implement: on a GPU their ``CUDA`` key is Triton's
#: (``register_for_cuda``). The low-bit matmul dequantizes on load in Triton's decode and GEMM
#: kernels; a CUDA image of it is not written yet.
SERVES_CUDA_ALONE = ("hybrid_linear_q",)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: Device types the Triton kernels accept here.
DEVICES = ("cuda", "cpu") if INTERPRETING else ("cuda",)


def _unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not INTERPRETING:
        return ("no CUDA GPU; set TRITON_INTERPRET=1 before importing sparse_kernels to run the "
                "Triton kernels on CPU tensors through Triton's interpreter")
    return None


def _load() -> dict:
    found = {}
    for name, target in _IMPLEMENTATIONS.items():
        module, function = target.split(":")
        found[name] = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return found


#: Why the Triton backend cannot run here, or None when it can.
UNAVAILABLE_REASON = _unavailable_reason()

#: Op name -> its Triton implementation; empty when the backend cannot run.
OPS = {}
if UNAVAILABLE_REASON is None:
    try:
        OPS = _load()
    except Exception as exc:  # an incompatible Triton must not break `import sparse_kernels`
        UNAVAILABLE_REASON = f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
        log.warning("sparse_kernels: %s; the Triton backend is off", UNAVAILABLE_REASON)


def register_for_cuda(library: torch.library.Library) -> None:
    """Serve ``torch.ops.sparse_kernels.*`` on CUDA tensors with Triton where no CUDA kernel is.

    The compiled CUDA kernels, when built, keep the ``CUDA`` key (they are faster).
    """
    for name, implementation in OPS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_kernels::{name}", "CUDA"):
            library.impl(name, implementation, "CUDA")
