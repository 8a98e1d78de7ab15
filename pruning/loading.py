"""Loading a causal LM from anywhere (the embedded model, a local folder, a hub id) onto the
device it will run on, and the plan of what runs where.

A packed checkpoint (``hybrid-prune prune --save``) loads the same way: ``import sparse_kernels``
(done here) lets ``from_pretrained`` build its ``HybridSparseLinear`` modules directly.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

import sparse_kernels  # noqa: F401  (registers the packed-checkpoint loader with transformers)

from .embedded import EMBEDDED_MODEL_NAME, load_embedded_model
from .structured.io import is_structured, load_structured

__all__ = ["DevicePlan", "device_plan", "default_dtype", "load_model", "looks_like_hub_id"]

# owner/name as the hub spells repository ids (letters, digits, "-", "_", "."), or one name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class DevicePlan:
    """Where things happen. ``device_map``: what ``from_pretrained`` places the weights by (None:
    the CPU). ``layer_device``: where each decoder layer runs for its pruning turn (None: where
    it is). ``model_device``: where the model lives afterwards, so where evaluation and timing
    run."""

    device_map: str | dict | None
    layer_device: str | None
    model_device: str


def default_dtype(device: str | None) -> torch.dtype:
    """bfloat16 on a GPU (half the memory, the GPU kernels' dtype), float32 on the CPU."""
    return torch.bfloat16 if device is not None and str(device).startswith("cuda") \
        else torch.float32


def device_plan(device: str | None = None, offload: bool = False,
                device_map: str | dict | None = None) -> DevicePlan:
    """What runs where for ``--device`` / ``--offload`` / ``--device-map``.

    No device: everything on the CPU. A device: the whole model loads straight onto it and
    is pruned there. ``offload``: the model stays on the CPU (a model larger than the GPU) and
    each layer moves to ``device`` for its pruning turn. ``device_map`` (e.g. ``"auto"``) goes
    to ``from_pretrained`` as is; pruning then runs each layer where the map put it.
    """
    device = str(device) if device is not None else "cpu"
    if offload and device == "cpu":
        raise ValueError("--offload keeps the model on the CPU and moves each layer to --device "
                         "for its turn: give a GPU --device (e.g. cuda)")
    if device_map is not None:
        if offload:
            raise ValueError("give either --device-map or --offload, not both")
        return DevicePlan(device_map, None, "per device map")
    if offload:
        return DevicePlan(None, device, "cpu")
    return DevicePlan(None if device == "cpu" else device, None, device)


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``name`` with the hub's characters, and not a path (``./x``, ``/x``,
    ``~/x``, ``a/b/c``)."""
    return bool(_HUB_ID.match(name)) and not name.startswith(".")


def load_model(name: str | None = None, *, dtype: torch.dtype | None = None,
               device: str | None = None, offload: bool = False,
               device_map: str | dict | None = None):
    """``(model, tokenizer, display name)`` in eval mode, placed by :func:`device_plan`.

    ``name``: None (the embedded SmolLM2-135M-Instruct), a local folder, or a hub id (which
    needs the hub or its cache). ``dtype`` defaults to :func:`default_dtype`. Weights load with
    ``low_cpu_mem_usage`` (one copy in memory, never a random init first).
    """
    plan = device_plan(device, offload, device_map)
    dtype = dtype or default_dtype(device)
    if name is None:
        model, tokenizer = load_embedded_model(dtype=dtype)
        if isinstance(plan.device_map, str) and plan.device_map != "auto":
            model.to(plan.device_map)  # small enough to load on the CPU and move
        return model.eval(), tokenizer, EMBEDDED_MODEL_NAME
    name = str(name)
    local = os.path.isdir(os.path.expanduser(name))
    if not local and not looks_like_hub_id(name):
        raise FileNotFoundError(f"--model: no such folder {name!r} (and it is not a hub id like "
                                f"'meta-llama/Llama-2-7b-hf')")
    # heavy (seconds): imported when a model is built, not by `import pruning`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = os.path.expanduser(name) if local else name
    if local:
        if is_structured(source):  # per-layer sizes: stock transformers cannot build it
            if plan.device_map is not None and plan.device_map != plan.model_device:
                raise ValueError(f"{name!r} is a structured model with per-layer sizes; it "
                                 "loads whole onto one --device (no --device-map)")
            model, tokenizer = load_structured(source, dtype=dtype, device=plan.model_device)
            return model, tokenizer, name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, low_cpu_mem_usage=True,
                                                     device_map=plan.device_map)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        where = "the folder" if local else "the hub (or its local cache: HF_HOME)"
        raise OSError(f"cannot load {name!r} from {where}: {err}") from err
    return model.eval(), tokenizer, name
