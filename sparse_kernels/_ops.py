"""Every op of the package, declared once under the ``sparse_kernels`` namespace.

Each op has one schema, a fake (meta) implementation for tracing, and its pure-torch
reference (``reference.py``) registered as ``CompositeExplicitAutograd``: it serves any device
that no compiled backend claims. Compiled backends register faster implementations for the
``CPU`` / ``CUDA`` dispatch keys (``csrc/``); the dispatcher prefers those.

The Triton kernels are ops of their own (``sparse_kernels::triton_*``, ``torch.library.triton_op``
so ``torch.compile`` sees inside them); where a GPU is present and no CUDA kernel was built they
also serve the ``CUDA`` key of these ops.

The thin wrappers at the bottom pick a backend (``backends.py``): ``"torch"`` calls the
reference directly, ``"triton"`` the Triton op, any other name the dispatched op.
"""
import warnings

import torch

from . import decode_layout, reference
from . import triton as triton_backend
from ._loader import native_loaded  # noqa: F401  (loads the library before the first call)
from .backends import resolve_backend
from .rules import DEFAULT_BLOCK_SIZE, check_block_size

_LIB = torch.library.Library("sparse_kernels", "DEF")

_SCHEMAS = {
    "wanda_scores": "(Tensor weight, Tensor act_sq_norm, int block_size) -> (Tensor, Tensor)",
    "block_topk_mask": "(Tensor scores, int k, int block_size) -> Tensor",
    "nm_mask": "(Tensor scores, int n, int m) -> Tensor",
    "compress_24": "(Tensor blocks) -> (Tensor, Tensor)",
    "hybrid_linear": (
        "(Tensor x, Tensor dense_rowptr, Tensor dense_cols, Tensor dense_vals, "
        "Tensor s24_rowptr, Tensor s24_cols, Tensor s24_vals, Tensor s24_meta, "
        "Tensor topk_rowptr, Tensor topk_cols, Tensor topk_vals, Tensor topk_pos, "
        "int out_features, Tensor? bias=None) -> Tensor"),
    # The dense [out, in] matrix a packed weight stands for (format.py), bit for bit.
    "unpack_hybrid": (
        "(Tensor dense_rowptr, Tensor dense_cols, Tensor dense_vals, "
        "Tensor s24_rowptr, Tensor s24_cols, Tensor s24_vals, Tensor s24_meta, "
        "Tensor topk_rowptr, Tensor topk_cols, Tensor topk_vals, Tensor topk_pos, "
        "int out_features, int in_features) -> Tensor"),
    # Low-bit values (quant.py): int8 codes, or int4 two per byte, times fp16 group scales.
    "hybrid_linear_q": (
        "(Tensor x, Tensor dense_rowptr, Tensor dense_cols, Tensor dense_vals, "
        "Tensor s24_rowptr, Tensor s24_cols, Tensor s24_vals, Tensor s24_meta, "
        "Tensor topk_rowptr, Tensor topk_cols, Tensor topk_vals, Tensor topk_pos, "
        "Tensor scales, int group_size, int out_features, Tensor? bias=None) -> Tensor"),
    "unpack_hybrid_q": (
        "(Tensor dense_rowptr, Tensor dense_cols, Tensor dense_vals, "
        "Tensor s24_rowptr, Tensor s24_cols, Tensor s24_vals, Tensor s24_meta, "
        "Tensor topk_rowptr, Tensor topk_cols, Tensor topk_vals, Tensor topk_pos, "
        "Tensor scales, int group_size, int out_features, int in_features) -> Tensor"),
    # The CUDA decode kernel on a prepared layout (decode_layout.py); counters are its split-K
    # scratch (tagged per launch: whatever an earlier launch left there is safe).
    "hybrid_linear_decode": (
        "(Tensor x, Tensor stream, Tensor tasks, Tensor codes, Tensor counters, "
        "int out_features, int topk, Tensor? bias=None) -> Tensor"),
}
# Ops only the compiled library implements (csrc/cpu/isa.cpp): the CPU kernels' instruction-set
# switch, which has no tensors and nothing for a reference to do.
_NATIVE_SCHEMAS = {
    "cpu_isa": "(str? name=None) -> str",
    "cpu_isa_detected": "() -> str",
}
_REFERENCES = {**{name: getattr(reference, name) for name in _SCHEMAS
                  if name not in ("hybrid_linear_decode", "unpack_hybrid", "unpack_hybrid_q")},
               "unpack_hybrid": reference.unpack_blocks,
               "unpack_hybrid_q": reference.unpack_blocks_q,
               "hybrid_linear_decode": decode_layout.hybrid_linear_decode}

for _name, _schema in _SCHEMAS.items():
    _LIB.define(_name + _schema)
    _LIB.impl(_name, _REFERENCES[_name], "CompositeExplicitAutograd")
for _name, _schema in _NATIVE_SCHEMAS.items():
    _LIB.define(_name + _schema)

# The dispatched overloads, looked up once: every op call goes through call_op.
_DISPATCHED = {name: getattr(torch.ops.sparse_kernels, name).default for name in _SCHEMAS}


