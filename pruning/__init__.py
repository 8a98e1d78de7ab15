"""Pruning: turns a Hugging Face causal LM plus calibration text into masks and tier maps.

  result = pruning.prune(model, calibration, method="wanda", pattern="three_tier",
                         tier_ratios=(0.35, 0.45, 0.20), topk=15, block_size=16,
                         tokenizer=tokenizer)
  result.masks, result.tier_maps, result.report

Methods: magnitude, wanda, sparsegpt, wanda_obs. Patterns: unstructured, N:M, block,
block_topk, three_tier. The layer-by-layer loop is generic (models.py finds any model's decoder
layers); the methods (methods/) return masks and never edit a model themselves.
"""
from .api import PruneResult, apply_masks, prune
from .report import format_report, sparsity_report
from .checkpoints.tier_maps import load_tier_maps, save_tier_maps
from sparse_kernels.tiers import apply_tier_map, assign_tiers, tier_mask  # the format's rules

__all__ = ["prune", "PruneResult", "apply_masks", "sparsity_report", "format_report",
           "save_tier_maps", "load_tier_maps", "assign_tiers", "tier_mask", "apply_tier_map"]
