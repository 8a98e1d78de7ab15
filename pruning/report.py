"""Sparsity report: overall, per decoder layer, per module and per tier."""
from __future__ import annotations

import re

import torch

from sparse_kernels import TIER_NAMES


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


def format_report(report: dict) -> str:
    """A few human-readable lines: overall, per tier, per layer."""
    lines = [f"overall sparsity {report['sparsity']:.2%} of {report['params']:,} weights in "
             f"{len(report['per_module'])} modules"]
    for tier, entry in report.get("per_tier", {}).items():
        lines.append(f"  {tier:6} {entry['blocks']:>8,} blocks ({entry['fraction']:.1%})")
    for layer, entry in report["per_layer"].items():
        lines.append(f"  {layer}: {entry['sparsity']:.2%}")
    return "\n".join(lines)