@torch.library.register_fake("sparse_kernels::wanda_scores")
def _(weight, act_sq_norm, block_size):
    out_f, in_f = weight.shape
    blocks = (-(-out_f // block_size), -(-in_f // block_size))
    return (weight.new_empty(weight.shape, dtype=torch.float32),
            weight.new_empty(blocks, dtype=torch.float32))


@torch.library.register_fake("sparse_kernels::block_topk_mask")
def _(scores, k, block_size):
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("sparse_kernels::nm_mask")
def _(scores, n, m):
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("sparse_kernels::compress_24")
def _(blocks):
    n, b, _ = blocks.shape
    return blocks.new_empty((n, b, b // 2)), blocks.new_empty((n, b), dtype=torch.int16)


@torch.library.register_fake("sparse_kernels::hybrid_linear")
def _(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
      topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, bias=None):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("sparse_kernels::unpack_hybrid")
def _(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
      topk_rowptr, topk_cols, topk_vals, topk_pos, out_features, in_features):
    return dense_vals.new_empty((out_features, in_features))


@torch.library.register_fake("sparse_kernels::hybrid_linear_q")
def _(x, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
      topk_rowptr, topk_cols, topk_vals, topk_pos, scales, group_size, out_features, bias=None):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("sparse_kernels::unpack_hybrid_q")
def _(dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
      topk_rowptr, topk_cols, topk_vals, topk_pos, scales, group_size, out_features,
      in_features):
    return scales.new_empty((out_features, in_features), dtype=torch.float32)


@torch.library.register_fake("sparse_kernels::hybrid_linear_decode")
def _(x, stream, tasks, codes, counters, out_features, topk, bias=None):
    return x.new_empty((x.shape[0], out_features))


if torch.cuda.is_available():
    triton_backend.register_for_cuda(_LIB)


def ops_with_kernel(dispatch_key: str) -> list[str]:
    """The package's ops that have a kernel registered for ``dispatch_key`` (``"CUDA"``,
    ``"CPU"``): what a compiled backend serves."""
    return [name for name in _SCHEMAS
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_kernels::{name}",
                                                             dispatch_key)]


_HAS_KERNEL: dict[tuple[str, str], bool] = {}  # (dispatch key, op): a compiled kernel there


def call_op(name: str, backend: str | None, device: torch.device, *args):
    """Run op ``name`` on ``args`` with the backend ``backends.resolve_backend`` picks. Where
    that backend has no kernel for the op the torch reference serves it, with one warning per
    op and backend saying so."""
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        return _REFERENCES[name](*args)
    if chosen == "triton" and name in triton_backend.OPS:
        return triton_backend.OPS[name](*args)
    key = ("CUDA" if device.type == "cuda" else "CPU", name)
    if key not in _HAS_KERNEL and not torch.compiler.is_compiling():
        _HAS_KERNEL[key] = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"sparse_kernels::{name}", key[0])
        if not _HAS_KERNEL[key]:
            warnings.warn(f"the {chosen} backend has no kernel for {name}: the torch reference "
                          f"serves it (correct, but it rebuilds the dense weight on every call)",
                          stacklevel=3)
    return _DISPATCHED[name](*args)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape "
                         f"{tuple(t.shape)}")


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 backend: str | None = None):
    """Fused Wanda scores and block scores; see ``reference.wanda_scores`` for the contract."""
    check_2d("weight", weight)
    check_float("weight", weight)
    check_block_size(block_size)
    if act_sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"act_sq_norm must have shape ({weight.shape[1]},) (one entry per input "
                         f"column of weight), got {tuple(act_sq_norm.shape)}")
    check_float("act_sq_norm", act_sq_norm)
    return call_op("wanda_scores", backend, weight.device, weight, act_sq_norm, block_size)


def block_topk_mask(scores: torch.Tensor, k: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                    backend: str | None = None) -> torch.Tensor:
    """Bool mask keeping the ``k`` best scores of each block; see ``reference.block_topk_mask``."""
    check_2d("scores", scores)
    check_float("scores", scores)
    check_block_size(block_size)
    if not 1 <= k <= block_size * block_size:
        raise ValueError(f"k must be in 1..{block_size * block_size} (block_size^2), got {k}")
    return call_op("block_topk_mask", backend, scores.device, scores, k, block_size)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4, *,
            backend: str | None = None) -> torch.Tensor:
    """Bool mask keeping the ``n`` best of every ``m`` input columns; see ``reference.nm_mask``."""
    check_2d("scores", scores)
    check_float("scores", scores)
    if not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= n <= m, got n={n}, m={m}")
    return call_op("nm_mask", backend, scores.device, scores, n, m)


def compress_24(blocks: torch.Tensor, *, backend: str | None = None):
    """2:4 blocks [n, B, B] -> (values [n, B, B/2], meta [n, B] int16); see ``reference``."""
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks must be [n, B, B], got shape {tuple(blocks.shape)}")
    check_float("blocks", blocks)
    check_block_size(blocks.shape[1])
    return call_op("compress_24", backend, blocks.device, blocks)
