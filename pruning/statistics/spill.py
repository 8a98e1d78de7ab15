"""Pruned layers written to disk and mapped back, so that pruning a model larger than memory
keeps only the layer at work resident.

A model loaded from safetensors in its own dtype is already mapped from its files: a layer's
pages come in when it is read and the kernel may drop them again. Pruning replaces a layer's
weights with new tensors, which live in the process's own memory until the end; over the whole
model that is the model's size again. :func:`spill_layer` writes the layer's state to a file and
loads it back mapped (``torch.load(mmap=True)``), so its pages are file pages too.

A weight mapped from a file is mapped privately: pruning writes into it in place, and the
written pages become the process's own copies for as long as any tensor of that file is alive
(another layer of the same shard keeps it). :func:`own_tensors` first gives the layer private
copies, which :func:`spill_layer` then lets go. :func:`layer_turn` does both around one layer's
pruning turn.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from sparse_kernels.atomic import atomic_file

__all__ = ["own_tensors", "spill_layer", "check_spill_folder", "layer_turn"]


def check_spill_folder(folder: str | os.PathLike) -> Path:
    """``folder`` made if missing; an existing file there, or files of an earlier run, are
    refused (the mapped files must belong to this model)."""
    path = Path(folder).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"offload_dir {str(folder)!r} is a file, not a folder")
    if path.is_dir() and any(path.glob("*.pt")):
        raise FileExistsError(f"offload_dir {str(folder)!r} already holds layer files; give an "
                              f"empty folder (the model being pruned maps the files it writes)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def own_tensors(layer: nn.Module) -> None:
    """Replace ``layer``'s parameters and buffers by private copies (see the module docstring)."""
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)


def spill_layer(layer: nn.Module, file: Path) -> None:
    """Write ``layer``'s parameters and buffers to ``file`` and make the layer use them mapped
    from there. The file must stay as long as the model is used."""
    state = layer.state_dict()
    with atomic_file(file) as tmp:
        torch.save(state, tmp)
    del state
    layer.load_state_dict(torch.load(file, mmap=True, weights_only=True), assign=True)


@contextlib.contextmanager
def layer_turn(layer: nn.Module, folder: Path | None, index: int):
    """Around decoder layer ``index``'s pruning turn: with a ``folder`` (from
    :func:`check_spill_folder`), private copies before it and ``folder/layer-NNNN.pt`` mapped
    back after it; without one, nothing."""
    if folder is not None:
        own_tensors(layer)
    yield
    if folder is not None:
        spill_layer(layer, folder / f"layer-{index:04d}.pt")
