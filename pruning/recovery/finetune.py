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
written atomically to ``checkpoint_dir``: ``resume=True`` continues from there after a kill and
ends where an uninterrupted run would have (batches are drawn by step).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from torch import nn

from sparse_kernels.atomic import atomic_file

from .data import IGNORE, Batch
from ..models import get_weight, is_prunable

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "MODES", "LOSSES"]

MODES = ("masked", "lora")
LOSSES = ("lm", "distill", "lm+distill")
STATE_FILE = "finetune-state.pt"


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
    norm before and after the re-mask, and the eval before and after the merge)."""

    model: nn.Module
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    lora: dict | None = None


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
    """The mask in the layout of ``module.weight`` (GPT-2's Conv1D stores [in, out])."""
    layout = mask.t() if get_weight(module) is not module.weight else mask
    return layout.to(device=module.weight.device, dtype=module.weight.dtype).contiguous()


@torch.no_grad()
def _apply_masks(modules: dict, masks: dict) -> None:
    for name, module in modules.items():
        module.weight.mul_(_param_mask(module, masks[name]))


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


def _loss(config: FinetuneConfig, student_out, teacher_out, batch: Batch) -> torch.Tensor:
    labels = batch.labels[:, 1:].to(student_out.logits.device)
    counted = labels != IGNORE
    logits = student_out.logits[:, :-1].float()
    total = logits.new_zeros(())
    if config.loss in ("lm", "lm+distill"):
        total = total + F.cross_entropy(logits[counted], labels[counted])
    if config.distills:
        t = config.temperature
        teacher = teacher_out.logits[:, :-1].float()[counted] / t
        kl = F.kl_div(F.log_softmax(logits[counted] / t, -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="batchmean")
        total = total + kl * t * t
        if config.hidden_weight > 0:
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


def _save_state(folder: Path, state: dict) -> None:
    with atomic_file(folder / STATE_FILE) as tmp:
        torch.save(state, tmp)


def _trainable(model: nn.Module, modules: dict, masks: dict, config: FinetuneConfig):
    """``(trained model, parameters to optimise, gradient hooks, base weights)``: the LoRA model
    (base weights kept to measure the merge), or the model with only the pruned Linears (and
    their biases) trainable, their gradients masked by hooks."""
    if config.mode == "lora":
        # optional: only LoRA needs peft
        from peft import LoraConfig, get_peft_model

        base_weights = {n: get_weight(m).detach().clone() for n, m in modules.items()}
        trained = get_peft_model(model, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=_lora_targets(model, masks, config),
            fan_in_fan_out=any(get_weight(m) is not m.weight for m in modules.values())))
        return trained, [p for p in trained.parameters() if p.requires_grad], [], base_weights
    for p in model.parameters():
        p.requires_grad_(False)
    params, hooks = [], []
    for name, module in modules.items():
        module.weight.requires_grad_(True)
        mask = _param_mask(module, masks[name])
        hooks.append(module.weight.register_hook(lambda g, m=mask: g * m))
        params.append(module.weight)
        if getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
            params.append(module.bias)
    return model, params, hooks, None


def _total_steps(config: FinetuneConfig, data) -> int:
    """Optimizer steps: ``max_steps``, or the steps ``max_tokens`` takes, whichever is fewer."""
    tokens_per_step = data.batch(0).tokens * config.grad_accum
    total = config.max_steps or math.ceil(config.max_tokens / max(1, tokens_per_step))
    if config.max_steps and config.max_tokens:
        total = min(total, math.ceil(config.max_tokens / max(1, tokens_per_step)))
    return total


def _training_state(config: FinetuneConfig, progress: dict, trained: nn.Module, optimizer,
                    schedule) -> dict:
    """What ``resume`` needs: the progress (step, tokens, history, seconds), the trainable
    parameters, the optimizer, the schedule and the RNG."""
    return {"config": dataclasses.asdict(config), **progress, "rng": torch.get_rng_state(),
            "params": {n: p.detach().cpu() for n, p in trained.named_parameters()
                       if p.requires_grad},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}


def _restore(folder: Path, config: FinetuneConfig, trained: nn.Module, optimizer, schedule,
             device) -> dict:
    """The progress saved in ``folder`` (parameters, optimizer, schedule and RNG restored)."""
    state = torch.load(folder / STATE_FILE, map_location=device, weights_only=False)
    if state["config"] != dataclasses.asdict(config):
        raise ValueError(f"{folder / STATE_FILE} was written by another configuration: "
                         f"{state['config']}")
    named = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return {k: state[k] for k in ("step", "tokens", "history", "seconds")}


def _accumulate(trained, teacher, data, config: FinetuneConfig, step: int, device,
                use_autocast: bool) -> tuple[float, int]:
    """Forward and backward of one optimizer step's ``grad_accum`` micro-batches; returns
    ``(loss, tokens)`` of the step."""
    step_loss, tokens = 0.0, 0
    hidden = config.distills and config.hidden_weight > 0
    for micro in range(config.grad_accum):
        batch = data.batch(step * config.grad_accum + micro)
        inputs = dict(input_ids=batch.input_ids.to(device),
                      attention_mask=batch.attention_mask.to(device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            out = trained(**inputs, output_hidden_states=hidden, use_cache=False)
            teacher_out = None
            if config.distills:
                with torch.no_grad():
                    teacher_out = teacher(**inputs, output_hidden_states=hidden,
                                          use_cache=False)
            loss = _loss(config, out, teacher_out, batch) / config.grad_accum
        loss.backward()
        step_loss += float(loss.detach())
        tokens += batch.tokens
    return step_loss, tokens


def finetune(model: nn.Module, data, masks: dict[str, torch.Tensor], config: FinetuneConfig, *,
             teacher: nn.Module | None = None, eval_fn: Callable[[nn.Module], float] | None = None,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` in place without reviving a pruned weight (see the module docstring).

    data: what ``finetune_data`` returns (``data.batch(step) -> Batch``). masks: ``{module name:
    bool [out, in]}``, True = kept, for every pruned Linear (a ``PruneResult.masks``); weights
    outside them are zeroed first. teacher: the dense model, for the distillation losses.
    """
    if config.distills and teacher is None:
        raise ValueError(f"loss={config.loss!r} distils from the dense model: pass teacher=")
    if checkpoint_dir is None and (resume or config.checkpoint_every):
        raise ValueError("checkpoint_every / resume need a checkpoint_dir")
    modules = _masked_modules(model, masks)
    _apply_masks(modules, masks)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    trained, params, hooks, base_weights = _trainable(model, modules, masks, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = _total_steps(config, data)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    done = {"step": 0, "tokens": 0, "history": [], "seconds": 0.0}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and folder is not None and (folder / STATE_FILE).is_file():
        done = _restore(folder, config, trained, optimizer, schedule, device)

    use_autocast = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    trained.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=total, initial=done["step"],
               desc=f"fine-tuning ({config.mode}, {config.loss})", disable=not progress)
    try:
        while done["step"] < total and (config.max_tokens is None
                                        or done["tokens"] < config.max_tokens):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, tokens = _accumulate(trained, teacher, data, config, done["step"], device,
                                            use_autocast)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            if config.mode == "masked":
                _apply_masks(modules, masks)
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
                _save_state(folder, _training_state(config, done, trained, optimizer, schedule))
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        for p in trained.parameters():
            p.requires_grad_(False)
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
    trained.eval()
    lora = None
    if config.mode == "lora":
        model, lora = _merge_lora(trained, modules, masks, base_weights, eval_fn)
    return FinetuneResult(model, done["step"], done["tokens"], done["seconds"], done["history"],
                          lora)


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
