"""H-GSP's layer / block prior: units of blocks the model can lose cheaply go first.

For every decoder layer the calibration loss is measured with the layer skipped, with only its
attention block skipped and with only its MLP block skipped (a block is skipped by zeroing what
its output projection adds to the residual stream; a layer by skipping both), against the loss
of the whole model: ``dL = max(loss_skipped - loss, 0)``. Each unit's score is multiplied by

    ln(1 + dL) ** temperature

where ``dL`` is the layer's when ``dL_layer < tau`` (a layer the model barely needs is judged as
a whole) and the unit's block's otherwise. ``temperature = 0`` turns the prior off (factor 1).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from torch import nn

from ..models import decoder_layers, module_device, next_token_loss
from .units import ATTENTION, MLP, LayerUnits

__all__ = ["skip_losses", "prior_factors"]


def _loss(model: nn.Module, batches: list[torch.Tensor], cursor: list[int] | None = None) -> float:
    """Mean next-token loss over every prediction of ``batches``; ``cursor[0]`` is set to each
    batch's index before its forward (the replayed layers read it)."""
    device = module_device(model.get_input_embeddings())
    total, count = 0.0, 0
    with torch.no_grad():
        for index, ids in enumerate(batches):
            if cursor is not None:
                cursor[0] = index
            total += next_token_loss(model, ids.to(device), reduction="sum").item()
            count += ids[:, 1:].numel()
    return total / count


def _zero_output(_module, _args, output):
    return torch.zeros_like(output)


def _record_outputs(layers: nn.ModuleList, outputs: list[list]):
    """Forward hooks that append each layer's output (whatever it returns) to ``outputs[j]``."""
    def hook(j):
        return lambda _module, _args, output: outputs[j].append(output)
    return [layer.register_forward_hook(hook(j)) for j, layer in enumerate(layers)]


@contextmanager
def _replayed(layers: nn.ModuleList, upto: int, outputs: list[list], cursor: list[int]):
    """Layers ``0 .. upto - 1`` return their recorded outputs for the current batch without
    computing: a skip pass then costs only the layers from the skipped one on. The instance's
    ``forward`` is replaced (not the module), so the model still sees each layer's attributes."""
    def replay(j):
        return lambda *_args, **_kwargs: outputs[j][cursor[0]]
    for j in range(upto):
        layers[j].forward = replay(j)
    try:
        yield
    finally:
        for j in range(upto):
            del layers[j].forward


def skip_losses(model: nn.Module, units: list[LayerUnits], batches: list[torch.Tensor], *,
                progress: bool = True) -> dict:
    """``{"base": loss, "layer": [dL per layer], "attention": [...], "mlp": [...]}``: the
    increase of the mean calibration token loss when each layer / block is skipped (>= 0).

    The unpruned pass records every decoder layer's output per batch (memory: the layers'
    hidden states for ``batches``); each skip pass of layer i replays layers before i from
    those records, so the 3L skips cost about 1.5 L full forwards instead of 3 L.
    """
    _, layers = decoder_layers(model)
    outputs: list[list] = [[] for _ in layers]
    handles = _record_outputs(layers, outputs)
    try:
        base = _loss(model, batches)
    finally:
        for h in handles:
            h.remove()
    cursor = [0]
    out = {"base": base, "layer": [], ATTENTION: [], MLP: []}
    for u in tqdm(units, desc="H-GSP skip losses", disable=not progress):
        layer = layers[u.index]
        blocks = {ATTENTION: [layer.get_submodule(u.o)], MLP: [layer.get_submodule(u.contract)]}
        blocks["layer"] = blocks[ATTENTION] + blocks[MLP]
        for key, modules in blocks.items():
            handles = [m.register_forward_hook(_zero_output) for m in modules]
            try:
                with _replayed(layers, u.index, outputs, cursor):
                    out[key].append(max(_loss(model, batches, cursor) - base, 0.0))
            finally:
                for h in handles:
                    h.remove()
    return out


def prior_factors(losses: dict, temperature: float, tau: float) -> dict[tuple[int, str], float]:
    """``{(layer, kind): ln(1 + dL) ** temperature}`` (see the module docstring)."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0 (0: no prior), got {temperature}")
    factors = {}
    for i, layer_dl in enumerate(losses["layer"]):
        for kind in (ATTENTION, MLP):
            dl = layer_dl if layer_dl < tau else losses[kind][i]
            factors[(i, kind)] = 1.0 if temperature == 0 else math.log1p(dl) ** temperature
    return factors
