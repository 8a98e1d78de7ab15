"""Progressive three-tier pruning: demote blocks a step at a time, fine-tuning in between.

A schedule is a list of steps, each a target (fixed tier ratios, or a byte budget) and an amount
of fine-tuning in epochs (one epoch = ``FinetuneConfig.max_steps`` steps). Each iteration prunes
from the current weights with the last tier maps as the ceiling (``prune(...,
previous_tier_maps=...)``: tiers only go down, zeros stay zero), fine-tunes with the masks held,
evaluates, and writes ``iteration-<i>/`` (a packed checkpoint, its tier maps and report) before
recording the iteration in ``progress.json``; ``resume=True`` continues after the last recorded
iteration, from its saved model and tier maps, and ends where an uninterrupted run would.

Schedule files are CSV with a header: ``iteration,dense,mid_2_4,topk,epochs`` (the research
code's) or ``iteration,budget,epochs``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sparse_kernels.atomic import atomic_file
from sparse_kernels.rules import RESEARCH_MIX
from sparse_kernels.tiers import check_ratios

from ..api import prune
from ..checkpoints import load_pruned, save_pruned, unpack_model
from .finetune import finetune

__all__ = ["ScheduleStep", "RESEARCH_SCHEDULE", "read_schedule", "progress_path", "progressive"]

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class ScheduleStep:
    """One iteration: fixed ``ratios`` (dense, 2:4, top-K) or a ``budget``, then ``epochs`` of
    fine-tuning."""

    iteration: int
    epochs: float
    ratios: tuple[float, float, float] | None = None
    budget: float | None = None

    def __post_init__(self):
        if (self.ratios is None) == (self.budget is None):
            raise ValueError(f"iteration {self.iteration}: give tier ratios or a budget")
        if self.ratios is not None:
            object.__setattr__(self, "ratios", check_ratios(self.ratios))
        if not self.epochs >= 0:
            raise ValueError(f"iteration {self.iteration}: epochs must be >= 0, got "
                             f"{self.epochs}")


# The research code's schedule: 0.90/0.10/0.00 for 1 epoch ... 0.35/0.45/0.20 for 10.
RESEARCH_SCHEDULE = (
    ScheduleStep(1, 1, (0.90, 0.10, 0.00)), ScheduleStep(2, 1, (0.80, 0.10, 0.10)),
    ScheduleStep(3, 5, (0.65, 0.20, 0.15)), ScheduleStep(4, 5, (0.50, 0.30, 0.20)),
    ScheduleStep(5, 10, RESEARCH_MIX))


def read_schedule(path: str | os.PathLike) -> tuple[ScheduleStep, ...]:
    """Steps of a schedule CSV (see the module docstring), checked: iterations 1, 2, ...;
    targets that never ask for more than the step before (no block is ever promoted)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no schedule steps")
    columns = set(rows[0])
    try:
        if {"iteration", "dense", "mid_2_4", "topk", "epochs"} <= columns:
            steps = tuple(ScheduleStep(int(r["iteration"]), float(r["epochs"]),
                                       (float(r["dense"]), float(r["mid_2_4"]),
                                        float(r["topk"]))) for r in rows)
        elif {"iteration", "budget", "epochs"} <= columns:
            steps = tuple(ScheduleStep(int(r["iteration"]), float(r["epochs"]),
                                       budget=float(r["budget"])) for r in rows)
        else:
            raise ValueError(f"the header must be iteration,dense,mid_2_4,topk,epochs or "
                             f"iteration,budget,epochs; it is {','.join(rows[0])}")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    check_schedule(steps)
    return steps


def check_schedule(steps) -> None:
    if [s.iteration for s in steps] != list(range(1, len(steps) + 1)):
        raise ValueError(f"iterations must be 1, 2, ..., got {[s.iteration for s in steps]}")
    for before, after in zip(steps, steps[1:]):
        if after.budget is not None and before.budget is not None and after.budget > before.budget:
            raise ValueError(f"iteration {after.iteration} asks for more bytes ({after.budget}) "
                             f"than iteration {before.iteration} ({before.budget}); blocks are "
                             f"never promoted")


