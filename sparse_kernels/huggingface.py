"""Packed checkpoints through transformers' own door: ``from_pretrained`` builds
``HybridSparseLinear`` modules straight from the packed tensors.

A model swapped by :func:`sparse_kernels.sparsify_model` carries
``config.quantization_config = {"quant_method": "sparse_kernels_hybrid", ...}``, so
``save_pretrained`` writes its packed buffers (``<module>.dense_vals``, ``.s24_meta``, ...)
and that entry. Loading such a folder, transformers asks the quantizer registered here for
that method (the plug-in point torchao, bitsandbytes and compressed-tensors use) to prepare
the empty model: it reads only the small ``<module>.tier_map`` tensors of the checkpoint,
replaces those ``nn.Linear`` modules by empty ``HybridSparseLinear`` ones of exactly the shapes
their packed tensors have (on the meta device: no dense weight is ever made), and the normal
loading then fills their buffers by name. After loading, every module's packed tensors are
validated (``format.validate_packed``) before any kernel runs.

Registration happens when transformers is imported (``import sparse_kernels`` installs a hook
for that, so importing this package does not import transformers).
"""
from __future__ import annotations

import torch
from torch import nn

from .format import validate_packed
from .rules import DEFAULT_GROUP_SIZE, group_size_for
from .modules import QUANT_METHOD, HybridSparseLinear

_REGISTERED = False
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CODE_BITS = {"I8": 8, "U8": 4}  # low-bit codes' stored dtype -> bits


def _tier_maps_and_k(checkpoint_files) -> dict[str, tuple]:
    """``{module: (tier map, K, has bias, float dtype, bits)}`` of every packed module in the
    files; the float dtype of a low-bit module is its bias's (None without one)."""
    from safetensors import safe_open

    found = {}
    for path in checkpoint_files or ():
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"packed checkpoints are safetensors files; {path} is not")
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if not key.endswith(".tier_map"):
                    continue
                module = key[: -len(".tier_map")]
                # K from the shape of the top-K values [n_topk, K], without reading them.
                k = f.get_slice(f"{module}.topk_vals").get_shape()[1]
                dtype = f.get_slice(f"{module}.dense_vals").get_dtype()
                if dtype not in _SAFETENSORS_DTYPES and dtype not in _CODE_BITS:
                    raise ValueError(f"{path}: {module}.dense_vals has dtype {dtype}; packed "
                                     f"values are F32, F16, BF16, I8 (8-bit codes) or U8 (4-bit)")
                has_bias = f"{module}.bias" in keys
                bits = _CODE_BITS.get(dtype, 16)
                if bits < 16:
                    k = f.get_slice(f"{module}.topk_pos").get_shape()[1]
                    dtype = f.get_slice(f"{module}.bias").get_dtype() if has_bias else None
                found[module] = (f.get_tensor(key), int(k), has_bias,
                                 _SAFETENSORS_DTYPES.get(dtype), bits)
    return found


def _checkpoint_renaming(model: nn.Module):
    """``name -> name``: the renamings transformers applies to this model's checkpoint keys when
    it loads them (``save_pretrained`` writes some architectures under legacy names, e.g.
    Mixtral's ``block_sparse_moe`` for ``mlp``), so packed module names found in the files are
    looked up where the loaded model has them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without renamings
        return lambda name: name
    renamings = [t for t in get_model_conversion_mapping(model)
                 if isinstance(t, WeightRenaming)]

    def rename(name: str) -> str:
        key = name + ".tier_map"
        for t in renamings:
            key, _ = t.rename_source_key(key)
        return key[: -len(".tier_map")]
    return rename


def install_packed_shells(model: nn.Module, checkpoint_files, block_size: int,
                          dtype: torch.dtype | None = None,
                          group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every ``nn.Linear`` the checkpoint files pack by an empty (meta-device)
    ``HybridSparseLinear`` of the Linear's shape and the file's tier map, K, bias, value dtype
    (``dtype`` overrides the latter) and precision (low-bit modules: groups of
    ``rules.group_size_for(in_features, group_size)``); the normal loading then fills their
    buffers by name. Packed experts of a mixture-of-experts layer get their per-expert Linears
    first."""
    from .experts import unfuse_where_named

    rename = _checkpoint_renaming(model)
    packed = {rename(name): found for name, found in _tier_maps_and_k(checkpoint_files).items()}
    unfuse_where_named(model, packed)
    for name, (tier_map, k, has_bias, file_dtype, bits) in packed.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"the checkpoint packs {name!r}, which this model "
                             f"architecture has as a {type(old).__name__}")
        setattr(parent, attr, HybridSparseLinear(
            old.in_features, old.out_features, tier_map, k, block_size, has_bias, bits=bits,
            group_size=group_size_for(old.in_features, group_size, block_size),
            dtype=dtype or file_dtype or old.weight.dtype, device="meta"))
    return model


def validate_packed_modules(model: nn.Module) -> None:
    """Check every ``HybridSparseLinear``'s packed tensors (``format.validate_packed``) before
    any kernel runs on them."""
    for name, module in model.named_modules():
        if isinstance(module, HybridSparseLinear):
            weight = module.hybrid_weight
            validate_packed(weight.tensors(), weight.out_features, weight.in_features,
                            weight.block_size, weight.topk, group_size=weight.group_size,
                            where=name)


def register() -> None:
    """Register the packed format's config and quantizer with transformers (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(QUANT_METHOD)
    class HybridSparseConfig(QuantizationConfigMixin):
        """``quantization_config`` of a packed checkpoint (see ``modules.checkpoint_config``)."""

        def __init__(self, block_size: int = 16, format: str = "sparse_kernels.HybridWeight",
                     format_version: int = 1, bits=(16,), group_size: int = DEFAULT_GROUP_SIZE,
                     **kwargs):
            self.quant_method = QUANT_METHOD
            self.block_size = block_size
            self.format = format
            self.format_version = format_version
            self.bits = list(bits)
            self.group_size = group_size

        def to_dict(self):
            return {"quant_method": QUANT_METHOD, "format": self.format,
                    "format_version": self.format_version, "block_size": self.block_size,
                    "bits": self.bits, "group_size": self.group_size}

    @register_quantizer(QUANT_METHOD)
    class HybridSparseQuantizer(HfQuantizer):
        """Builds the packed modules before loading; validates them after."""

        requires_calibration = True  # only ever loads checkpoints packed by this package

        def validate_environment(self, *args, **kwargs):
            from .format import FORMAT_VERSION

            if self.quantization_config.format_version > FORMAT_VERSION:
                raise ValueError(f"this checkpoint has packed format version "
                                 f"{self.quantization_config.format_version}; this package "
                                 f"reads up to {FORMAT_VERSION}: upgrade sparse_kernels")

        def preprocess_model(self, model, *args, **kwargs):
            # Older transformers take checkpoint_files here without passing it on.
            self._checkpoint_files = kwargs.get("checkpoint_files")
            self._dtype = kwargs.get("dtype")
            return super().preprocess_model(model, *args, **kwargs)

        def _process_model_before_weight_loading(self, model, **kwargs):
            files = kwargs.get("checkpoint_files") or self._checkpoint_files
            if not files:
                raise ValueError("loading a packed checkpoint needs its files; this version of "
                                 "transformers did not pass them to the quantizer")
            return install_packed_shells(model, files, self.quantization_config.block_size,
                                         self._dtype if isinstance(self._dtype, torch.dtype)
                                         else None, self.quantization_config.group_size)

        def _process_model_after_weight_loading(self, model, **kwargs):
            validate_packed_modules(model)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    _REGISTERED = True

