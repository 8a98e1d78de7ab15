"""The command line's runs as functions of small config dataclasses: prune, fine-tune,
progressive, structured and evaluate. ``hybrid-prune`` only parses its arguments into these
(cli.py); a Python user or a benchmark calls the same functions. Each run prints what it
measures and returns (and, with a save folder, writes) its report dict.

The default recipe lives here too: three-tier within ``DEFAULT_BUDGET`` of the bytes,
SparseGPT's update, the budget shared by the whole model (``RECIPE``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparse_kernels.atomic import atomic_file, check_output_folder
from sparse_kernels.rules import DEFAULT_GROUP_SIZE

from .api import prune
from .calibration import get_calibration
from .checkpoints import (load_pruned, load_tier_maps, pack_model, packable_tier_maps,
                          save_pruned, write_report)
from .embedded import EMBEDDED_MODEL_NAME
from .evaluation import (EMBEDDED_TASK, decode_step_ms, embedded_task_dir, format_zero_shot,
                         perplexity, zero_shot)
from . import loading
from .loading import device_plan
from .recovery import (FinetuneConfig, ScheduleStep, finetune, finetune_data, launch,
                       progressive)
from .recovery.progressive import progress_path
from .report import format_report
from .structured import save_structured, structured_prune, write_structured_outputs

DEFAULT_BUDGET = 0.62
# prune()'s arguments of the default recipe, besides the budget.
RECIPE = dict(method="sparsegpt", pattern="three_tier", ranking="model")
# Calibration samples: the papers' 128 for real models; 32 keeps the embedded model's whole main
# job (two perplexities, a SparseGPT prune with its gradient pass, the decode timing) within five
# minutes on two CPU cores.
EMBEDDED_NSAMPLES, HUB_NSAMPLES = 32, 128

__all__ = ["ModelSource", "Perplexity", "PruneJob", "TrainingData", "FinetuneJob",
           "QuantizeJob", "run_quantize", "ProgressiveJob",
           "StructuredJob", "EvalJob", "run_prune", "run_finetune", "run_progressive",
           "run_structured", "run_eval", "DEFAULT_BUDGET", "RECIPE", "EMBEDDED_NSAMPLES",
           "HUB_NSAMPLES"]


@dataclass
class ModelSource:
    """Which model, and where it runs: ``name`` None is the embedded SmolLM2-135M-Instruct
    (else a local folder or hub id); ``device`` / ``offload`` / ``device_map`` as
    :func:`pruning.loading.device_plan` reads them."""

    name: str | None = None
    dtype: torch.dtype | None = None
    device: str | None = None
    offload: bool = False
    device_map: str | None = None

    @property
    def embedded(self) -> bool:
        return self.name is None

    def load(self):
        """``(model, tokenizer, display name)``."""
        return loading.load_model(self.name, dtype=self.dtype, device=self.device,
                                  offload=self.offload, device_map=self.device_map)

    def nsamples(self, asked: int | None) -> int:
        """Calibration samples: ``asked``, else the default for this model."""
        return asked or (EMBEDDED_NSAMPLES if self.embedded else HUB_NSAMPLES)


@dataclass
class Perplexity:
    """Perplexity on the last ``windows`` windows (None: all) of ``seqlen`` tokens of a text."""

    source: str = "embedded"
    seqlen: int = 512
    windows: int | None = 64

    def __call__(self, model, tokenizer) -> float:
        return perplexity(model, tokenizer, self.source, seqlen=self.seqlen,
                          max_windows=self.windows or None)


def _print_ppl(label: str, ppl: Perplexity, value: float) -> float:
    print(f"{label} perplexity ({ppl.source}): {value:.3f}")
    return value


# ------------------------------------------------------------------------------------ prune
@dataclass
class PruneJob:
    """``prune_args``: :func:`pruning.prune`'s keyword arguments (method, pattern, sparsity,
    budget, ...). ``ppl`` None: no perplexity; ``time_decode``: time one decode step dense vs
    packed. ``save``: the packed checkpoint's folder."""

    model: ModelSource = field(default_factory=ModelSource)
    prune_args: dict = field(default_factory=lambda: dict(RECIPE, budget=DEFAULT_BUDGET))
    calibration: str = "embedded"
    nsamples: int | None = None
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    ppl: Perplexity | None = None
    time_decode: bool = False
    save: str | None = None
    save_dense: bool = False
    overwrite: bool = False


