"""How the Triton kernels are tuned and launched, compiled on a GPU or interpreted on CPU.

Compiled (a GPU): kernels are ``triton.autotune``-d over a short config list and launched through
``torch.library.wrap_triton`` so ``torch.compile`` sees them inside the ``triton_op`` wrappers.

Interpreted (``TRITON_INTERPRET=1``, read by Triton when a kernel module is imported): Triton's
interpreter runs the same kernels on CPU tensors with numpy. It cannot benchmark, so a tuned
kernel runs with its first config; it cannot be wrapped, so it is called directly, and the op
around it is an opaque ``custom_op`` (torch.compile calls it instead of tracing into it); a
launch on fake tensors (shape propagation) does nothing, as ``wrap_triton``'s does.

``SPARSE_KERNELS_TRITON_ONE_CONFIG=1`` keeps only each kernel's first config on a GPU too (no
autotuning: a short GPU check spends its minutes on measurements, not on tuning compiles).
"""
import os

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import INTERPRETING


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (chosen when they were decorated)."""
    return INTERPRETING


class _FirstConfig:
    """Stands in for an autotuned kernel under the interpreter: always the first config."""

    def __init__(self, kernel, config: triton.Config):
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            meta = {**kwargs, **self.config.kwargs}
            resolved = grid(meta) if callable(grid) else grid
            return self.kernel[resolved](*args, **meta)
        return run


def tuned(configs: list[triton.Config], key: list[str]):
    """``triton.autotune(configs, key)``, or the first config alone under the interpreter
    (and, with ``SPARSE_KERNELS_TRITON_ONE_CONFIG=1``, compiled: one config is never tuned)."""
    def decorate(kernel):
        if interpreting():
            return _FirstConfig(kernel, configs[0])
        one = os.environ.get("SPARSE_KERNELS_TRITON_ONE_CONFIG", "0") == "1"
        return triton.autotune(configs=configs[:1] if one else configs, key=key)(kernel)
    return decorate


def triton_op(name: str):
    """``torch.library.triton_op(name)``, or an opaque custom op around interpreted kernels."""
    def decorate(fn):
        if not interpreting():
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return decorate


def _is_fake(value) -> bool:
    return isinstance(value, torch._subclasses.fake_tensor.FakeTensor)


def launch(kernel):
    """``kernel[grid](...)`` that torch.compile can trace (compiled) or that runs on CPU."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)

    class _Interpreted:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if any(_is_fake(a) for a in (*args, *kwargs.values())):
                    return None
                return kernel[grid](*args, **kwargs)
            return run
    return _Interpreted()


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor): Triton tile sides must be powers of two."""
    return max(floor, triton.next_power_of_2(max(n, 1)))
