"""Where a fine-tune runs: one process, or several started by ``torchrun`` / ``accelerate launch``.

accelerate sets up the processes (its process group, device and rank; gloo on CPU, NCCL on
GPU). Three strategies, one training loop (:func:`pruning.recovery.finetune`):

* ``single``: one process, the model as it is.
* ``ddp``: every process holds the whole model; accelerate wraps it in DistributedDataParallel,
  which averages the gradients.
* ``fsdp``: torch's FSDP2 (``fully_shard``), one unit per decoder layer and one for the rest:
  every process holds rows ``[rank * ceil(out / P), ...)`` of each weight (dim 0), its gradient
  and its optimizer state. accelerate's own FSDP2 plugin calls the same ``fully_shard``; applying
  it here fixes the shard layout, so each process can cut its masks to its rows, on CPU (gloo),
  where accelerate does not shard, and on GPU alike.

Each process trains on its rows of every global batch (the batch a single process would draw
for that step, split by rows), so P processes with a global batch of B follow the single
process with batch B (see :func:`split_batch` for the loss's normalisation).

Masks live with the weights they mask (:class:`ShardMask`): each process keeps only its rows, as
bits (1/8 byte per parameter of its shard), and expands one matrix at a time when it masks.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..masks import pack_bits, unpack_bits
from ..models import decoder_layers

__all__ = ["STRATEGIES", "Launch", "launch", "check_launch", "ShardMask", "local_tensor",
           "split_batch"]

STRATEGIES = ("auto", "single", "ddp", "fsdp")
_LAUNCH_HINT = ("start several processes with `torchrun --nproc_per_node N $(command -v "
                "hybrid-prune) finetune ...` (add ACCELERATE_USE_CPU=true on a machine without "
                "a GPU) or `accelerate launch [--config_file fsdp.yaml] -m pruning.cli finetune "
                "...`")


def check_launch(asked: str, world_size: int, accelerate_processes: int,
                 accelerate_type: str) -> str:
    """The strategy to run, or an error naming what is wrong with the launch.

    asked: ``auto | single | ddp | fsdp``; world_size: the processes the launcher started
    (``WORLD_SIZE``); accelerate_processes / accelerate_type: what accelerate made of them
    (``Accelerator().num_processes`` and its ``DistributedType`` name).
    """
    if asked not in STRATEGIES:
        raise ValueError(f"distributed must be one of {', '.join(STRATEGIES)}, got {asked!r}")
    if world_size == 1:
        if asked in ("ddp", "fsdp"):
            raise ValueError(f"--distributed {asked} needs several processes, and this is the "
                             f"only one: {_LAUNCH_HINT}")
        return "single"
    if accelerate_processes != world_size:
        # accelerate launch with use_cpu and FSDP starts P processes that each train alone.
        raise RuntimeError(
            f"the launcher started {world_size} processes but accelerate joined "
            f"{accelerate_processes} of them (distributed type {accelerate_type}): each would "
            f"train alone on the whole data. On CPU, accelerate's FSDP launch does this; "
            f"use `ACCELERATE_USE_CPU=true torchrun --nproc_per_node {world_size} ... "
            f"--distributed fsdp` instead")
    if accelerate_type == "DEEPSPEED":
        raise NotImplementedError("DeepSpeed is not supported: the masks follow FSDP's shards; "
                                  "use an FSDP config (fsdp_version: 2) or --distributed fsdp")
    if asked == "single":
        raise ValueError(f"--distributed single, but {world_size} processes were started: "
                         f"start one process, or choose ddp / fsdp")
    if asked == "auto":
        return "fsdp" if accelerate_type == "FSDP" else "ddp"
    return asked


@dataclass
class Launch:
    """This process's part: ``strategy`` (single / ddp / fsdp), ``processes``, ``rank``,
    ``device`` (None: wherever the model already is) and accelerate's ``accelerator``."""

    strategy: str = "single"
    processes: int = 1
    rank: int = 0
    device: torch.device | None = None
    accelerator: object | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    def describe(self) -> dict:
        """What report.json records."""
        out = {"strategy": self.strategy, "processes": self.processes}
        if self.distributed:
            out.update(backend=dist.get_backend(), device=str(self.device.type))
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """``value`` averaged over the processes."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return float(t) / self.processes

    @property
    def _collective_device(self):
        return self.device if dist.get_backend() == "nccl" else "cpu"

    def wrap(self, model: nn.Module, *, mixed_precision: bool = False,
             trainable: bool = True) -> nn.Module:
        """The model as this strategy trains it. ``mixed_precision`` (FSDP on GPU, fp32
        weights): bf16 compute and fp32 gradient reduction over fp32 shards. ``trainable``
        False: a forward-only model (the distillation teacher), never wrapped in DDP."""
        if self.strategy == "single":
            return model
        if self.strategy == "ddp":
            model.to(self.device)
            return self.accelerator.prepare_model(model) if trainable else model
        # fully_shard moves each unit's parameters to the mesh's device as it shards them: the
        # device never holds more than one decoder layer unsharded.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.processes,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision else MixedPrecisionPolicy())
        for layer in decoder_layers(model)[1]:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def gradient_sync(self, trained: nn.Module, enabled: bool):
        """A context in which backward passes reduce gradients across processes or not (the
        micro-batches before the last of an accumulated step skip it)."""
        if self.strategy == "ddp" and not enabled:
            return trained.no_sync()
        if self.strategy == "fsdp":
            trained.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def full_state_dict(self, trained: nn.Module) -> dict | None:
        """FSDP: the whole model's state gathered on CPU in the main process (None elsewhere);
        the other processes never hold more than one gathered tensor at a time."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        return state if self.main else None