def run_prune(job: PruneJob) -> dict:
    """Prune, measure before and after, save packed: the main job."""
    if job.save:  # refuse a folder that would lose files now, not after an hour of pruning
        check_output_folder(job.save, overwrite=job.overwrite)
    plan = device_plan(job.model.device, job.model.offload, job.model.device_map)
    model, tokenizer, name = job.model.load()
    out = {"model": name, "method": str(job.prune_args.get("method")),
           "pattern": str(job.prune_args.get("pattern")),
           "dtype": str(next(model.parameters()).dtype), "device": plan.model_device}
    if job.ppl:
        out["ppl"] = {"dense": _print_ppl("dense", job.ppl, job.ppl(model, tokenizer))}
    t0 = time.perf_counter()
    result = prune(model, job.calibration, tokenizer=tokenizer,
                   nsamples=job.model.nsamples(job.nsamples), seqlen=job.seqlen, seed=job.seed,
                   batch_size=job.batch_size, device=plan.layer_device, **job.prune_args)
    out.update(prune_seconds=round(time.perf_counter() - t0, 1), pattern_spec=result.describe(),
               sparsity=result.report["sparsity"], report=result.report)
    print(format_report(result.report))
    print(f"pruned ({out['pattern_spec']}) in {out['prune_seconds']} s")
    packed = result.report.get("packed_bytes")
    if packed:
        dtype = (packed["dtype"] or out["dtype"]).replace("torch.", "")
        print(f"packed bytes: {packed['fraction']:.4f} of the dense {dtype} weights "
              f"({packed['packed'] / 2**20:.1f} of {packed['dense'] / 2**20:.1f} MiB)")
    if job.ppl:
        out["ppl"]["pruned"] = _print_ppl("pruned", job.ppl, job.ppl(model, tokenizer))
    timing = job.time_decode
    if timing and not result.tier_maps:
        print(f"no decode timing: pattern {out['pattern']!r} has no block tiers for the kernels "
              "(use three_tier, block, block_topk or 2:4)")
        timing = False
    dense_ms = decode_step_ms(model) if timing else None
    if job.save:
        save_pruned(job.save, model, tokenizer, result, out, source_model=name,
                    dense_copy=job.save_dense, overwrite=job.overwrite)
        size = out["checkpoint"]
        print(f"saved to {job.save}: {size['bytes'] / 2**20:.1f} MiB, {size['fraction']:.3f} of "
              f"the dense checkpoint ({size['packed_modules']} modules packed)")
    if timing:
        swapped = out["checkpoint"]["packed_modules"] if job.save else result.pack(model)
        hybrid_ms = decode_step_ms(model)
        out["decode_step_ms"] = {"dense": round(dense_ms, 3), "hybrid": round(hybrid_ms, 3),
                                 "speedup": round(dense_ms / hybrid_ms, 3),
                                 "modules_swapped": swapped, "device": plan.model_device}
        print(f"one decode step (batch 1): dense {dense_ms:.2f} ms, hybrid {hybrid_ms:.2f} ms "
              f"({dense_ms / hybrid_ms:.2f}x, {swapped} Linear layers swapped)")
        if job.save:  # the report gains the speed; everything else is already saved
            write_report(job.save, out)
    return out


# ------------------------------------------------------------------------- fine-tune
@dataclass
class TrainingData:
    """What a fine-tune trains on: text or instruction data (``source``, ``fields`` for a local
    instruction .jsonl; see :func:`pruning.recovery.finetune_data`) in sequences of ``seqlen``
    tokens, ``batch_size`` per micro-batch."""

    source: str = "embedded"
    fields: dict | None = None
    seqlen: int = 512
    batch_size: int = 4
    seed: int = 0

    def load(self, tokenizer):
        return finetune_data(self.source, tokenizer, self.seqlen, self.batch_size, self.seed,
                             fields=self.fields)