def progress_path(out_dir: str | os.PathLike) -> Path:
    """Where a progressive run in ``out_dir`` records its finished iterations."""
    return Path(out_dir).expanduser() / PROGRESS_FILE


def _read_progress(folder: Path) -> dict:
    path = progress_path(folder)
    return json.loads(path.read_text()) if path.is_file() else {"finished": 0}


def progressive(model: nn.Module, tokenizer, calibration, schedule, out_dir: str | os.PathLike,
                *, data, finetune_config, method: str = "sparsegpt", topk: int | None = None,
                block_size: int = 16, teacher: nn.Module | None = None, eval_fn=None,
                resume: bool = False, progress: bool = True, source_model: str | None = None,
                **prune_args) -> list[dict]:
    """Run ``schedule`` (``ScheduleStep`` s) on ``model`` (changed in place); returns a report
    per iteration (pruning report, fine-tuning summary, ``eval_fn`` before and after the
    fine-tune). ``finetune_config``: a ``FinetuneConfig`` whose ``max_steps`` is one epoch.
    ``calibration``: token ids ``[n, seqlen]`` (the same each iteration). ``prune_args`` go to
    ``prune`` (ranking, sensitivity, nsamples, ...). ``source_model``: the dense model's name,
    recorded in each iteration's report (``hybrid-prune finetune`` distils from it)."""
    schedule = tuple(schedule)
    check_schedule(schedule)
    if finetune_config.max_steps is None:
        raise ValueError("finetune_config.max_steps is one epoch of fine-tuning: set it")
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    described = [dataclasses.asdict(s) for s in schedule]
    state = _read_progress(folder)
    if state["finished"] and not resume:
        raise FileExistsError(f"{folder} holds a progressive run ({state['finished']} "
                              f"iterations done): resume it, or choose a new folder")
    if state["finished"] and state.get("schedule") != described:
        raise ValueError(f"{folder} was run with another schedule: {state.get('schedule')}")
    previous, reports = None, list(state.get("reports", []))
    if state["finished"]:
        saved = load_pruned(folder / f"iteration-{state['finished']}")
        model.load_state_dict(saved.model.state_dict())
        previous = saved.tier_maps
    for step in schedule[state["finished"]:]:
        target = dict(tier_ratios=step.ratios) if step.ratios is not None else \
            dict(budget=step.budget)
        result = prune(model, calibration, method, "three_tier", topk=topk,
                       block_size=block_size, previous_tier_maps=previous, progress=progress,
                       **target, **prune_args)
        report = {"model": source_model, "iteration": step.iteration,
                  "target": dataclasses.asdict(step),
                  "sparsity": result.report["sparsity"],
                  "packed_bytes": result.report.get("packed_bytes"),
                  "tiers": result.report.get("per_tier")}
        if eval_fn is not None:
            report["eval_pruned"] = eval_fn(model)
        steps = round(step.epochs * finetune_config.max_steps)
        if steps:
            config = dataclasses.replace(finetune_config, max_steps=steps,
                                         seed=finetune_config.seed + step.iteration)
            tuned = finetune(model, data, result.masks, config, teacher=teacher,
                             progress=progress)
            if tuned.model is not model:  # LoRA merged into the base model: the same weights
                model.load_state_dict(tuned.model.state_dict())
            report["finetune"] = {"steps": tuned.steps, "tokens": tuned.tokens,
                                  "seconds": round(tuned.seconds, 1), "lora": tuned.lora}
            if eval_fn is not None:
                report["eval_finetuned"] = eval_fn(model)
        save_pruned(folder / f"iteration-{step.iteration}", model, tokenizer, result, report,
                    source_model=source_model, overwrite=True)
        unpack_model(model)  # packed to save; dense again to go on
        previous = result.tier_maps
        reports.append(report)
        with atomic_file(progress_path(folder)) as tmp:
            Path(tmp).write_text(json.dumps({"finished": step.iteration, "schedule": described,
                                             "reports": reports}, indent=1))
    return reports

