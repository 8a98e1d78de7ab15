"""Recovery fine-tuning that never revives a pruned weight.

Two ways to train a pruned model, both ending with exactly the masks they started with:

* ``mode="masked"``: the prunable weights themselves train (with their biases). Each weight's
  gradient is multiplied by its mask, and the mask is applied again after every optimizer step,
  so not even rounding can bring a pruned weight back.
* ``mode="lora"``: low-rank adapters (peft) train on the prunable Linears while the weights stay
  frozen; at the end they are merged into the weights and the masks applied again. A merged
  update is dense, so the re-mask removes part of it: the result reports how much (norms before
  and after) and, with an ``eval_fn``, the perplexity before and after the merge.

The loss is the language-model loss (``"lm"``), distillation from the dense model it was pruned
from (``"distill"``: KL divergence of the logits at temperature ``T``, times ``T^2``; with
``hidden_weight`` also SquareHead's per-layer hidden-state MSE normalised by the teacher's
hidden-state energy), or their sum (``"lm+distill"``). The teacher runs alongside, one batch at a
time, without gradients.

Steps use AdamW, linear warmup then cosine decay (or constant), gradient accumulation, gradient
clipping, bf16 autocast on a GPU for fp32 weights, optional gradient checkpointing; every
``eval_every`` steps ``eval_fn(model)`` (e.g. held-out perplexity) is recorded, and every
``checkpoint_every`` steps the trainable state, the optimizer, the schedule and the step are
written to ``checkpoint_dir`` (torch.distributed.checkpoint, each process its shards; the
folder is replaced whole, so a kill leaves the previous one): ``resume=True`` continues from
there after a kill, also with another number of processes, and ends where an uninterrupted run
would have (batches are drawn by step).

Masked mode also runs on several processes (``launch``, :mod:`.distributed`): DDP or FSDP, each
process masking the gradients and weights of the rows it holds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from tqdm.auto import tqdm

from sparse_kernels.atomic import atomic_file

from .data import IGNORE, Batch
from .distributed import Launch, ShardMask, local_tensor, split_batch
from ..models import get_weight, is_prunable

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "MODES", "LOSSES"]

MODES = ("masked", "lora")
LOSSES = ("lm", "distill", "lm+distill")
STATE_DIR = "state"  # torch.distributed.checkpoint's folder, and progress.pt beside its files
PROGRESS_FILE = "progress.pt"
# Only the trained parameters go into a training checkpoint (the frozen ones are the model's).
_STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading them back leaves the frozen ones as they are (dcp.load already fails on a missing one).
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune (see the module docstring). ``max_steps`` and/or ``max_tokens`` (tokens
    the loss counts) end the run, whichever comes first; ``warmup`` is a fraction of the steps."""

    mode: str = "masked"
    loss: str = "lm"
    max_steps: int | None = None
    max_tokens: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    hidden_weight: float = 0.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give max_steps or max_tokens (how long to train)")
        for name in ("max_steps", "max_tokens", "grad_accum", "lora_rank", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: never), got "
                                 f"{getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and self.temperature > 0
                and self.weight_decay >= 0 and self.hidden_weight >= 0
                and 0 <= self.lora_dropout < 1 and self.max_grad_norm > 0):
            raise ValueError(f"need lr > 0, 0 <= warmup < 1, temperature > 0, weight_decay >= 0, "
                             f"hidden_weight >= 0, 0 <= lora_dropout < 1, max_grad_norm > 0; got "
                             f"lr={self.lr}, warmup={self.warmup}, temperature="
                             f"{self.temperature}, weight_decay={self.weight_decay}, "
                             f"hidden_weight={self.hidden_weight}, lora_dropout="
                             f"{self.lora_dropout}, max_grad_norm={self.max_grad_norm}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")

    @property
    def distills(self) -> bool:
        return self.loss != "lm"


@dataclass
class FinetuneResult:
    """What happened: ``model`` (the same object in masked mode; the merged base model in LoRA
    mode), steps, loss-counted tokens, seconds, ``history`` (a dict per logged step: step,
    tokens, training seconds so far (evaluation not counted), loss, lr, and ``eval`` where
    evaluated) and, in LoRA mode, ``lora`` (the update's
    norm before and after the re-mask, and the eval before and after the merge); ``evals``:
    ``eval_fn`` before and after the run (with ``eval_ends``); ``mask_bytes``: what this
    process's masks cost during the run (bits of the rows it holds). Under FSDP ``model`` is
    the sharded model (:meth:`.distributed.Launch.full_state_dict` gathers it)."""

    model: nn.Module
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    lora: dict | None = None
    evals: dict = field(default_factory=dict)
    mask_bytes: int = 0