@dataclass
class FinetuneJob:
    """Fine-tune the pruned model in ``model.name`` (a folder ``run_prune`` saved) and save it
    packed to ``save``; ``teacher``: the dense model to distil from (default: the one its
    report.json names); ``distributed``: ``auto | single | ddp | fsdp``, how the processes a
    launcher started share the work (:mod:`pruning.recovery.distributed`)."""

    model: ModelSource
    save: str
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainingData = field(default_factory=TrainingData)
    teacher: str | None = None
    ppl: Perplexity = field(default_factory=Perplexity)
    resume: bool = False
    overwrite: bool = False
    distributed: str = "auto"


def source_model(folder: str) -> str:
    """The model a pruned folder started from, as its report.json names it."""
    report = os.path.join(os.path.expanduser(folder), "report.json")
    if os.path.isfile(report):
        with open(report) as f:
            return json.load(f).get("model", folder)
    return folder


def run_finetune(job: FinetuneJob) -> dict:
    """Fine-tune, measure before and after, save packed. Under torchrun / accelerate launch
    every process runs this: each loads the pruned model on CPU, trains its part, and the main
    process alone gathers the result (FSDP: onto a fresh copy it loads) and writes it."""
    if job.model.name is None:
        raise ValueError("finetune --model DIR: the folder hybrid-prune prune --save wrote")
    check_output_folder(job.save, overwrite=job.overwrite)
    where = launch(job.distributed)
    if where.distributed and job.model.device:
        raise ValueError(f"--device {job.model.device}: with several processes the launcher "
                         f"gives each its device; leave --device out")
    show = print if where.main else (lambda *a, **k: None)
    pruned = load_pruned(job.model.name, dtype=job.model.dtype, device=job.model.device)
    source = source_model(job.model.name)
    out = {"model": source, "pruned_model": job.model.name, "finetune": {}, "ppl": {},
           "distributed": where.describe()}
    teacher = None
    if job.config.distills:
        name = job.teacher or (None if source == EMBEDDED_MODEL_NAME else source)
        teacher = loading.load_model(name, dtype=job.model.dtype, device=job.model.device)[0]
    data = job.train.load(pruned.tokenizer)

    def eval_fn(model):
        return job.ppl(model, pruned.tokenizer)

    state = Path(f"{str(job.save).rstrip('/')}-finetune-state")
    masks, pruned.masks = pruned.masks, {}  # the fine-tune keeps each process's rows only
    result = finetune(pruned.model, data, masks, job.config, teacher=teacher,
                      eval_fn=eval_fn, checkpoint_dir=state, resume=job.resume, launch=where,
                      eval_ends=True, progress=where.main)
    del masks
    out["ppl"] = dict(result.evals)
    show(f"perplexity before ({job.ppl.source}): {out['ppl']['before']:.3f}")
    if where.strategy == "fsdp":
        gathered = where.full_state_dict(result.model)
        if where.main:
            pruned = load_pruned(job.model.name, dtype=job.model.dtype)
            pruned.model.load_state_dict(gathered)
        del gathered
    else:
        pruned.model = result.model
    out["finetune"] = {"config": dataclasses.asdict(job.config),
                       "steps": result.steps, "tokens": result.tokens,
                       "seconds": round(result.seconds, 1), "history": result.history,
                       "lora": result.lora, "mask_bytes_per_process": result.mask_bytes}
    show(f"fine-tuned {result.steps} steps on {result.tokens:,} tokens in "
         f"{result.seconds:.0f} s ({where.strategy}, {where.processes} process"
         f"{'es' if where.processes > 1 else ''}); perplexity after: {out['ppl']['after']:.3f}")
    if result.lora:
        show(f"LoRA merge: the re-mask removed {result.lora['removed_fraction']:.1%} of the "
             f"update's energy")
    if where.main:
        if pruned.quantized:  # trained off the grid: saved at full precision
            pruned.full_precision()
            print("the fine-tuned weights left their low-bit grid: saved with 16-bit values; "
                  "quantize them again with hybrid-prune quantize --model "
                  f"{job.save} --bits {max(pruned.bits.values(), default=4)}")
        save_pruned(job.save, pruned.model, pruned.tokenizer, pruned, out, source_model=source,
                    overwrite=job.overwrite)
        print(f"saved to {job.save}")
    where.barrier()
    if where.main and state.is_dir():  # only resuming needed it
        shutil.rmtree(state)
    return out


# ------------------------------------------------------------------------- quantize
@dataclass
class QuantizeJob:
    """Put the values of a pruned model (``model.name``: a folder ``run_prune`` or
    ``run_finetune`` saved, at 16 bits) on an int8 / int4 grid, keeping its tier maps: ``method``
    sparsegpt / wanda_obs quantize in the OBS sweep (GPTQ's error feedback; the pruned zeros stay
    zero), magnitude / wanda round to nearest. The recovery order this serves: prune -> masked
    fine-tune at full precision -> quantize."""

    model: ModelSource
    save: str
    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    method: str = "sparsegpt"
    calibration: str = "embedded"
    nsamples: int | None = None
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    ppl: Perplexity | None = None
    overwrite: bool = False


def run_quantize(job: QuantizeJob) -> dict:
    if job.model.name is None:
        raise ValueError("quantize --model DIR: the folder hybrid-prune prune / finetune --save "
                         "wrote")
    check_output_folder(job.save, overwrite=job.overwrite)
    pruned = load_pruned(job.model.name, dtype=job.model.dtype, device=job.model.device)
    if pruned.quantized:
        raise ValueError(f"{job.model.name} already holds int{max(pruned.bits.values())} "
                         f"values: quantize the 16-bit model it came from")
    out = {"model": source_model(job.model.name), "quantized_model": job.model.name, "ppl": {},
           "quantize": {"bits": job.bits, "group_size": job.group_size, "method": job.method}}
    if job.ppl:
        out["ppl"]["before"] = _print_ppl("16-bit", job.ppl, job.ppl(pruned.model,
                                                                      pruned.tokenizer))
    t0 = time.perf_counter()
    # Nothing more is pruned ("dense"): the zeros the tier maps left stay zero.
    result = prune(pruned.model, job.calibration, job.method, "dense", bits=job.bits,
                   group_size=job.group_size, tokenizer=pruned.tokenizer,
                   nsamples=job.model.nsamples(job.nsamples), seqlen=job.seqlen, seed=job.seed,
                   batch_size=job.batch_size)
    out["quantize"]["seconds"] = round(time.perf_counter() - t0, 1)
    pruned.bits = {n: job.bits for n in pruned.tier_maps}
    pruned.scales = {n: result.scales[n] for n in pruned.tier_maps}
    pruned.group_size = job.group_size
    if job.ppl:
        out["ppl"]["after"] = _print_ppl(f"int{job.bits}", job.ppl,
                                         job.ppl(pruned.model, pruned.tokenizer))
    save_pruned(job.save, pruned.model, pruned.tokenizer, pruned, out,
                source_model=out["model"], overwrite=job.overwrite)
    size = out["checkpoint"]
    print(f"quantized to int{job.bits} in {out['quantize']['seconds']} s; saved to {job.save}: "
          f"{size['bytes'] / 2**20:.1f} MiB, {size['fraction']:.3f} of the dense checkpoint")
    return out


# ------------------------------------------------------------------------- progressive
@dataclass
class ProgressiveJob:
    """A progressive prune (``pruning.recovery.progressive``): ``schedule`` steps, each
    fine-tuned for its epochs of ``config.max_steps`` steps, one folder per iteration in
    ``save``. ``ranking`` None: the whole model for budget steps, each matrix otherwise."""

    model: ModelSource
    save: str
    schedule: tuple[ScheduleStep, ...]
    config: FinetuneConfig
    train: TrainingData = field(default_factory=TrainingData)
    method: str = "sparsegpt"
    topk: int | None = None
    ranking: str | None = None
    calibration: str = "embedded"
    nsamples: int | None = None
    ppl: Perplexity = field(default_factory=Perplexity)
    resume: bool = False


def run_progressive(job: ProgressiveJob) -> dict:
    if not job.resume or not progress_path(job.save).is_file():
        check_output_folder(job.save)  # a fresh run: an empty or new folder
    model, tokenizer, name = job.model.load()
    teacher = copy.deepcopy(model).eval() if job.config.distills else None
    calibration = get_calibration(job.calibration, tokenizer,
                                  nsamples=job.model.nsamples(job.nsamples),
                                  seqlen=job.train.seqlen, seed=job.train.seed)
    data = job.train.load(tokenizer)
    budgeted = any(step.budget is not None for step in job.schedule)
    reports = progressive(
        model, tokenizer, calibration, job.schedule, job.save, data=data,
        finetune_config=job.config, method=job.method, topk=job.topk,
        ranking=job.ranking or ("model" if budgeted else "matrix"), teacher=teacher,
        eval_fn=lambda m: job.ppl(m, tokenizer), resume=job.resume, source_model=name)
    print(f"{'iteration':>9} {'bytes':>7} {'ppl pruned':>11} {'ppl tuned':>10}")
    for r in reports:
        size = (r.get("packed_bytes") or {}).get("fraction")
        print(f"{r['iteration']:>9} {'-' if size is None else f'{size:.4f}':>7} "
              f"{r.get('eval_pruned', float('nan')):>11.3f} "
              f"{r.get('eval_finetuned', float('nan')):>10.3f}")
    print(f"saved to {job.save}/iteration-<i>; the last is iteration-{len(job.schedule)}")
    return {"model": name, "iterations": reports}


# ------------------------------------------------------------------------- structured
@dataclass
class StructuredJob:
    """Global structured pruning (:func:`pruning.structured.structured_prune`): ``ratio`` of the
    parameters by ``importance`` (H-GSP's prior with ``temperature`` / ``tau``; ``epsilon``
    collapses a layer), then optionally three-tier at ``budget`` (the recipe) on what remains.
    ``ppl`` None: no perplexity; ``time_decode``: one decode step before and after."""

    model: ModelSource = field(default_factory=ModelSource)
    ratio: float = 0.2
    importance: str = "taylor"
    temperature: float = 0.0
    tau: float = 0.0
    epsilon: float = 0.0
    uniform: bool = False
    calibration: str = "embedded"
    nsamples: int = 32
    prior_samples: int = 8
    seqlen: int = 512
    seed: int = 0
    then_three_tier: bool = False
    budget: float = DEFAULT_BUDGET
    ppl: Perplexity | None = None
    time_decode: bool = False
    save: str | None = None
    overwrite: bool = False


def run_structured(job: StructuredJob) -> dict:
    if job.save:
        check_output_folder(job.save, overwrite=job.overwrite)
    if job.model.offload or job.model.device_map:
        raise ValueError("structured pruning takes gradients through the whole model: load it "
                         "onto one --device (no --offload / --device-map)")
    plan = device_plan(job.model.device)
    model, tokenizer, name = job.model.load()
    out = {"model": name, "dtype": str(next(model.parameters()).dtype),
           "device": plan.model_device, "ppl": {}, "decode_step_ms": {}}

    def measure(label: str) -> None:
        if job.ppl:
            out["ppl"][label] = _print_ppl(label, job.ppl, job.ppl(model, tokenizer))
        if job.time_decode:
            out["decode_step_ms"][label] = round(decode_step_ms(model), 3)

    measure("dense")
    result = structured_prune(model, job.calibration, job.ratio, job.importance,
                              temperature=job.temperature, tau=job.tau, epsilon=job.epsilon,
                              uniform=job.uniform, tokenizer=tokenizer, nsamples=job.nsamples,
                              seqlen=job.seqlen, prior_samples=job.prior_samples, seed=job.seed)
    out["structured"] = summary = result.summary
    print(f"removed {summary['removed_fraction']:.1%} of {summary['params_before']:,} parameters "
          f"({summary['importance']}, temperature {summary['temperature']}) in "
          f"{summary['seconds']} s; collapsed layers: {summary['collapsed_layers'] or 'none'}")
    print("from_pretrained loads it" if summary["stock_loadable"] else
          "per-layer sizes: load it with pruning.structured.load_structured (or any "
          "hybrid-prune --model)")
    measure("structured")
    tiers = None
    if job.then_three_tier:
        tiers = prune(model, job.calibration, tokenizer=tokenizer, nsamples=job.nsamples,
                      seqlen=job.seqlen, seed=job.seed, budget=job.budget, **RECIPE)
        out["three_tier"] = {"packed_bytes": tiers.report.get("packed_bytes"),
                             "sparsity": tiers.report["sparsity"]}
        print(f"three-tier on what remains: {tiers.report['packed_bytes']['fraction']:.4f} of "
              f"its dense bytes")
        if job.ppl:
            out["ppl"]["structured+three_tier"] = _print_ppl(
                "structured + three-tier", job.ppl, job.ppl(model, tokenizer))
    if job.save and tiers is None:
        save_structured(job.save, model, tokenizer, result, out, overwrite=job.overwrite)
    elif job.save:  # packed: the kernels run it
        save_pruned(job.save, model, tokenizer, tiers, out, source_model=name,
                    overwrite=job.overwrite,
                    extra=lambda tmp: write_structured_outputs(tmp, result))
    if job.save:
        print(f"saved to {job.save}")
    if job.time_decode and tiers is not None:
        if not job.save:
            tiers.pack(model)
        out["decode_step_ms"]["structured+three_tier"] = round(decode_step_ms(model), 3)
    if job.time_decode:
        ms = out["decode_step_ms"]
        print("one decode step (batch 1): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        if job.save:
            write_report(job.save, out)
    return out


# ------------------------------------------------------------------------- evaluate
@dataclass
class EvalJob:
    """Perplexity (``ppl`` None: none) and lm-eval ``tasks`` (None: the offline embedded cloze
    task; empty: none) of a model; ``tier_maps`` + ``sparsify``: run a dense pruned model with
    the packed kernels first. ``out``: a JSON file for the results."""

    model: ModelSource = field(default_factory=ModelSource)
    ppl: Perplexity | None = field(default_factory=Perplexity)
    tasks: list[str] | None = None
    task_dir: str | None = None
    limit: int | None = None
    tier_maps: str | None = None
    sparsify: bool = False
    out: str | None = None


def run_eval(job: EvalJob) -> dict:
    if job.sparsify and not job.tier_maps:
        raise ValueError("--sparsify needs --tier-maps (a packed checkpoint needs neither)")
    model, tokenizer, name = job.model.load()
    out = {"model": name}
    if job.sparsify:
        tier_maps, meta = load_tier_maps(job.tier_maps, model)
        maps = packable_tier_maps(model, tier_maps)
        out["modules_swapped"] = pack_model(model, maps, meta["topks"], meta["block_size"])
    if job.ppl:
        out["ppl"] = job.ppl(model, tokenizer)
        print(f"perplexity ({job.ppl.source}): {out['ppl']:.3f}")
    tasks, task_dir = job.tasks, job.task_dir
    if tasks is None:  # the offline default
        tasks, task_dir = [EMBEDDED_TASK], task_dir or embedded_task_dir()
    if tasks:
        out["zero_shot"] = zero_shot(model, tokenizer, tasks, task_dir=task_dir, limit=job.limit)
        print(format_zero_shot(out["zero_shot"]))
    if job.out:
        with atomic_file(job.out) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    return out
