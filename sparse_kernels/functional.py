"""``hybrid_linear``: ``y = x @ W^T + bias`` straight from a ``HybridWeight``."""
import torch

from . import backends, decode_layout
from ._ops import call_op
from .format import FLOAT_VALUES, HybridWeight, PackedTensors


def check_linear_inputs(x: torch.Tensor, in_features: int, out_features: int,
                        dtype: torch.dtype, device: torch.device,
                        bias: torch.Tensor | None) -> None:
    """``dtype``: the weight's stored values; float values want x in the same dtype, low-bit
    codes (int8 / uint8) any of fp32, bf16, fp16."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features (shape {tuple(x.shape)}), the "
                         f"weight expects {in_features}")
    if dtype in FLOAT_VALUES and x.dtype != dtype:
        raise TypeError(f"x is {x.dtype} but the weight values are {dtype}; cast one "
                        f"(HybridWeight.to(dtype=...) or module.to(dtype))")
    if x.dtype not in FLOAT_VALUES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.device != device:
        raise RuntimeError(f"x is on {x.device} but the weight is on {device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_features}] {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")


def _cuda_kernel(x: torch.Tensor, values: torch.Tensor, out_features: int, topk: int,
                 backend: str | None) -> str | None:
    """The CUDA kernel (``backends.cuda_matmul_kernel``) that serves this call, or None when the
    op's own choice stands (not CUDA, not the cuda backend, fp32, B != 16, under torch.compile)."""
    if (not x.is_cuda or torch.compiler.is_compiling() or values.shape[1] != 16
            or values.dtype not in (torch.float16, torch.bfloat16)
            or backends.resolve_backend(backend, x.device) != "cuda"):
        return None
    kernel = backends.cuda_matmul_kernel(x.shape[0])
    if kernel == "v2" and decode_layout.unsupported_reason(
            values.dtype, 16, out_features, x.shape[1], topk) is not None:
        return "v1"
    return kernel


def apply_packed(x: torch.Tensor, packed: PackedTensors, out_features: int,
                 bias: torch.Tensor | None, backend: str | None,
                 decode_cache: decode_layout.DecodeLayoutCache | None = None,
                 scales: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """Run the hybrid matmul on already-checked inputs of any leading shape.

    On CUDA (fp16 / bf16, B = 16) the kernel follows the rows (``backends.cuda_matmul_kernel``):
    1-16 rows the decode kernel on ``decode_cache``'s prepared layout (v1 without a cache), many
    rows the weight unpacked to a dense matrix for cuBLAS, else the ``hybrid_linear`` op.
    Low-bit values (``scales`` given) take the ``hybrid_linear_q`` op, and on CUDA from 1024
    rows the weight unpacked (``unpack_hybrid_q``) for cuBLAS."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if scales is not None:
        if x2.is_cuda and x2.shape[0] >= backends.UNPACK_MIN_ROWS:
            weight = call_op("unpack_hybrid_q", backend, x2.device, *packed, scales, group_size,
                             out_features, x2.shape[1])
            y = torch.nn.functional.linear(x2, weight.to(x2.dtype), bias)
        else:
            y = call_op("hybrid_linear_q", backend, x2.device, x2, *packed, scales, group_size,
                        out_features, bias)
        return y.reshape(*lead, out_features)
    topk = packed.topk
    kernel = (_cuda_kernel(x2, packed.dense_vals, out_features, topk, backend) if x2.shape[0]
              else None)
    if kernel == "v2" and decode_cache is not None:
        layout = decode_cache.get(packed, out_features, x2.shape[1], topk)
        y = call_op("hybrid_linear_decode", backend, x2.device, x2, *layout.tensors(),
                  out_features, topk, bias)
    elif kernel == "unpack":
        weight = call_op("unpack_hybrid", backend, x2.device, *packed, out_features, x2.shape[1])
        y = torch.nn.functional.linear(x2, weight, bias)
    else:
        y = call_op("hybrid_linear", backend, x.device, x2, *packed, out_features, bias)
    return y.reshape(*lead, out_features)


def hybrid_linear(x: torch.Tensor, weight: HybridWeight, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """Apply a packed hybrid weight to ``x [..., in_features]`` -> ``[..., out_features]``.

    ``x``, the weight's values and ``bias [out_features]`` share one dtype (fp32, bf16 or fp16)
    and device (low-bit values take x and bias in any of the three); accumulation is fp32. ``backend`` forces a backend (``available_backends()``).
    """
    check_linear_inputs(x, weight.in_features, weight.out_features, weight.dtype, weight.device,
                        bias)
    return apply_packed(x, weight.packed_tensors(), weight.out_features, bias, backend,
                        weight.decode_cache, weight.scales, weight.group_size)
