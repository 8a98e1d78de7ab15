"""Sparsity report: overall, per decoder layer, per module and per tier; and coverage: which of
the decoder layers' weights the pruned modules hold, and what was left out and why."""
from __future__ import annotations

import re

import torch

from sparse_kernels import TIER_NAMES

from .models import decoder_layers, is_router


def _layer_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the first '.<index>.' part)."""
    match = re.match(r"^(.*?\.\d+)\.", name)
    return match.group(1) if match else name


def sparsity_report(masks: dict[str, torch.Tensor],
                    tier_maps: dict[str, torch.Tensor] | None = None) -> dict:
    """Fractions of weights pruned; ``masks`` are bool (True = kept) by module name."""
    tier_maps = tier_maps or {}
    per_module, per_layer = {}, {}
    per_tier = {name: 0 for name in TIER_NAMES.values()}
    total = kept = 0
    for name, mask in masks.items():
        n, k = mask.numel(), int(mask.sum())
        entry = {"shape": list(mask.shape), "params": n, "kept": k,
                 "sparsity": 1.0 - k / n if n else 0.0}
        if name in tier_maps:
            counts = {TIER_NAMES[code]: int((tier_maps[name] == code).sum()) for code in TIER_NAMES}
            entry["tier_blocks"] = counts
            for tier, c in counts.items():
                per_tier[tier] += c
        per_module[name] = entry
        layer = per_layer.setdefault(_layer_of(name), {"params": 0, "kept": 0})
        layer["params"] += n
        layer["kept"] += k
        total, kept = total + n, kept + k
    for layer in per_layer.values():
        layer["sparsity"] = 1.0 - layer["kept"] / layer["params"] if layer["params"] else 0.0
    report = {"sparsity": 1.0 - kept / total if total else 0.0, "params": total, "kept": kept,
              "per_layer": per_layer, "per_module": per_module}
    if tier_maps:
        blocks = sum(per_tier.values())
        report["per_tier"] = {tier: {"blocks": c, "fraction": c / blocks if blocks else 0.0}
                              for tier, c in per_tier.items()}
    return report


# Config fields that hold a mixture-of-experts model's expert count (a router has one row each).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _why_skipped(name: str, param: torch.Tensor, owner: torch.nn.Module,
                 experts: int | None) -> str:
    if param.dim() < 2:
        return "1-D (a bias or a norm): never pruned"
    if param.dim() == 3:
        return "3-D fused expert weights [experts, out, in]: no method prunes them yet"
    if "router" in type(owner).__name__.lower() or is_router(name, owner) \
            or (experts and param.shape[0] == experts):
        return "router (one row per expert): stays dense"
    return f"a {type(owner).__name__} weight, not a Linear: no method prunes it"


def coverage_report(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """What the pruned modules (``masks``, by full module name) cover of the decoder layers.

    ``{"decoder_params", "decoder_weights" (parameters of 2-D and more), "pruned_module_params",
    "pruned" (weights set to zero), "sparsity_over_pruned_modules", "sparsity_over_decoder_weights",
    "unpruned_weight_fraction", "per_layer": {layer: {params, prunable, pruned, skipped: [{name,
    shape, params, why}]}}, "largest_skipped"}``.
    """
    path, layers = decoder_layers(model)
    config = getattr(model, "config", None)
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS
                    if isinstance(getattr(config, k, None), int)), None)
    per_layer, totals = {}, {"params": 0, "weights": 0, "prunable": 0, "pruned": 0}
    largest = None
    for i, layer in enumerate(layers):
        name = f"{path}.{i}"
        entry = {"params": 0, "prunable": 0, "pruned": 0, "skipped": []}
        masked_weights = {}
        for module_name, module in layer.named_modules():
            full = f"{name}.{module_name}" if module_name else name
            if full in masks:
                masked_weights[id(module.weight)] = masks[full]
        for pname, param in layer.named_parameters():
            n = param.numel()
            entry["params"] += n
            totals["weights"] += n if param.dim() >= 2 else 0
            if id(param) in masked_weights:
                mask = masked_weights[id(param)]
                entry["prunable"] += n
                entry["pruned"] += n - int(mask.sum())
                continue
            owner = layer.get_submodule(pname.rpartition(".")[0]) if "." in pname else layer
            skipped = {"name": f"{name}.{pname}", "shape": list(param.shape), "params": n,
                       "why": _why_skipped(pname.rpartition(".")[0], param, owner, experts)}
            entry["skipped"].append(skipped)
            if param.dim() >= 2 and (largest is None or n > largest["params"]):
                largest = skipped
        per_layer[name] = entry
        for key in ("params", "prunable", "pruned"):
            totals[key] += entry[key]
    weights = totals["weights"]
    return {"decoder_params": totals["params"], "decoder_weights": weights,
            "pruned_module_params": totals["prunable"], "pruned": totals["pruned"],
            "sparsity_over_pruned_modules": totals["pruned"] / totals["prunable"]
            if totals["prunable"] else 0.0,
            "sparsity_over_decoder_weights": totals["pruned"] / weights if weights else 0.0,
            "unpruned_weight_fraction": 1 - totals["prunable"] / weights if weights else 0.0,
            "per_layer": per_layer, "largest_skipped": largest}


def format_report(report: dict) -> str:
    """A few human-readable lines: overall, per tier, per layer."""
    lines = [f"overall sparsity {report['sparsity']:.2%} of {report['params']:,} weights in "
             f"{len(report['per_module'])} modules"]
    cover = report.get("coverage")
    if cover and cover["unpruned_weight_fraction"] > 0:
        lines.append(f"  = {cover['sparsity_over_decoder_weights']:.2%} of all "
                     f"{cover['decoder_weights']:,} decoder-layer weights: "
                     f"{cover['unpruned_weight_fraction']:.1%} were not pruned (largest: "
                     f"{cover['largest_skipped']['name']}, {cover['largest_skipped']['why']})")
    for tier, entry in report.get("per_tier", {}).items():
        lines.append(f"  {tier:6} {entry['blocks']:>8,} blocks ({entry['fraction']:.1%})")
    for layer, entry in report["per_layer"].items():
        lines.append(f"  {layer}: {entry['sparsity']:.2%}")
    return "\n".join(lines)
