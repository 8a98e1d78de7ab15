"""Mixture-of-experts layers whose experts are fused 3-D parameters, as one Linear per expert.

transformers stores the experts of Mixtral, Qwen2-MoE and Qwen3-MoE as ``gate_up_proj``
``[E, 2 * I, H]`` and ``down_proj`` ``[E, H, I]`` inside one module whose forward is
``forward(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])``:
expert ``e`` takes the tokens routed to it, ``act(gate) * up`` with ``gate, up`` the two halves
of ``x @ gate_up_proj[e]^T``, then ``@ down_proj[e]^T``, scaled by the routing weight and
summed per token.

:class:`ExpertLinears` computes exactly that with ``gate_up[e]`` and ``down[e]`` as
``nn.Linear`` modules whose weights are views of the fused parameters (no copy), so everything
built for Linears works per expert: calibration hooks see only the tokens routed to each expert,
the pruning methods prune each slice, ``sparsify_model`` packs each one into a
``HybridSparseLinear`` (which takes any number of rows). Its state dict keeps the fused layout
(``gate_up_proj``, ``down_proj``) while every expert is a plain Linear, so ``save_pretrained``
writes what stock transformers loads; once experts are packed, their packed tensors are saved
per expert (``gate_up.<e>.dense_vals`` ...) and :func:`unfuse_where_named` rebuilds the same
structure when such a checkpoint loads.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExpertLinears", "is_fused_experts", "unfuse_experts", "unfuse_where_named"]

FUSED = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts as 3-D ``gate_up_proj`` / ``down_proj`` parameters."""
    params = [getattr(module, name, None) for name in FUSED]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params) \
        and hasattr(module, "act_fn") and params[0].shape[0] == params[1].shape[0]


def _linear_view(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return linear


class ExpertLinears(nn.Module):
    """A fused experts module's computation with one ``nn.Linear`` per expert and projection.

    ``gate_up[e]``: ``[2 * I, H]``, ``down[e]``: ``[H, I]`` (views of the fused parameters when
    built by :meth:`from_fused`). ``tokens[e]`` counts the tokens routed to expert ``e`` since
    the last :meth:`reset_counts`.
    """

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: nn.Module):
        super().__init__()
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.act_fn = act_fn
        self.num_experts = len(gate_up)
        self.register_buffer("tokens", torch.zeros(self.num_experts, dtype=torch.long),
                             persistent=False)
        self._register_load_state_dict_pre_hook(self._split_fused)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "ExpertLinears":
        gate_up = [_linear_view(fused.gate_up_proj.data[e]) for e in range(len(fused.gate_up_proj))]
        down = [_linear_view(fused.down_proj.data[e]) for e in range(len(fused.down_proj))]
        return cls(gate_up, down, fused.act_fn)

    def reset_counts(self) -> None:
        self.tokens.zero_()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            self.tokens[e] += token.numel()
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _all_plain(self) -> bool:
        return all(type(m) is nn.Linear for m in [*self.gate_up, *self.down])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self._all_plain():
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, linears in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            weights = [m.weight if keep_vars else m.weight.detach() for m in linears]
            destination[prefix + name] = torch.stack(weights)

    def state_dict(self, *args, **kwargs):
        # The children are saved by _save_to_state_dict above (in the fused layout) while they
        # are plain Linears; keep them out of the per-child recursion then.
        if not self._all_plain():
            return super().state_dict(*args, **kwargs)
        destination = kwargs.get("destination")
        prefix = kwargs.get("prefix", "")
        keep_vars = kwargs.get("keep_vars", False)
        if args:
            destination = args[0]
            prefix = args[1] if len(args) > 1 else prefix
            keep_vars = args[2] if len(args) > 2 else keep_vars
        if destination is None:
            from collections import OrderedDict
            destination = OrderedDict()
        self._save_to_state_dict(destination, prefix, keep_vars)
        return destination

    def _split_fused(self, state_dict, prefix, *_args):
        for name, linears in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            fused = state_dict.pop(prefix + name, None)
            if fused is not None:
                child = "gate_up" if name == "gate_up_proj" else "down"
                for e in range(len(linears)):
                    state_dict[f"{prefix}{child}.{e}.weight"] = fused[e]


def unfuse_experts(model: nn.Module) -> dict[str, ExpertLinears]:
    """Replace every fused experts module of ``model`` by an :class:`ExpertLinears` sharing its
    weights, in place (after checking on a few random tokens that it computes the same);
    ``{module name: ExpertLinears}``, empty when there are none."""
    found = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    replaced = {}
    for name, fused in found.items():
        linears = ExpertLinears.from_fused(fused)
        _check_same(fused, linears, name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linears)
        replaced[name] = linears
    return replaced


@torch.no_grad()
def _check_same(fused: nn.Module, linears: ExpertLinears, name: str) -> None:
    weight = fused.gate_up_proj
    if weight.device.type == "meta":
        return
    g = torch.Generator(device="cpu").manual_seed(0)
    experts, hidden = weight.shape[0], weight.shape[2]
    x = torch.randn(8, hidden, generator=g).to(weight)
    index = torch.randint(0, experts, (8, min(2, experts)), generator=g).to(weight.device)
    w = torch.rand(8, index.shape[1], generator=g).to(weight)
    expected, got = fused(x, index, w), linears(x, index, w)
    linears.reset_counts()
    if not torch.allclose(expected, got, rtol=1e-3, atol=1e-4):
        raise ValueError(f"{name}: {type(fused).__name__} does not compute act(gate) * up -> "
                         f"down per expert as expected; its experts cannot be pruned one by one")


def unfuse_where_named(model: nn.Module, names) -> None:
    """Where ``names`` (of a packed checkpoint's modules, or of saved tier maps) hold
    ``<experts>.gate_up.<e>`` / ``<experts>.down.<e>`` and ``model`` has a fused experts module
    at ``<experts>``, replace it by an :class:`ExpertLinears` sharing its weights, so those names
    resolve (before a packed checkpoint loads, or when masks are rebuilt from tier maps)."""
    wanted = {n.rsplit(".", 2)[0] for n in names
              if n.rsplit(".", 2)[-2:-1] in (["gate_up"], ["down"])}
    for name in wanted:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if is_fused_experts(module):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    ExpertLinears.from_fused(module))
