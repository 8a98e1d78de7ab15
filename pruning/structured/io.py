"""Saving a structurally pruned model as a real, smaller model, and loading it back.

The config records the size of every layer that remains (``structured_layers``: attention
groups, query heads and MLP channels per layer). When every layer has the same sizes, the stock
fields (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, the intermediate size)
describe the model, and plain ``AutoModelForCausalLM.from_pretrained`` loads it; this is checked
by validating that config and building the model from it and comparing every weight's shape
(``structured_stock_loadable`` in the config). transformers refuses some head counts (LLaMA's
config wants ``hidden_size`` to be a multiple of ``num_attention_heads`` even with an explicit
``head_dim``: 4096 and 28 heads fail); the reason is kept as ``structured_stock_refused``.

A config holds one size for all layers, so a model whose layers differ cannot be built by stock
transformers (``from_pretrained`` refuses the mis-shaped tensors): :func:`load_structured`
builds it from the config without initialising weights, resizes each layer's projections to the
recorded sizes (packed three-tier modules at those sizes, for a checkpoint pruned both ways) and
then loads the safetensors weights. ``pruning.loading.load_model`` (every ``--model``) does this
by itself for such a folder.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sparse_kernels.huggingface import install_packed_shells, validate_packed_modules

from ..models import decoder_layers
from .slicing import resize_linear, set_head_counts
from .units import discover_units

__all__ = ["record_sizes", "load_structured", "is_structured", "INTERMEDIATE_KEYS"]

# Config keys that hold the MLP width, by architecture family.
INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def _intermediate_key(config, channels: int) -> str | None:
    for key in INTERMEDIATE_KEYS:
        if getattr(config, key, None) == channels:
            return key
    return None


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_empty(config, dtype=None) -> nn.Module:
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def record_sizes(model: nn.Module, sizes: list[dict], head_dim: int, channels: int) -> bool:
    """Write the sliced ``model``'s sizes into its config, in place: ``structured_layers``,
    and the stock fields when every layer has the same sizes and a model built from them has
    exactly the sliced weights' shapes. ``head_dim`` and ``channels``: the original model's
    head size and MLP width. Returns whether stock ``from_pretrained`` can load it."""
    config = model.config
    config.structured_layers = sizes
    config.structured_stock_loadable = False
    first = sizes[0]
    if any(s != first for s in sizes):
        return False
    trial = copy.deepcopy(config)
    fields = {"num_attention_heads": first["heads"], "head_dim": head_dim}
    if hasattr(trial, "num_key_value_heads"):
        fields["num_key_value_heads"] = first["attention_groups"]
    key = _intermediate_key(trial, channels)
    if key is None:
        return False
    fields[key] = first["mlp_channels"]
    for name, value in fields.items():
        setattr(trial, name, value)
    try:  # transformers' own checks (e.g. hidden_size a multiple of the head count)
        if hasattr(trial, "validate"):
            trial.validate()
        with torch.device("meta"):
            built = _build_empty(trial)
    except Exception as err:  # noqa: BLE001  (huggingface_hub's validation errors are bare)
        config.structured_stock_refused = str(err).splitlines()[-1].strip()
        return False
    if _shapes(built) != _shapes(model):
        return False
    for name, value in {**fields, "structured_stock_loadable": True}.items():
        setattr(config, name, value)
    return True


def is_structured(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model :func:`pruning.structured.structured_prune` saved with
    per-layer sizes that stock transformers cannot build."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return "structured_layers" in config and not config.get("structured_stock_loadable", False)


def _resize_layers(model: nn.Module, sizes: list[dict], where: str) -> None:
    """Give each layer's projections the recorded sizes (uninitialised)."""
    units = discover_units(model)
    _, layers = decoder_layers(model)
    if len(sizes) != len(layers):
        raise ValueError(f"{where}: structured_layers lists {len(sizes)} layers, the config "
                         f"builds {len(layers)}")
    for u, size in zip(units, sizes):
        layer = layers[u.index]
        q_rows = size["heads"] * u.head_dim
        kv_rows = size["attention_groups"] * u.head_dim
        shapes = {u.q: (q_rows, u.hidden), u.k: (kv_rows, u.hidden), u.v: (kv_rows, u.hidden),
                  u.o: (u.hidden, q_rows), u.contract: (u.hidden, size["mlp_channels"])}
        shapes.update({n: (size["mlp_channels"], u.hidden) for n in u.expand})
        for name, (out_f, in_f) in shapes.items():
            parent, _, attr = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, attr, resize_linear(getattr(owner, attr), out_f, in_f))
        set_head_counts(layer.get_submodule(u.attention), size["heads"],
                        size["attention_groups"])


def _load_weights(model: nn.Module, folder: Path, config, dtype) -> None:
    """Load every ``*.safetensors`` of ``folder`` into ``model`` by name; anything missing
    (but a tied output embedding) or unexpected raises."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != "tier_maps.safetensors":
            state.update(load_file(file))
    if not state:
        raise FileNotFoundError(f"{str(folder)!r} has no *.safetensors weights")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{str(folder)!r}: weights do not match the structured config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()


def load_structured(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | None = None):
    """``(model, tokenizer)`` from a folder ``hybrid-prune structured --save`` wrote (any
    per-layer sizes, dense or packed three-tier), in eval mode; dense weights load strictly (a
    missing or mis-shaped tensor raises)."""
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(folder)
    sizes = getattr(config, "structured_layers", None)
    if not sizes:
        raise ValueError(f"{str(folder)!r}: config.json has no structured_layers; load it with "
                         "AutoModelForCausalLM.from_pretrained")
    packed = getattr(config, "quantization_config", None)
    plain = copy.deepcopy(config)
    if packed:
        del plain.quantization_config
    model = _build_empty(plain, dtype=dtype or torch.float32)
    _resize_layers(model, sizes, str(folder))
    if packed:  # pruned three-tier as well: the packed modules at the sliced shapes
        install_packed_shells(model, sorted(folder.glob("model*.safetensors")),
                              packed["block_size"], dtype)
    _load_weights(model, folder, config, dtype)
    if packed:
        validate_packed_modules(model)
        model.config.quantization_config = packed
    model = model.to(device or "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) \
        if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer
