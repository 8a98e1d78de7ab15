"""Pruning: turns weights and calibration statistics into masks and tier maps.

For now it holds the tier-map logic (``tiers.py``); calibration, methods and the CLI build on it.
"""
from .tiers import apply_tier_map, assign_tiers, tier_mask

__all__ = ["assign_tiers", "tier_mask", "apply_tier_map"]
