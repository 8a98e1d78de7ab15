"""Timing a decode step where the model is."""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["decode_step_ms"]


def decode_step_ms(model, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of one single-token forward without a KV cache (a
    decode step's matmuls), on the device of the model's first parameter (GPU work is waited
    for before the clock stops)."""
    device = next(model.parameters()).device
    ids = torch.ones(1, 1, dtype=torch.long, device=device)
    samples = []
    with torch.no_grad():
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