def _masked_modules(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    modules = {}
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"a mask names {name!r}, which the model does not have") from None
        if not is_prunable(module):
            raise TypeError(f"{name!r} is a {type(module).__name__}, not a Linear")
        if tuple(mask.shape) != tuple(get_weight(module).shape):
            raise ValueError(f"the mask of {name!r} has shape {tuple(mask.shape)}, its weight "
                             f"{tuple(get_weight(module).shape)}")
        modules[name] = module
    return modules


def _param_mask(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The bool mask in the layout of ``module.weight`` (GPT-2's Conv1D stores [in, out])."""
    layout = mask.t() if get_weight(module) is not module.weight else mask
    return layout.to(device=module.weight.device, dtype=torch.bool).contiguous()


@torch.no_grad()
def _apply_masks(modules: dict, masks: dict) -> None:
    for name, module in modules.items():
        module.weight.mul_(_param_mask(module, masks[name]))


def _shard_masks(modules: dict, masks: dict, launch: Launch) -> dict[str, ShardMask]:
    return {name: ShardMask(_param_mask(module, masks[name]).cpu(), module.weight, launch.rank,
                            launch.processes) for name, module in modules.items()}


def _mask_gradients(modules: dict, shard_masks: dict) -> None:
    for name, module in modules.items():
        if module.weight.grad is not None:
            local_tensor(module.weight.grad).mul_(shard_masks[name].expand())


@torch.no_grad()
def _mask_weights(modules: dict, shard_masks: dict) -> None:
    for name, module in modules.items():
        local_tensor(module.weight).mul_(shard_masks[name].expand())


def _lr_lambda(config: FinetuneConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _loss(config: FinetuneConfig, student_out, teacher_out, batch: Batch, counted_total: int,
          processes: int) -> torch.Tensor:
    """This process's loss for its rows of a batch whose loss counts ``counted_total`` tokens
    in all: the per-token terms are sums over its tokens / counted_total, times ``processes``
    (the gradients are averaged over them), so they add up to the global batch's mean. The
    hidden-state term is normalised per process: averaged, it is the mean of the processes'."""
    labels = batch.labels[:, 1:].to(student_out.logits.device)
    counted = labels != IGNORE
    logits = student_out.logits[:, :-1].float()
    total = logits.new_zeros(())
    if config.loss in ("lm", "lm+distill"):
        total = total + F.cross_entropy(logits[counted], labels[counted], reduction="sum")
    if config.distills:
        t = config.temperature
        teacher = teacher_out.logits[:, :-1].float()[counted] / t
        kl = F.kl_div(F.log_softmax(logits[counted] / t, -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="sum")
        total = total + kl * t * t
    total = total * processes / max(counted_total, 1)
    if config.distills and config.hidden_weight > 0:
        mask = batch.attention_mask.to(logits.device).unsqueeze(-1).float()
        terms = []
        for hs, ht in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]):
            error = ((hs.float() - ht.float()) ** 2 * mask).sum()
            terms.append(error / ((ht.float() ** 2 * mask).sum() + 1e-12))
        total = total + config.hidden_weight * torch.stack(terms).mean()
    return total


def _lora_targets(model: nn.Module, masks: dict, config: FinetuneConfig) -> list[str]:
    if config.lora_targets:
        return list(config.lora_targets)
    return sorted({name.rsplit(".", 1)[-1] for name in masks})


def _trainable(model: nn.Module, modules: dict, masks: dict, config: FinetuneConfig):
    """``(trained model, base weights)``: the LoRA model (base weights kept to measure the
    merge), or the model with only the pruned Linears (and their biases) trainable. The
    parameters to optimise are the trained model's with ``requires_grad`` (read them after
    :meth:`Launch.wrap`, which replaces them by their shards under FSDP)."""
    if config.mode == "lora":
        # optional: only LoRA needs peft
        from peft import LoraConfig, get_peft_model

        base_weights = {n: get_weight(m).detach().clone() for n, m in modules.items()}
        trained = get_peft_model(model, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=_lora_targets(model, masks, config),
            fan_in_fan_out=any(get_weight(m) is not m.weight for m in modules.values())))
        return trained, base_weights
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
        if getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    return model, None


def _total_steps(config: FinetuneConfig, data) -> int:
    """Optimizer steps: ``max_steps``, or the steps ``max_tokens`` takes, whichever is fewer."""
    tokens_per_step = data.batch(0).tokens * config.grad_accum
    total = config.max_steps or math.ceil(config.max_tokens / max(1, tokens_per_step))
    if config.max_steps and config.max_tokens:
        total = min(total, math.ceil(config.max_tokens / max(1, tokens_per_step)))
    return total


@contextlib.contextmanager
def _one_process_quiet():
    """torch.distributed.checkpoint warns, on every call in one process, that it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save_state(folder: Path, config: FinetuneConfig, progress: dict, trained: nn.Module,
                optimizer, schedule, launch: Launch) -> None:
    """Every process writes its shards of the trained parameters and the optimizer into a new
    folder, the main process adds the progress (step, tokens, history, seconds, schedule, RNG)
    and then puts the new folder in the old one's place."""
    final, writing, old = folder / STATE_DIR, folder / f"{STATE_DIR}.writing", \
        folder / f"{STATE_DIR}.old"
    if launch.main:
        shutil.rmtree(writing, ignore_errors=True)
        writing.mkdir(parents=True)
    launch.barrier()
    model_state, optim_state = get_state_dict(trained, optimizer, options=_STATE_OPTIONS)
    with _one_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=writing,
                 no_dist=not launch.distributed)
    if launch.main:
        with atomic_file(writing / PROGRESS_FILE) as tmp:
            torch.save({"config": dataclasses.asdict(config), **progress,
                        "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                        "processes": launch.processes}, tmp)
        if final.exists():
            final.rename(old)
        writing.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    launch.barrier()


def _saved_state(folder: Path) -> Path | None:
    """The complete state folder in ``folder``: the last written, or the one before it when a
    kill came between the two renames."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        if (folder / name / PROGRESS_FILE).is_file():
            return folder / name
    return None


def _restore(state: Path, config: FinetuneConfig, trained: nn.Module, optimizer, schedule,
             launch: Launch) -> dict:
    """The progress saved in ``state`` (parameters, optimizer, schedule and RNG restored, each
    process its shards, whatever the number of processes that wrote it)."""
    progress = torch.load(state / PROGRESS_FILE, weights_only=False)
    if progress["config"] != dataclasses.asdict(config):
        raise ValueError(f"{state} was written by another configuration: {progress['config']}; "
                         f"resume with the same settings, or start afresh without --resume")
    model_state, optim_state = get_state_dict(trained, optimizer, options=_STATE_OPTIONS)
    saved = {"model": model_state, "optimizer": optim_state}
    with _one_process_quiet():
        dcp.load(saved, checkpoint_id=state, no_dist=not launch.distributed)
    set_state_dict(trained, optimizer, model_state_dict=saved["model"],
                   optim_state_dict=saved["optimizer"], options=_LOAD_OPTIONS)
    schedule.load_state_dict(progress["schedule"])
    torch.set_rng_state(progress["rng"])
    return {k: progress[k] for k in ("step", "tokens", "history", "seconds")}


def _accumulate(trained, teacher, data, config: FinetuneConfig, step: int, device,
                use_autocast: bool, launch: Launch) -> tuple[float, int]:
    """Forward and backward of this process's rows of one optimizer step's ``grad_accum``
    micro-batches; returns ``(loss, tokens)`` of the whole step (all processes)."""
    step_loss, tokens = 0.0, 0
    hidden = config.distills and config.hidden_weight > 0
    for micro in range(config.grad_accum):
        whole = data.batch(step * config.grad_accum + micro)
        batch = split_batch(whole, launch.rank, launch.processes)
        inputs = dict(input_ids=batch.input_ids.to(device),
                      attention_mask=batch.attention_mask.to(device))
        with launch.gradient_sync(trained, micro == config.grad_accum - 1):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                out = trained(**inputs, output_hidden_states=hidden, use_cache=False)
                teacher_out = None
                if config.distills:
                    with torch.no_grad():
                        teacher_out = teacher(**inputs, output_hidden_states=hidden,
                                              use_cache=False)
                loss = _loss(config, out, teacher_out, batch, whole.tokens,
                             launch.processes) / config.grad_accum
            loss.backward()
        step_loss += float(loss.detach())
        tokens += whole.tokens
    return launch.mean(step_loss), tokens


def finetune(model: nn.Module, data, masks: dict[str, torch.Tensor], config: FinetuneConfig, *,
             teacher: nn.Module | None = None, eval_fn: Callable[[nn.Module], float] | None = None,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             progress: bool = True, launch: Launch | None = None,
             eval_ends: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` in place without reviving a pruned weight (see the module docstring).

    data: what ``finetune_data`` returns (``data.batch(step) -> Batch``: the global batch;
    each process trains on its rows). masks: ``{module name: bool [out, in]}``, True = kept,
    for every pruned Linear (a ``PruneResult.masks``); weights outside them are zeroed first.
    teacher: the dense model, for the distillation losses. launch: where it runs
    (:func:`.distributed.launch`; default one process). eval_ends: also ``eval_fn`` before the
    first step and after the last (``result.evals``).
    """
    launch = launch or Launch()
    if config.distills and teacher is None:
        raise ValueError(f"loss={config.loss!r} distils from the dense model: pass teacher=")
    if checkpoint_dir is None and (resume or config.checkpoint_every):
        raise ValueError("checkpoint_every / resume need a checkpoint_dir")
    if launch.distributed and config.mode == "lora":
        raise ValueError("LoRA fine-tunes run in one process; on several, use mode='masked' "
                         "(--mode masked)")
    modules = _masked_modules(model, masks)
    _apply_masks(modules, masks)
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    trained, base_weights = _trainable(model, modules, masks, config)
    on_gpu_fp32 = (launch.device or next(model.parameters()).device).type == "cuda" and \
        next(model.parameters()).dtype == torch.float32
    trained = launch.wrap(trained, mixed_precision=on_gpu_fp32)
    if teacher is not None:
        teacher = launch.wrap(teacher, mixed_precision=on_gpu_fp32, trainable=False)
        teacher.eval()
    shard_masks = _shard_masks(modules, masks, launch) if config.mode == "masked" else {}
    if config.mode == "masked":
        masks = None  # the shard masks replace them: let the caller's dict be the last copy
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = _total_steps(config, data)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    device = next(trained.parameters()).device
    evals = {}
    if eval_fn is not None and eval_ends:
        evals["before"] = eval_fn(trained)
    done = {"step": 0, "tokens": 0, "history": [], "seconds": 0.0}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    saved = _saved_state(folder) if resume and folder is not None else None
    if saved is not None:
        done = _restore(saved, config, trained, optimizer, schedule, launch)

    # FSDP on a GPU computes in bf16 through its own policy; the others autocast.
    use_autocast = on_gpu_fp32 and launch.strategy != "fsdp"
    trained.train()
    bar = tqdm(total=total, initial=done["step"],
               desc=f"fine-tuning ({config.mode}, {config.loss})",
               disable=not progress or not launch.main)
    try:
        while done["step"] < total and (config.max_tokens is None
                                        or done["tokens"] < config.max_tokens):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, tokens = _accumulate(trained, teacher, data, config, done["step"], device,
                                            use_autocast, launch)
            if config.mode == "masked":
                _mask_gradients(modules, shard_masks)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            if config.mode == "masked":
                _mask_weights(modules, shard_masks)
            done["step"] += 1
            done["tokens"] += tokens
            done["seconds"] += time.perf_counter() - started
            record = {"step": done["step"], "tokens": done["tokens"],
                      "seconds": round(done["seconds"], 2), "loss": step_loss,
                      "lr": schedule.get_last_lr()[0]}
            if eval_fn is not None and config.eval_every and done["step"] % config.eval_every == 0:
                record["eval"] = eval_fn(trained)
                trained.train()
            done["history"].append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if folder is not None and config.checkpoint_every and \
                    done["step"] % config.checkpoint_every == 0:
                _save_state(folder, config, done, trained, optimizer, schedule, launch)
    finally:
        bar.close()
        for p in trained.parameters():
            p.requires_grad_(False)
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
    trained.eval()
    lora = None
    if config.mode == "lora":
        model, lora = _merge_lora(trained, modules, masks, base_weights, eval_fn)
    if eval_fn is not None and eval_ends:
        evals["after"] = eval_fn(trained if launch.strategy == "fsdp" else model)
    return FinetuneResult(model if launch.strategy != "fsdp" else trained, done["step"],
                          done["tokens"], done["seconds"], done["history"], lora, evals,
                          sum(m.nbytes for m in shard_masks.values()))


@torch.no_grad()
def _merge_lora(trained, modules: dict, masks: dict, base_weights: dict, eval_fn):
    """Merge the adapters, re-apply the masks; report what the re-mask removed."""
    before = eval_fn(trained) if eval_fn is not None else None
    model = trained.merge_and_unload()
    merged = {n: get_weight(model.get_submodule(n)).detach().clone() for n in modules}
    modules = {n: model.get_submodule(n) for n in modules}
    _apply_masks(modules, masks)
    kept_sq = removed_sq = 0.0
    for name, weight in merged.items():
        update = (weight - base_weights[name]).float()
        mask = masks[name].to(update.device)
        kept_sq += float(update[mask].pow(2).sum())
        removed_sq += float(update[~mask].pow(2).sum())
    report = {"update_norm": math.sqrt(kept_sq + removed_sq), "kept_norm": math.sqrt(kept_sq),
              "removed_fraction": removed_sq / max(kept_sq + removed_sq, 1e-30)}
    if eval_fn is not None:
        model.eval()
        report.update(eval_before_merge=before, eval_after_merge=eval_fn(model))
    return model, report
