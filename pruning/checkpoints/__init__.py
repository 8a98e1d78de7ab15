"""Pruned models on disk: packed checkpoints that plain ``from_pretrained`` loads (packed.py)
and the tier maps of a whole model in one safetensors file (tier_maps.py)."""
from .packed import (PrunedModel, load_pruned, pack_model, packable_tier_maps, save_pruned,
                     unpack_model, write_report)
from .tier_maps import load_tier_maps, save_tier_maps

__all__ = ["PrunedModel", "load_pruned", "save_pruned", "pack_model", "unpack_model",
           "packable_tier_maps", "write_report", "load_tier_maps", "save_tier_maps"]
