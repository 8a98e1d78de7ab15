"""Which kernel backends this install can run, and which one serves a call.

Backends, fastest first: ``cuda`` (csrc/cuda, not built yet), ``triton`` (not built yet),
``cpu`` (the C++ kernels in csrc/cpu) and ``torch`` (the pure-torch reference, always present).
A call picks, in order: its ``backend=`` argument, the ``SPARSE_KERNELS_BACKEND`` environment
variable, then the fastest available backend for the tensor's device.
"""
import functools
import os

import torch

from . import _loader

ENV_VAR = "SPARSE_KERNELS_BACKEND"
KNOWN_BACKENDS = ("cuda", "triton", "cpu", "torch")

# The device type each compiled backend runs on; "torch" runs anywhere.
_BACKEND_DEVICE = {"cuda": "cuda", "triton": "cuda", "cpu": "cpu"}


def _unavailable_reason(backend: str) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpu":
        return None if _loader.native_loaded() else _loader.native_load_error
    return f"the {backend} backend is not implemented in this version"


def available_backends() -> list[str]:
    """Backends this install can run, fastest first (``torch`` is always last and present)."""
    return list(_available())


@functools.cache
def _available() -> tuple[str, ...]:
    # Fixed once the library has (or has not) loaded; cached because every op call asks.
    return tuple(b for b in KNOWN_BACKENDS if _unavailable_reason(b) is None)


@functools.cache
def _default_backend(device_type: str) -> str:
    return next(b for b in _available() if _BACKEND_DEVICE.get(b, device_type) == device_type)


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
    wanted = _BACKEND_DEVICE.get(requested, device.type)
    if wanted != device.type:
        raise RuntimeError(f"backend {requested!r} runs on {wanted} tensors, got tensors on "
                           f"{device}; move them or pick another backend")
    return requested