def launch(asked: str = "auto") -> Launch:
    """This process's :class:`Launch`, from the launcher's environment (``WORLD_SIZE``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Launch(check_launch(asked, 1, 1, "NO"))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    kind = accelerator.distributed_type.name
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        kind = "FSDP"  # an FSDP config on CPU, where accelerate itself would not shard
    strategy = check_launch(asked, world_size, accelerator.num_processes, kind)
    return Launch(strategy, accelerator.num_processes, accelerator.process_index,
                  accelerator.device, accelerator)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter or gradient (a DTensor's local shard, else itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardMask:
    """The rows of a weight's mask that this process holds, as bits.

    full: bool [rows, cols] in the parameter's layout, True = kept; param: the (possibly
    sharded) parameter. FSDP2 shards dim 0 like ``torch.chunk``: process r holds rows
    ``[r * ceil(rows / P), ...)``, as many as its local shard has. Costs ``ceil(local
    elements / 8)`` bytes on the parameter's device; :meth:`expand` builds the bool rows for one
    use.
    """

    def __init__(self, full: torch.Tensor, param: torch.Tensor, rank: int = 0,
                 processes: int = 1):
        local = local_tensor(param)
        start = rank * math.ceil(full.shape[0] / processes) if hasattr(param, "to_local") else 0
        rows = local.shape[0]
        if tuple(local.shape[1:]) != tuple(full.shape[1:]) or \
                (rows and start + rows > full.shape[0]):
            raise ValueError(f"a shard of shape {tuple(local.shape)} at row {start} does not "
                             f"fit a mask of shape {tuple(full.shape)}")
        self.shape = tuple(local.shape)
        self.bits = pack_bits(full[start:start + rows].to(local.device))

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def expand(self) -> torch.Tensor:
        """bool ``self.shape``: the local rows of the mask."""
        return unpack_bits(self.bits, self.shape)


def split_batch(batch, rank: int, processes: int):
    """Rows ``[rank * B / P, (rank + 1) * B / P)`` of a global batch of B rows (B a multiple of
    P). The loss of a process is its sum over the tokens it counts divided by the tokens the
    whole batch counts, times P (DDP and FSDP average gradients over the processes): the
    gradient is exactly the single process's."""
    rows = batch.input_ids.shape[0]
    if rows % processes:
        raise ValueError(f"the batch has {rows} rows, which {processes} processes cannot "
                         f"share: make --batch-size a multiple of {processes}")
    if processes == 1:
        return batch
    size = rows // processes
    part = slice(rank * size, (rank + 1) * size)
    return type(batch)(batch.input_ids[part], batch.labels[part], batch.attention_mask[part])
