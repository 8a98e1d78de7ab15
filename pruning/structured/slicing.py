"""Making the model smaller: the kept rows and columns become new, smaller Linears.

:func:`apply_plan` slices, in place, every projection a :class:`Plan` touches (q/k/v rows and o
columns of the removed attention groups, gate/up rows and down columns of the removed MLP
channels), updates the attention modules' head-count attributes where they keep them (OPT's
``num_heads``; LLaMA's reshape infers the count), deletes collapsed layers (renumbering the
``layer_idx`` the KV cache is indexed by, and slicing per-layer config lists such as
``layer_types``) and returns the per-layer sizes. The result computes exactly what the original
computes with the removed units' o / down columns set to zero.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import decoder_layers
from .select import Plan
from .units import ATTENTION, MLP, LayerUnits

__all__ = ["apply_plan", "resize_linear", "set_head_counts", "HEAD_COUNT_ATTRS"]

# Attention-module attributes that hold a head count (set where present).
HEAD_COUNT_ATTRS = {"num_heads": "heads", "num_attention_heads": "heads",
                    "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads"}


def _keep_index(n: int, removed: list[int], width: int) -> torch.Tensor:
    """Indices of the kept features when units of ``width`` consecutive features go."""
    keep = torch.ones(n * width, dtype=torch.bool)
    for i in removed:
        keep[i * width:(i + 1) * width] = False
    return keep.nonzero().flatten()


def resize_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    """An uninitialised Linear of the new shape, same dtype / device / bias presence (the
    weights are loaded afterwards)."""
    return nn.Linear(in_features, out_features, bias=linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)


def _sliced(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = resize_linear(linear, w.shape[0], w.shape[1])
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, rows.to(bias.device)) if rows is not None
                           else bias)
    new.train(linear.training)
    return new


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, module)


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Write the new head counts into the attention module's attributes that hold them."""
    counts = {"heads": heads, "kv_heads": kv_heads}
    for attr, which in HEAD_COUNT_ATTRS.items():
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, counts[which])


def _slice_layer(layer: nn.Module, u: LayerUnits, removed_groups: list[int],
                 removed_channels: list[int]) -> dict:
    d, gs = u.head_dim, u.group_size
    if removed_groups:
        q_rows = _keep_index(u.groups, removed_groups, gs * d)
        kv_rows = _keep_index(u.groups, removed_groups, d)
        _replace(layer, u.q, _sliced(layer.get_submodule(u.q), q_rows, None))
        _replace(layer, u.k, _sliced(layer.get_submodule(u.k), kv_rows, None))
        _replace(layer, u.v, _sliced(layer.get_submodule(u.v), kv_rows, None))
        _replace(layer, u.o, _sliced(layer.get_submodule(u.o), None, q_rows))
    groups = u.groups - len(removed_groups)
    set_head_counts(layer.get_submodule(u.attention), groups * gs, groups)
    if removed_channels:
        keep = _keep_index(u.channels, removed_channels, 1)
        for name in u.expand:
            _replace(layer, name, _sliced(layer.get_submodule(name), keep, None))
        _replace(layer, u.contract, _sliced(layer.get_submodule(u.contract), None, keep))
    return {"attention_groups": groups, "heads": groups * gs,
            "mlp_channels": u.channels - len(removed_channels)}


def _delete_layers(model: nn.Module, collapsed: list[int]) -> None:
    path, layers = decoder_layers(model)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(collapsed)]
    new = nn.ModuleList([layers[i] for i in kept])
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    for new_index, layer in enumerate(new):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and key != "structured_layers":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)


def apply_plan(model: nn.Module, units: list[LayerUnits], plan: Plan) -> list[dict]:
    """Slice ``model`` in place by ``plan`` (see the module docstring); returns the sizes of the
    layers that remain, in order: ``{"attention_groups", "heads", "mlp_channels"}``."""
    _, layers = decoder_layers(model)
    sizes = []
    for u in units:
        if u.index in plan.collapsed:
            continue
        sizes.append(_slice_layer(layers[u.index], u, plan.removed.get((u.index, ATTENTION), []),
                                  plan.removed.get((u.index, MLP), [])))
    if plan.collapsed:
        _delete_layers(model, plan.collapsed)
    return sizes
