"""The units global structured pruning removes, found from any model's config and module names.

Two kinds of unit per decoder layer:

* an **attention group**: one key/value head, the ``group_size = num_heads / num_kv_heads``
  query heads that share it (``q`` rows ``[g * group_size * head_dim, (g + 1) * ...)``; a query
  head ``h`` reads KV head ``h // group_size``), its ``k`` and ``v`` rows ``[g * head_dim,
  (g + 1) * head_dim)`` and the ``o`` input columns of its query heads. GQA 1:1 (LLaMA-2, OPT)
  makes a group one head.
* an **MLP channel**: one row of every expanding projection (``gate`` and ``up``; OPT's ``fc1``)
  and the matching input column of the contracting one (``down``; ``fc2``).

Removing a unit removes exactly its contribution to the layer's output: the ``o`` / ``down``
columns are the only path from a head group or a channel to the residual stream.

Discovery is by the projections' names (the one table below) and checked against the config's
head counts and the weights' shapes; architectures with fused projections (GPT-2's ``c_attn``,
GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import decoder_layers, is_prunable

__all__ = ["LayerUnits", "discover_units", "ATTENTION", "MLP"]

ATTENTION, MLP = "attention", "mlp"

# The last component of a projection's module name, by role.
ROLE_NAMES = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj", "out_proj"),
    "expand": ("gate_proj", "up_proj", "fc1"),
    "contract": ("down_proj", "fc2"),
}
FUSED_NAMES = ("c_attn", "query_key_value", "qkv_proj", "W_pack", "gate_up_proj", "c_fc")


@dataclass(frozen=True)
class LayerUnits:
    """The units of one decoder layer. Names are relative to the layer; ``attention`` is the
    module holding q/k/v/o (its ``num_heads``-like attributes are updated when groups go)."""

    index: int
    attention: str
    q: str
    k: str
    v: str
    o: str
    expand: tuple[str, ...]
    contract: str
    head_dim: int
    group_size: int
    groups: int
    channels: int
    hidden: int

    def count(self, kind: str) -> int:
        return self.groups if kind == ATTENTION else self.channels

    def unit_cost(self, kind: str, layer: nn.Module) -> int:
        """Parameters one unit of ``kind`` holds (weights and the biases of its rows)."""
        if kind == ATTENTION:
            rows = (self.group_size + 2) * self.head_dim  # q, k and v rows
            cost = rows * self.hidden + self.group_size * self.head_dim * self.hidden  # o columns
            cost += sum(self.head_dim * (self.group_size if n == self.q else 1)
                        for n in (self.q, self.k, self.v)
                        if layer.get_submodule(n).bias is not None)
            return cost
        cost = (len(self.expand) + 1) * self.hidden
        return cost + sum(layer.get_submodule(n).bias is not None for n in self.expand)


def _role(name: str) -> str | None:
    last = name.rsplit(".", 1)[-1]
    for role, names in ROLE_NAMES.items():
        if last in names:
            return role
    return None


def _one(found: dict, role: str, layer_index: int) -> str:
    names = found.get(role, [])
    if len(names) != 1:
        raise ValueError(f"layer {layer_index}: expected one {'/'.join(ROLE_NAMES[role])} "
                         f"projection, found {names or 'none'}")
    return names[0]


def _head_counts(config) -> tuple[int, int, int]:
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ValueError("the config has no num_attention_heads: cannot find attention groups")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv}")
    return heads, kv, head_dim


def _layer_units(index: int, layer: nn.Module, config) -> LayerUnits:
    found: dict[str, list[str]] = {}
    for name, module in layer.named_modules():
        if not is_prunable(module):
            continue
        if name.rsplit(".", 1)[-1] in FUSED_NAMES or not isinstance(module, nn.Linear):
            raise ValueError(f"layer {index}: {name!r} is a fused projection; structured pruning "
                             "needs separate q/k/v (and gate/up) projections")
        role = _role(name)
        if role is not None:
            found.setdefault(role, []).append(name)
    q, k, v, o = (_one(found, r, index) for r in ("q", "k", "v", "o"))
    contract = _one(found, "contract", index)
    expand = tuple(found.get("expand", ()))
    if not expand:
        raise ValueError(f"layer {index}: no gate_proj/up_proj/fc1 projection found")
    attention = q.rsplit(".", 1)[0] if "." in q else ""
    heads, kv, head_dim = _head_counts(config)
    mods = {n: layer.get_submodule(n) for n in (q, k, v, o, contract, *expand)}
    hidden = mods[o].out_features
    expected = {q: (heads * head_dim, hidden), k: (kv * head_dim, hidden),
                v: (kv * head_dim, hidden), o: (hidden, heads * head_dim)}
    channels = mods[contract].in_features
    expected.update({n: (channels, hidden) for n in expand})
    expected[contract] = (hidden, channels)
    for n, shape in expected.items():
        if tuple(mods[n].weight.shape) != shape:
            raise ValueError(f"layer {index}: {n} has weight {tuple(mods[n].weight.shape)}, "
                             f"expected {shape} from the config ({heads} heads, {kv} KV heads, "
                             f"head_dim {head_dim}, hidden {hidden}, {channels} MLP channels)")
    return LayerUnits(index, attention, q, k, v, o, expand, contract, head_dim, heads // kv,
                      kv, channels, hidden)


def discover_units(model: nn.Module) -> list[LayerUnits]:
    """One :class:`LayerUnits` per decoder layer, from the model's config, module names and
    weight shapes (raises naming what does not fit)."""
    _, layers = decoder_layers(model)
    config = model.config
    return [_layer_units(i, layer, config) for i, layer in enumerate(layers)]
