"""Layer-by-layer calibration: statistics per Linear, one decoder layer at a time.

For each decoder layer in turn: hooks on its Linears accumulate fp32 ``LinearStats`` while the
calibration samples run through it; a callback prunes the layer; the samples run through the
pruned layer again, and those outputs are the next layer's inputs. Memory stays bounded by one
layer's weights and statistics plus the activations of the samples.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .models import (capture_layer_inputs, decoder_layers, get_weight, hidden_states_of,
                     layer_output, module_device, move_to, prunable_linears, with_hidden_states)
from .stats import LinearStats

# process_layer(layer_name, layer, {name in layer: module}, {name in layer: LinearStats})
LayerCallback = Callable[[str, nn.Module, dict, dict], None]


def _run_layer(layer: nn.Module, inputs: list[tuple], before_call=None) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            if before_call is not None:
                before_call(args, kwargs)
            outputs.append(layer_output(layer(*args, **kwargs)))
    return outputs


def _collect_stats(layer: nn.Module, linears: dict, inputs: list[tuple], needs_hessian: bool,
                   device: torch.device) -> dict[str, LinearStats]:
    stats = {name: LinearStats.empty(get_weight(m).shape[1], hessian=needs_hessian,
                                     device=device) for name, m in linears.items()}
    batch = {"samples": 1}  # samples in the current call, for Linears that see [tokens, in]

    def note_batch(args, kwargs):
        batch["samples"] = hidden_states_of(args, kwargs).shape[0]

    def hook_for(name):
        def hook(_module, args, _output):
            stats[name].add_batch(args[0], batch["samples"])
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        _run_layer(layer, inputs, note_batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def layerwise(model: nn.Module, batches: list[torch.Tensor], process_layer: LayerCallback, *,
              needs_hessian: bool = False, device: torch.device | str | None = None,
              progress: bool = True, desc: str = "pruning layers") -> None:
    """Run ``process_layer`` on every decoder layer with its Linears' calibration statistics.

    batches: token ids ``[batch, seqlen]``. device: where each layer runs for its turn (default:
    where it already is); a layer moved there goes back afterwards. ``process_layer`` may change
    the layer's weights: the next layer sees the outputs of the changed layer.
    """
    from tqdm.auto import tqdm

    path, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, batches)
    was_training = model.training
    model.eval()
    try:
        for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
            home = module_device(layer)
            run_on = torch.device(device) if device is not None else home
            layer.to(run_on)
            inputs = move_to(inputs, run_on)
            linears = prunable_linears(layer)
            stats = _collect_stats(layer, linears, inputs, needs_hessian, run_on)
            process_layer(f"{path}.{index}", layer, linears, stats)
            del stats
            outputs = _run_layer(layer, inputs)
            inputs = [with_hidden_states(args, kwargs, out)
                      for (args, kwargs), out in zip(inputs, outputs)]
            layer.to(home)
    finally:
        model.train(was_training)

