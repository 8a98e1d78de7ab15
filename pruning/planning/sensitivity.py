"""How much each output feature of each Linear matters to the model's loss: one gradient pass.

A layer-local loss proxy (Wanda's ``W^2 * ||X_j||^2``, SparseGPT's OBS saliency) measures the
error a pruned weight adds to *its own* layer's output. Whether that error matters depends on
what the rest of the model does with it. To second order, the LM loss grows by about
``1/2 * sum_t (g_t . dy_t)^2`` for an output error ``dy_t`` at token ``t``, where ``g_t`` is the
gradient of the loss with respect to that output. Taking the output features (and their
gradients and inputs) as independent, dropping weight ``W_ij`` costs about

    G_i * W_ij^2 * ||X_j||^2,   G_i = mean over tokens of (dL/dy_i)^2,

which is Wanda's proxy with every output row weighted by its squared gradient ``G_i``. The
weights make losses of different rows, matrices and layers comparable, which the budget
allocation needs when blocks of several matrices compete for the same bytes.

:func:`unpruned_stats` runs the calibration samples through the unpruned model once, forward and
backward, with no weight gradients (parameters are frozen for the pass), and records ``G`` (and,
optionally, Wanda's input statistic) for every prunable Linear of the decoder layers; a model-wide
byte budget uses it to see every matrix before any is pruned.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from torch import nn

from ..models import (decoder_layers, get_weight, module_device, next_token_loss,
                     prunable_linears, statistics_pass)
from ..statistics.stats import LinearStats

__all__ = ["unpruned_stats"]


def unpruned_stats(model: nn.Module, batches: list[torch.Tensor], *, gradients: bool = True,
                   activations: bool = False, progress: bool = True) -> dict[str, LinearStats]:
    """``{full module name: LinearStats}`` of every prunable Linear of the decoder layers, from
    the unpruned model: with ``gradients`` its ``out_sensitivity`` ([out] fp32, the mean over
    calibration tokens of the squared gradient of the summed token NLL with respect to each
    output feature); with ``activations`` its ``act_sq_norm`` (Wanda's statistic).

    batches: token ids ``[batch, seqlen]``. The model runs where it is, in its dtype (squares are
    accumulated in fp32); its parameters' ``requires_grad`` and training flag are restored.
    """
    path, layers = decoder_layers(model)
    linears = {f"{path}.{i}.{name}": m for i, layer in enumerate(layers)
               for name, m in prunable_linears(layer).items()}
    device = module_device(model.get_input_embeddings())
    stats = {name: LinearStats.empty(get_weight(m).shape[1], hessian=False, device=device)
             for name, m in linears.items()}
    grad_sq = {name: torch.zeros(get_weight(m).shape[0], dtype=torch.float32, device=device)
               for name, m in linears.items()}
    tokens = {"n": 0, "samples": 1}

    def hook_for(name):
        def accumulate(grad):
            flat = grad.detach().float().reshape(-1, grad.shape[-1])
            grad_sq[name] += flat.pow(2).sum(0).to(device)

        def forward_hook(_module, args, output):
            if activations:
                stats[name].add_batch(args[0], tokens["samples"])
            if gradients and output.requires_grad:
                output.register_hook(accumulate)
        return forward_hook

    def embedding_output_needs_grad(_module, _args, output):
        return output.requires_grad_(True)

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    if gradients:
        handles.append(model.get_input_embeddings().register_forward_hook(
            embedding_output_needs_grad))
    with statistics_pass(model, handles):
        desc = "gradient pass" if gradients else "statistics pass"
        for ids in tqdm(batches, desc=desc, disable=not progress):
            ids = ids.to(device)
            tokens["samples"] = ids.shape[0]
            if not gradients:
                with torch.no_grad():
                    model(ids, use_cache=False)
            else:
                with torch.enable_grad():
                    next_token_loss(model, ids, reduction="sum").backward()
            tokens["n"] += ids.numel()
    for name, s in stats.items():
        s.out_sensitivity = grad_sq[name] / max(tokens["n"], 1) if gradients else None
        if not activations:
            s.act_sq_norm = None
    return stats
