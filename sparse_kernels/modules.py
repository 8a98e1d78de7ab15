"""``HybridSparseLinear`` and ``sparsify_model``: swap pruned ``nn.Linear`` layers for kernels."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import backends
from .decode_layout import DecodeLayoutCache
from .experts import unfuse_where_named
from .format import (FORMAT_VERSION, PACKED_FIELDS, HybridWeight, PackedTensors, check_packable,
                     validate_packed)
from .rules import DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE, DEFAULT_TOPK, group_size_for
from .functional import apply_packed, check_linear_inputs


# The quantization method name a packed checkpoint's config.json carries.
QUANT_METHOD = "sparse_kernels_hybrid"


class HybridSparseLinear(nn.Module):
    """A linear layer whose weight is stored in the packed three-tier format.

    ``forward(x [..., in_features]) -> [..., out_features]`` equals ``F.linear(x, W, bias)`` for
    the masked weight ``W`` it was built from. The packed tensors are buffers (names as in
    ``HybridWeight``), so ``state_dict`` / ``load_state_dict`` round-trip between modules made
    with the same tier map. ``backend`` pins a kernel backend (None: the fastest available).
    ``bits`` 8 / 4: low-bit values with ``scales`` of ``group_size`` (``format.py``); ``dtype``
    is then the bias's and the outputs are in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, tier_map: torch.Tensor,
                 topk: int = DEFAULT_TOPK, block_size: int = DEFAULT_BLOCK_SIZE,
                 bias: bool = True, *, bits: int = 16, group_size: int = 0,
                 dtype: torch.dtype | None = None, device=None, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.topk, self.backend = block_size, topk, backend
        self.group_size = group_size if bits < 16 else 0
        # The CUDA decode kernel's prepared layout of the buffers below, built on the first
        # decode-sized call on a GPU and kept beside them (not saved; rebuilt when they change).
        self._decode_cache = DecodeLayoutCache()
        dtype = dtype or torch.get_default_dtype()
        empty = HybridWeight.empty(out_features, in_features, tier_map, topk, block_size,
                                   dtype=dtype, device=device, bits=bits,
                                   group_size=self.group_size)
        for name, tensor in empty.tensors().items():
            self.register_buffer(name, tensor)
        # Registered even when absent (as nn.Linear does), so forward finds it in _parameters.
        self.register_parameter("bias", nn.Parameter(
            torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias else None)

    @classmethod
    def from_weight(cls, weight: HybridWeight, bias: torch.Tensor | None = None, *,
                    backend: str | None = None) -> HybridSparseLinear:
        float_dtype = weight.dtype if weight.bits == 16 else (
            bias.dtype if bias is not None else torch.get_default_dtype())
        module = cls(weight.in_features, weight.out_features, weight.tier_map, weight.topk,
                     weight.block_size, bias is not None, bits=weight.bits,
                     group_size=weight.group_size, dtype=float_dtype, device=weight.device,
                     backend=backend)
        for name, tensor in weight.tensors().items():
            getattr(module, name).copy_(tensor)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, tier_map: torch.Tensor, topk: int = DEFAULT_TOPK,
                    block_size: int = DEFAULT_BLOCK_SIZE, *, bits: int = 16,
                    group_size: int | None = None, scales: torch.Tensor | None = None,
                    backend: str | None = None) -> HybridSparseLinear:
        """Pack a pruned ``nn.Linear`` (its weight must already follow ``tier_map``; with
        ``bits`` 8 / 4 its values become codes, see ``HybridWeight.from_dense``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        weight = HybridWeight.from_dense(linear.weight.detach(), tier_map, topk, block_size,
                                         bits=bits, group_size=group_size, scales=scales)
        return cls.from_weight(weight, linear.bias, backend=backend)

    def _apply(self, fn, *args, **kwargs):
        # A move or cast (.to, .cuda, .cpu, .half) drops the prepared layout at once, so
        # moving a model off the GPU frees it too; the next decode call prepares a new one.
        self._decode_cache = DecodeLayoutCache()
        # Low-bit scales are part of the format (fp16): a cast of the module (say to bf16, which
        # would round them) moves them to the new device and leaves their dtype alone.
        scales = self._buffers.pop("scales", None)
        try:
            out = super()._apply(fn, *args, **kwargs)
        finally:
            if scales is not None:
                self._buffers["scales"] = scales.to(device=fn(scales[:0]).device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Validate a complete set of packed tensors before they replace this module's: a corrupt
        # or crafted state dict must raise here, never reach a kernel.
        fields = ("tier_map",) + PACKED_FIELDS + (("scales",) if self.group_size else ())
        if all(prefix + f in state_dict for f in fields):
            validate_packed({f: state_dict[prefix + f] for f in fields}, self.out_features,
                            self.in_features, self.block_size, self.topk,
                            group_size=self.group_size,
                            where=prefix.rstrip(".") or type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def hybrid_weight(self) -> HybridWeight:
        return HybridWeight(self.out_features, self.in_features, self.block_size, self.topk,
                            **{name: getattr(self, name) for name in ("tier_map",) + PACKED_FIELDS},
                            scales=self._buffers.get("scales"), group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Direct dict lookups: nn.Module.__getattr__ costs about 1 us each, and a decode step
        # of a small model calls hundreds of these modules.
        buffers, bias = self._buffers, self._parameters["bias"]
        packed = PackedTensors(*(buffers[name] for name in PACKED_FIELDS))
        values = buffers["dense_vals"]
        check_linear_inputs(x, self.in_features, self.out_features, values.dtype, values.device,
                            bias)
        return apply_packed(x, packed, self.out_features, bias, self.backend,
                            self._decode_cache, buffers.get("scales"), self.group_size)

    def extra_repr(self) -> str:
        counts = self.hybrid_weight.tier_counts()
        tiers = ", ".join(f"{name}={n}" for name, n in counts.items())
        bits = "" if not self.group_size else \
            f", int{self.hybrid_weight.bits} (group {self.group_size})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, topk={self.topk}{bits}, blocks({tiers}), "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")


_WARNED_REFERENCE = set()  # devices warned about once per process


def _reference_cost_message(device: torch.device) -> str:
    return (f"only the pure-torch reference backend can run the hybrid kernels on {device} "
            f"({backends.available_backends()} available): it rebuilds each dense weight on "
            f"every call, slower than nn.Linear and with no memory saved while it runs. Build "
            f"the compiled kernels (pip install -e . --no-build-isolation) or keep the model "
            f"dense")


def sparsify_model(model: nn.Module, tier_maps: dict[str, torch.Tensor],
                   topk: int | dict[str, int] = DEFAULT_TOPK,
                   block_size: int = DEFAULT_BLOCK_SIZE, *,
                   bits: int | dict[str, int] = 16, group_size: int = DEFAULT_GROUP_SIZE,
                   scales: dict[str, torch.Tensor] | None = None,
                   backend: str | None = None, strict: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` named in ``tier_maps`` (names as in ``named_modules()``).

    Each weight must already follow its tier map (pruned). ``topk``: K of every module, or
    ``{name: K}`` per module. ``bits``: the values' precision, of every module or per module;
    8 / 4 store codes in groups of ``rules.group_size_for(in_features, group_size)`` columns,
    with the module's ``scales`` where given (a joint prune and quantization put the weight on
    their grid), else rounded to the nearest codes. Every name is checked before any module is
    replaced (a bad name
    changes nothing); then the modules are packed and swapped one at a time, so the memory peak
    is the model plus one packed module. When only the torch reference backend would serve the
    modules (no compiled kernels for their device) this warns once, naming the cost, or with
    ``strict=True`` raises. The model's config (if any) records the packed format, so
    ``save_pretrained`` writes a checkpoint that ``from_pretrained`` reloads packed. Names of
    experts (``<experts>.gate_up.<e>`` / ``<experts>.down.<e>``) in a model whose experts are
    still fused get their per-expert Linears first (:mod:`sparse_kernels.experts`).
    Returns ``model``, changed in place.
    """
    unfuse_where_named(model, tier_maps)
    topks = topk if isinstance(topk, dict) else dict.fromkeys(tier_maps, topk)
    precision = bits if isinstance(bits, dict) else dict.fromkeys(tier_maps, bits)
    scales = scales or {}
    for name in tier_maps:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"the model has no module named {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
        if name not in topks:
            raise KeyError(f"topk has no K for {name!r}")
        if name not in precision:
            raise KeyError(f"bits has no precision for {name!r}")
        try:  # one module's temporaries at a time: the weight must already follow its map
            check_packable(module.weight.detach(), tier_maps[name], topks[name], block_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        device = module.weight.device
        if backend is None and backends.resolve_backend(None, device) == "torch":
            if strict:
                raise RuntimeError(_reference_cost_message(device))
            if device.type not in _WARNED_REFERENCE:
                _WARNED_REFERENCE.add(device.type)
                warnings.warn(_reference_cost_message(device), stacklevel=2)
    for name, tier_map in tier_maps.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        setattr(parent, attr, HybridSparseLinear.from_linear(
            linear, tier_map, topks[name], block_size, bits=precision[name],
            group_size=group_size_for(linear.in_features, group_size, block_size),
            scales=scales.get(name), backend=backend))
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = checkpoint_config(
            block_size, sorted(set(precision[n] for n in tier_maps)), group_size)
    return model


def checkpoint_config(block_size: int = DEFAULT_BLOCK_SIZE, bits=(16,),
                      group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """The ``quantization_config`` entry of a packed checkpoint's ``config.json``: it sends
    ``from_pretrained`` to this package's loader (``sparse_kernels.huggingface``). ``bits``:
    the value precisions its modules use (each module's own is in its tensors' dtype);
    ``group_size``: the preferred G of low-bit modules (each module's own is
    ``rules.group_size_for`` its input width)."""
    return {"quant_method": QUANT_METHOD, "format": "sparse_kernels.HybridWeight",
            "format_version": FORMAT_VERSION, "block_size": block_size, "bits": list(bits),
            "group_size": group_size}
