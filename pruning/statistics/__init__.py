"""Calibration statistics of every Linear, gathered one decoder layer at a time.

``LinearStats`` (stats.py) holds what a method needs of a Linear's inputs (Wanda's column norms,
SparseGPT's Hessian, the token count); ``layerwise`` (capture.py) runs the calibration samples
through the model a decoder layer at a time, accumulates them, lets a callback prune the layer,
and feeds the pruned layer's outputs to the next.
"""
from .capture import layerwise
from .stats import LinearStats

__all__ = ["LinearStats", "layerwise"]
