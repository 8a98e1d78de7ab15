"""Finding the parts of any Hugging Face causal LM that pruning works on, without per-model code.

* ``decoder_layers(model)``: the stack of decoder layers (an ``nn.ModuleList``).
* ``prunable_linears(layer)``: the Linear-like modules inside one layer (``nn.Linear`` and GPT-2's
  ``Conv1D``), with ``get_weight`` / ``set_weight`` giving every one the ``[out, in]`` view.
* ``capture_layer_inputs(model, batches)``: the positional and keyword arguments the model passes
  to its first decoder layer (attention mask, position ids, rotary embeddings, ...), captured by
  stopping the forward there, so each layer can then be run on its own.

Embeddings and ``lm_head`` live outside the decoder layers, so they are never pruned.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Attribute paths of the decoder stack in the architectures we know; anything else is found by
# looking for the ModuleList with config.num_hidden_layers identical children.
LAYER_PATHS = (
    "model.layers",            # LLaMA 1/2/3, Mistral, Qwen2/2.5, Gemma, Phi-3
    "model.decoder.layers",    # OPT
    "transformer.h",           # GPT-2, Falcon, BLOOM
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "model.model.layers",      # wrapped (e.g. PEFT base models)
    "transformer.layers",
    "model.language_model.layers",
)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(attribute path, ModuleList)`` of the model's decoder layers."""
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == expected \
                and len({type(m) for m in module}) == 1:
            return name, module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: tried "
                     f"{', '.join(LAYER_PATHS)} and any ModuleList of num_hidden_layers="
                     f"{expected} identical modules")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a Linear whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_router(name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router or gate (``mlp.gate``, Qwen-MoE's ``shared_expert_gate``):
    a few rows that decide where tokens go; it stays dense."""
    last = name.rsplit(".", 1)[-1].lower()
    return last.endswith("gate") or last.endswith("router")


def prunable_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of one decoder layer, by name relative to the layer (routers
    excluded: they stay dense)."""
    return {name: m for name, m in layer.named_modules()
            if is_prunable(m) and not is_router(name, m)}


def named_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable Linear of the decoder layers by full name (``model.layers.3.mlp.up_proj``)."""
    path, layers = decoder_layers(model)
    return {f"{path}.{i}.{name}": m for i, layer in enumerate(layers)
            for name, m in prunable_linears(layer).items()}


def layer_of(full_name: str, path: str) -> str:
    """``"<path>.<index>"``, the decoder layer a full module name under ``path`` belongs to."""
    return ".".join(full_name.split(".")[:path.count(".") + 2])


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; Conv1D's is transposed)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


@torch.no_grad()
def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back in the module's own layout, dtype and device."""
    target = module.weight
    source = weight.t() if _is_conv1d(module) else weight
    target.copy_(source.to(device=target.device, dtype=target.dtype))


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type == "meta":
            raise RuntimeError("the model has weights offloaded to the meta device (accelerate "
                               "disk/CPU offload); load it with device_map='cpu' and pass "
                               "device='cuda' so each layer moves to the GPU for its turn")
        return p.device
    return torch.device("cpu")


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer has its inputs."""


def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """``[(args, kwargs)]`` the model passes to its first decoder layer, one per batch.

    ``batches``: token id tensors ``[batch, seqlen]``. The forward stops at the first layer, so
    this costs only the embeddings. Caching is turned off for the capture.
    """
    _, layers = decoder_layers(model)
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = module_device(model.get_input_embeddings())
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"the first decoder layer ran for {len(captured)} of {len(batches)} "
                           "calibration batches; the model does not call its layers in order")
    return captured


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with ``hidden`` in place of the layer's hidden-states input."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states input of a captured layer call."""
    return args[0] if args else kwargs["hidden_states"]


def move_to(obj, device: torch.device):
    """Tensors inside (nested tuples / lists / dicts of) ``obj`` moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def logits_of(output) -> torch.Tensor:
    """The logits of a causal LM's output (a ModelOutput, a tuple, or the tensor itself)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def next_token_loss(model: nn.Module, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting every next token of ``ids`` ``[batch, seqlen]`` (fp32 logits,
    no KV cache): ``mean`` or ``sum`` over the ``batch * (seqlen - 1)`` predictions."""
    logits = logits_of(model(ids, use_cache=False))[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@contextmanager
def statistics_pass(model: nn.Module, handles: list, trainable=()):
    """A pass over calibration data that only records: the model in eval mode with every
    parameter frozen but ``trainable``; on exit the hook ``handles`` are removed and every
    parameter's ``requires_grad`` and the training flag are as they were."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
