"""Layer-by-layer calibration: statistics per Linear, one decoder layer at a time.

For each decoder layer in turn: hooks on its Linears accumulate fp32 ``LinearStats`` while the
calibration samples run through it; a callback prunes the layer; the samples run through the
pruned layer again, and those outputs are the next layer's inputs. Memory stays bounded by one
layer's weights and statistics plus the activations of the samples.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch
from tqdm.auto import tqdm
from torch import nn

from ..models import (capture_layer_inputs, decoder_layers, get_weight, hidden_states_of,
                     layer_output, module_device, move_to, prunable_linears, with_hidden_states)
from .spill import check_spill_folder, layer_turn
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
    """Statistics of every Linear's inputs. Linears fed the very same tensor (q/k/v, gate/up)
    share one accumulation: their inputs, hence their statistics, are identical, and the
    Hessian's ``X^T X`` is the most expensive part of a SparseGPT prune after the forward."""
    own: dict[str, LinearStats] = {}  # Linears that accumulate their own statistics
    same_input_as: dict[str, str] = {}  # the others: whose statistics they share
    call = {"samples": 1, "seen": []}  # the current layer call: samples, (input, Linear) pairs

    def note_batch(args, kwargs):
        call["samples"] = hidden_states_of(args, kwargs).shape[0]
        call["seen"] = []

    def hook_for(name):
        def hook(_module, args, _output):
            x = args[0]
            if name not in own and name not in same_input_as:  # its first call decides
                owner = next((n for seen, n in call["seen"] if seen is x), None)
                if owner is None:
                    own[name] = LinearStats.empty(get_weight(linears[name]).shape[1],
                                                  hessian=needs_hessian, device=device)
                else:
                    same_input_as[name] = owner
            if name in own:
                own[name].add_batch(x, call["samples"])
                call["seen"].append((x, name))
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        _run_layer(layer, inputs, note_batch)
    finally:
        for h in handles:
            h.remove()
    samples = sum(hidden_states_of(args, kwargs).shape[0] for args, kwargs in inputs)
    for s in own.values():  # a Linear skipped by some calls (an expert no token was routed to)
        if 0 < s.nsamples < samples:  # averages over every sample: its missing rows are zeros
            s.act_sq_norm.mul_(s.nsamples / samples)
            if s.hessian is not None:
                s.hessian.mul_(s.nsamples / samples)
            s.nsamples = samples
    stats = {}
    for name, module in linears.items():
        source = own.get(name) or own.get(same_input_as.get(name))
        stats[name] = dataclasses.replace(source) if source is not None else LinearStats.empty(
            get_weight(module).shape[1], hessian=needs_hessian, device=device)
    return stats


def layerwise(model: nn.Module, batches: list[torch.Tensor], process_layer: LayerCallback, *,
              needs_hessian: bool = False, device: torch.device | str | None = None,
              progress: bool = True, desc: str = "pruning layers",
              sensitivity: dict[str, torch.Tensor] | None = None,
              seconds: dict[str, list[float]] | None = None,
              offload_dir: str | os.PathLike | None = None) -> None:
    """Run ``process_layer`` on every decoder layer with its Linears' calibration statistics.

    batches: token ids ``[batch, seqlen]``. device: where each layer runs for its turn (default:
    where it already is); a layer moved there goes back afterwards. ``process_layer`` may change
    the layer's weights: the next layer sees the outputs of the changed layer. sensitivity:
    ``{full module name: [out] tensor}`` set as each Linear's ``LinearStats.out_sensitivity``.
    seconds: gains, per layer, ``"statistics"`` (the layer's forward over the calibration
    batches with the statistics hooks) and ``"forward"`` (the pruned layer's forward that feeds
    the next layer). offload_dir: each layer, once done, is written there and mapped back
    (:func:`.spill.spill_layer`): pruning then holds one layer in its own memory, not every
    pruned layer; the files must stay while the model is used.
    """
    seconds = {} if seconds is None else seconds
    spill_to = check_spill_folder(offload_dir) if offload_dir is not None else None
    path, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, batches)
    was_training = model.training
    model.eval()
    try:
        for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
            with layer_turn(layer, spill_to, index):
                home = module_device(layer)
                run_on = torch.device(device) if device is not None else home
                layer.to(run_on)
                inputs = move_to(inputs, run_on)
                linears = prunable_linears(layer)
                started = time.perf_counter()
                stats = _collect_stats(layer, linears, inputs, needs_hessian, run_on)
                seconds.setdefault("statistics", []).append(time.perf_counter() - started)
                for name, s in stats.items():
                    given = (sensitivity or {}).get(f"{path}.{index}.{name}")
                    s.out_sensitivity = None if given is None else given.to(run_on)
                process_layer(f"{path}.{index}", layer, linears, stats)
                del stats
                started = time.perf_counter()
                outputs = _run_layer(layer, inputs)
                seconds.setdefault("forward", []).append(time.perf_counter() - started)
                inputs = [with_hidden_states(args, kwargs, out)
                          for (args, kwargs), out in zip(inputs, outputs)]
                layer.to(home)
    finally:
        model.train(was_training)

