"""``hybrid-prune``: prune a Hugging Face causal LM and measure it, from the command line.

  hybrid-prune                       # = hybrid-prune prune: the embedded SmolLM2, three-tier
                                     # within 0.62 of its bytes (SparseGPT, whole-model budget)
  hybrid-prune prune --model meta-llama/Llama-2-7b-hf --device cuda --save out/
  hybrid-prune eval --model out/ --tasks boolq rte
  hybrid-prune finetune --model out/ --save tuned/ --loss lm+distill --max-tokens 200000
  hybrid-prune progressive --schedule steps.csv --save runs/ --epoch-steps 20
  hybrid-prune structured --ratio 0.2 --importance taylor --save smaller/ [--then-three-tier]

This module only parses arguments and calls the functions that do the work (loading.py,
api.py, eval.py, checkpoint.py, timing.py, finetune.py,
progressive.py, structured/), which a Python user calls the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BUDGET = 0.62
# Calibration samples: the papers' 128 for real models; 32 keeps the embedded model's whole main
# job (two perplexities, a SparseGPT prune with its gradient pass, the decode timing) within five
# minutes on two CPU cores.
EMBEDDED_NSAMPLES, HUB_NSAMPLES = 32, 128
WANDA_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa")
EMBEDDED_TASK = "embedded_cloze"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local folder, or a packed checkpoint folder (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", default=None,
                   help="cpu (default) or a GPU (cuda, cuda:1): the model loads onto it and "
                        "everything runs there")
    p.add_argument("--offload", action="store_true",
                   help="keep the model on the CPU and move each layer to --device for its "
                        "pruning turn (a model larger than the GPU); evaluation stays on the CPU")
    p.add_argument("--device-map", default=None,
                   help="passed to from_pretrained (e.g. auto: spread over several GPUs)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sample / eval window")
    p.add_argument("--ppl-source", default="embedded",
                   help="perplexity text: embedded (held-out part), wikitext2, c4, ptb, a file")
    p.add_argument("--ppl-windows", type=int, default=64,
                   help="evaluate the last N windows of the text (0 = all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-prune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("prune", help="prune a model (the default command)")
    _add_model_args(p)
    p.add_argument("--method", default="sparsegpt",
                   help="magnitude | wanda | sparsegpt | wanda_obs (default sparsegpt)")
    p.add_argument("--pattern", default="three_tier",
                   help="unstructured | N:M (2:4, 4:8) | block | block_topk | three_tier")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="unstructured / block patterns: fraction pruned (default 0.5)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"three_tier: packed bytes / dense bytes (default {DEFAULT_BUDGET} "
                        f"unless --tier-ratios)")
    p.add_argument("--budget-dtype", choices=DTYPES, default=None,
                   help="count the budget's bytes in this dtype (default: the model's)")
    p.add_argument("--no-topk", action="store_true",
                   help="with a budget: dense and 2:4 blocks only (two tiers)")
    p.add_argument("--tier-ratios", type=float, nargs=3, default=None,
                   metavar=("R_DENSE", "R_24", "R_TOPK"),
                   help="three_tier with fixed block fractions instead of a budget (the "
                        "research code's mix: 0.35 0.45 0.20)")
    p.add_argument("--topk", type=int, nargs="+", default=None,
                   help="K kept per top-K block; several: each matrix takes the one its proxy "
                        "loses least with (default 64 with a budget, else 15)")
    p.add_argument("--block-size", type=int, default=16, help="block size B (default 16)")
    p.add_argument("--within-block", choices=("score", "magnitude"), default="score",
                   help="what picks the kept weights inside 2:4 / top-K blocks")
    p.add_argument("--ranking", choices=("matrix", "row", "layer", "model"), default=None,
                   help="where blocks compete for tiers (and share a budget): each matrix, "
                        "each block-row of a matrix (fixed ratios), each decoder layer, or the "
                        "whole model (default: model with a budget, else matrix)")
    p.add_argument("--sensitivity", choices=("auto", "none", "gradient"), default="auto",
                   help="weight scores by each output's squared loss gradient (one gradient "
                        "pass); auto: where matrices share a budget")
    p.add_argument("--sensitivity-samples", type=int, default=8,
                   help="calibration samples of the gradient pass (default 8)")
    p.add_argument("--use-variant", action="store_true", help="Wanda's per-row variant")
    p.add_argument("--calibration", default="embedded",
                   help="embedded | wikitext2 | c4 | ptb | squad[:format] | gsm8k | a .txt/.jsonl "
                        "file or folder | a mixture like wikitext2:0.5,c4:0.5")
    p.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration samples (default {EMBEDDED_NSAMPLES} for the embedded "
                        f"model, {HUB_NSAMPLES} for others, as Wanda and SparseGPT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward call")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the packed checkpoint (from_pretrained loads it after import "
                        "sparse_kernels), tokenizer, tier_maps.safetensors, report.json")
    p.add_argument("--save-dense", action="store_true",
                   help="also write the zero-filled dense model to DIR/dense")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save replace the files it writes in a non-empty DIR (others stay)")
    p.add_argument("--eval-ppl", action=argparse.BooleanOptionalAction, default=None,
                   help="dense and pruned perplexity (default: on for the embedded model)")
    p.add_argument("--sparsify", action=argparse.BooleanOptionalAction, default=None,
                   help="swap in HybridSparseLinear and time one decode step dense vs hybrid "
                        "(default: on for the embedded model)")

    f = sub.add_parser("finetune", help="recover a pruned model without reviving a pruned weight")
    _add_model_args(f)
    _add_finetune_args(f)
    f.add_argument("--save", required=True, metavar="DIR",
                   help="write the fine-tuned model as prune --save does (packed)")
    f.add_argument("--overwrite", action="store_true",
                   help="let --save replace the files it writes in a non-empty DIR")

    g = sub.add_parser("progressive", help="prune a step at a time, fine-tuning in between")
    _add_model_args(g)
    g.add_argument("--schedule", default=None, metavar="CSV",
                   help="iteration,dense,mid_2_4,topk,epochs or iteration,budget,epochs "
                        "(default: the research code's five steps, 0.90/0.10/0.00 ... "
                        "0.35/0.45/0.20)")
    g.add_argument("--epoch-steps", type=int, default=20,
                   help="optimizer steps in one epoch of the schedule (default 20)")
    g.add_argument("--method", default="sparsegpt", help="pruning method (default sparsegpt)")
    g.add_argument("--topk", type=int, default=None,
                   help="K kept per top-K block (default 64 for budget steps, else 15)")
    g.add_argument("--ranking", choices=("matrix", "row", "layer", "model"), default=None,
                   help="where blocks compete (default: model for budget steps, else matrix)")
    g.add_argument("--calibration", default="embedded", help="pruning calibration text")
    g.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration samples (default {EMBEDDED_NSAMPLES} embedded, "
                        f"{HUB_NSAMPLES} others)")
    _add_finetune_args(g, progressive=True)
    g.add_argument("--save", required=True, metavar="DIR",
                   help="one folder per iteration (iteration-<i>/, a packed checkpoint with its "
                        "tier maps and report) and progress.json")
    g.add_argument("--resume", action="store_true",
                   help="continue DIR after its last finished iteration")

    s = sub.add_parser("structured", help="remove whole attention groups and MLP channels "
                                          "(a smaller dense model)")
    _add_model_args(s)
    _add_structured_args(s)

    e = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a (pruned) model")
    _add_model_args(e)
    e.add_argument("--tasks", nargs="*", default=None,
                   help=f"lm-eval tasks, e.g. {' '.join(WANDA_TASKS)} (they need the hub or "
                        f"lm-eval's cache; default {EMBEDDED_TASK}, built offline from the "
                        f"held-out embedded text)")
    e.add_argument("--task-dir", default=None, help="folder of local lm-eval task YAMLs")
    e.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval)")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    e.add_argument("--tier-maps", default=None,
                   help="tier_maps.safetensors of a dense (zero-filled) pruned model, for "
                        "--sparsify (a packed checkpoint needs neither)")
    e.add_argument("--sparsify", action="store_true",
                   help="evaluate a dense pruned model with HybridSparseLinear (needs --tier-maps)")
    e.add_argument("--out", default=None, metavar="JSON", help="write the results as JSON")
    return parser


def _add_structured_args(p: argparse.ArgumentParser) -> None:
    from .structured import IMPORTANCES

    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of the model's parameters to remove (default 0.2)")
    p.add_argument("--importance", choices=IMPORTANCES, default="taylor",
                   help="unit importance (default taylor: |W * dL/dW| over the unit)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="H-GSP prior: scores times ln(1 + dL)^T, dL the loss increase of "
                        "skipping the unit's layer or block (default 0: off)")
    p.add_argument("--tau", type=float, default=0.0,
                   help="H-GSP prior: a layer whose skip dL is below tau is judged as a whole")
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="collapse (delete) a layer whose kept fraction falls below epsilon "
                        "(default 0: never; a block always keeps one unit)")
    p.add_argument("--uniform", action="store_true",
                   help="the same sizes in every layer (stock from_pretrained loads the result)")
    p.add_argument("--calibration", default="embedded", help="calibration text (as prune)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--prior-samples", type=int, default=8,
                   help="calibration samples of the H-GSP skip losses (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--then-three-tier", action="store_true",
                   help="then prune what remains three-tier (SparseGPT, whole-model budget)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"--then-three-tier's byte budget (default {DEFAULT_BUDGET})")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the smaller model (safetensors), tokenizer, units.csv, "
                        "structured.json, kept.png, report.json")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save replace the files it writes in a non-empty DIR")
    p.add_argument("--eval-ppl", action=argparse.BooleanOptionalAction, default=None,
                   help="perplexity before and after (default: on for the embedded model)")
    p.add_argument("--time-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="time one decode step before and after (default: on for the embedded "
                        "model)")


def _add_finetune_args(p: argparse.ArgumentParser, progressive: bool = False) -> None:
    """Fine-tuning options; ``progressive``: without the length and resume options (a
    schedule's epochs set the length, and the whole run resumes)."""
    from .recovery.finetune import LOSSES, MODES

    p.add_argument("--mode", choices=MODES, default="masked",
                   help="masked: the pruned weights train, masked; lora: adapters merged and "
                        "re-masked at the end")
    p.add_argument("--loss", choices=LOSSES, default="lm",
                   help="language-model loss, distillation from the dense model, or both")
    p.add_argument("--teacher", default=None,
                   help="the dense model to distil from (default: the model the prune started "
                        "from, as its report.json names it)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="distillation: weight of the per-layer hidden-state loss (SquareHead)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--data", default="embedded",
                   help="text (embedded, wikitext2, c4, a .txt/.jsonl) or instructions (squad, "
                        "gsm8k, boolq, alpaca, or a .jsonl with --fields)")
    p.add_argument("--fields", default=None, metavar="prompt=KEY,answer=KEY[,context=KEY]",
                   help="the keys of a local instruction .jsonl")
    if not progressive:
        p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
        p.add_argument("--max-tokens", type=int, default=None,
                       help="tokens the loss counts (whichever of the two ends first)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule after the warmup (default cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", nargs="*", default=None,
                   help="module names to adapt (default: every pruned Linear's name)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out perplexity every N steps (0: only before and after)")
    if not progressive:
        p.add_argument("--checkpoint-every", type=int, default=0,
                       help="save the training state every N steps (into DIR-finetune-state)")
        p.add_argument("--resume", action="store_true",
                       help="continue from DIR-finetune-state")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def finetune_config(args):
    """The ``FinetuneConfig`` of the command line's fine-tuning arguments."""
    from .recovery.finetune import FinetuneConfig

    return FinetuneConfig(
        mode=args.mode, loss=args.loss,
        max_steps=getattr(args, "max_steps", None) or getattr(args, "epoch_steps", None),
        max_tokens=getattr(args, "max_tokens", None),
        lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.lr_schedule,
        grad_accum=args.grad_accum, temperature=args.temperature,
        hidden_weight=args.hidden_weight, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None,
        eval_every=args.eval_every, checkpoint_every=getattr(args, "checkpoint_every", 0),
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


def _fields(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        return dict(pair.split("=", 1) for pair in text.split(","))
    except ValueError:
        raise SystemExit(f"--fields takes prompt=KEY,answer=KEY[,context=KEY], got {text!r}")


def _perplexity(model, tokenizer, args) -> float:
    from .evaluation.metrics import perplexity

    return perplexity(model, tokenizer, args.ppl_source, seqlen=args.seqlen,
                      max_windows=args.ppl_windows or None)


def _load(args):
    from .loading import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype] if args.dtype else None,
                      device=args.device, offload=args.offload, device_map=args.device_map)


def tier_arguments(args) -> dict:
    """prune()'s tier arguments from the command line: a three_tier prune takes a byte budget
    (default ``DEFAULT_BUDGET``, shared by the whole model) unless --tier-ratios asks for the
    research code's fixed fractions."""
    budgeted = args.pattern.strip().lower().replace("-", "_") == "three_tier" \
        and args.tier_ratios is None
    if args.budget is not None and not budgeted:
        raise SystemExit("--budget applies to --pattern three_tier without --tier-ratios")
    if not budgeted:
        if args.no_topk or args.budget_dtype:
            raise SystemExit("--no-topk and --budget-dtype apply to a byte budget")
        topk = args.topk or [15]
        if len(topk) > 1:
            raise SystemExit("several --topk values are chosen between by a byte budget")
        return dict(tier_ratios=None if args.tier_ratios is None else tuple(args.tier_ratios),
                    topk=topk[0], ranking=args.ranking or "matrix")
    return dict(budget=DEFAULT_BUDGET if args.budget is None else args.budget,
                budget_dtype=DTYPES[args.budget_dtype] if args.budget_dtype else None,
                allow_topk=not args.no_topk,
                topk=None if args.topk is None else tuple(args.topk) if len(args.topk) > 1
                else args.topk[0],
                ranking=args.ranking or "model")


def run_prune(args) -> dict:
    from . import prune
    from sparse_kernels.atomic import check_output_folder

    from .checkpoints.packed import pack_model, save_pruned, write_report
    from .loading import device_plan
    from .report import format_report
    from .evaluation.timing import decode_step_ms

    embedded = args.model is None
    eval_ppl = embedded if args.eval_ppl is None else args.eval_ppl
    timing = embedded if args.sparsify is None else args.sparsify
    tiers = tier_arguments(args)
    if args.save:  # refuse a folder that would lose files now, not after an hour of pruning
        check_output_folder(args.save, overwrite=args.overwrite)
    plan = device_plan(args.device, args.offload, args.device_map)
    model, tokenizer, name = _load(args)
    out = {"model": name, "method": args.method, "pattern": args.pattern,
           "dtype": str(next(model.parameters()).dtype), "device": plan.model_device}
    if eval_ppl:
        out["ppl"] = {"dense": _perplexity(model, tokenizer, args)}
        print(f"dense perplexity ({args.ppl_source}): {out['ppl']['dense']:.3f}")
    t0 = time.perf_counter()
    result = prune(model, args.calibration, args.method, args.pattern, args.sparsity,
                   **tiers, block_size=args.block_size,
                   within_block=args.within_block, use_variant=args.use_variant,
                   sensitivity=None if args.sensitivity == "none" else args.sensitivity,
                   sensitivity_samples=args.sensitivity_samples, tokenizer=tokenizer,
                   nsamples=args.nsamples or (EMBEDDED_NSAMPLES if embedded else HUB_NSAMPLES),
                   seqlen=args.seqlen, seed=args.seed,
                   batch_size=args.batch_size, device=plan.layer_device)
    out["prune_seconds"] = round(time.perf_counter() - t0, 1)
    out["pattern_spec"] = result.describe()
    out["sparsity"] = result.report["sparsity"]
    out["report"] = result.report
    print(format_report(result.report))
    print(f"pruned ({out['pattern_spec']}) in {out['prune_seconds']} s")
    packed = result.report.get("packed_bytes")
    if packed:
        dtype = (packed["dtype"] or out["dtype"]).replace("torch.", "")
        print(f"packed bytes: {packed['fraction']:.4f} of the dense {dtype} weights "
              f"({packed['packed'] / 2**20:.1f} of {packed['dense'] / 2**20:.1f} MiB)")
    if eval_ppl:
        out["ppl"]["pruned"] = _perplexity(model, tokenizer, args)
        print(f"pruned perplexity ({args.ppl_source}): {out['ppl']['pruned']:.3f}")
    if timing and not result.tier_maps:
        print(f"no decode timing: pattern {args.pattern!r} has no block tiers for the kernels "
              "(use three_tier, block, block_topk or 2:4)")
        timing = False
    dense_ms = decode_step_ms(model) if timing else None
    if args.save:
        save_pruned(args.save, model, tokenizer, result, out, source_model=name,
                    dense_copy=args.save_dense, overwrite=args.overwrite)
        size = out["checkpoint"]
        print(f"saved to {args.save}: {size['bytes'] / 2**20:.1f} MiB, {size['fraction']:.3f} of "
              f"the dense checkpoint ({size['packed_modules']} modules packed)")
    if timing:
        swapped = pack_model(model, result) if not args.save else out["checkpoint"][
            "packed_modules"]
        hybrid_ms = decode_step_ms(model)
        out["decode_step_ms"] = {"dense": round(dense_ms, 3), "hybrid": round(hybrid_ms, 3),
                                 "speedup": round(dense_ms / hybrid_ms, 3),
                                 "modules_swapped": swapped, "device": plan.model_device}
        print(f"one decode step (batch 1): dense {dense_ms:.2f} ms, hybrid {hybrid_ms:.2f} ms "
              f"({dense_ms / hybrid_ms:.2f}x, {swapped} Linear layers swapped)")
        if args.save:  # the report gains the speed; everything else is already saved
            write_report(args.save, out)
    return out


def run_finetune(args) -> dict:
    import shutil
    from pathlib import Path

    from sparse_kernels.atomic import check_output_folder

    from .checkpoints.packed import load_pruned, save_pruned
    from .embedded import EMBEDDED_MODEL_NAME
    from .recovery.finetune import finetune
    from .recovery.data import finetune_data
    from .loading import load_model

    if args.model is None:
        raise SystemExit("finetune --model DIR: the folder hybrid-prune prune --save wrote")
    config = finetune_config(args)
    check_output_folder(args.save, overwrite=args.overwrite)
    pruned = load_pruned(args.model, dtype=DTYPES[args.dtype] if args.dtype else None,
                         device=args.device)
    source = _source_model(args.model)
    out = {"model": source, "pruned_model": args.model, "finetune": {}, "ppl": {}}
    teacher = None
    if config.distills:
        name = args.teacher or (None if source == EMBEDDED_MODEL_NAME else source)
        teacher = load_model(name, dtype=DTYPES[args.dtype] if args.dtype else None,
                             device=args.device)[0]
    data = finetune_data(args.data, pruned.tokenizer, args.seqlen, args.batch_size, args.seed,
                         fields=_fields(args.fields))

    def eval_fn(model):
        return _perplexity(model, pruned.tokenizer, args)

    out["ppl"]["before"] = eval_fn(pruned.model)
    print(f"perplexity before ({args.ppl_source}): {out['ppl']['before']:.3f}")
    state = Path(f"{str(args.save).rstrip('/')}-finetune-state")
    result = finetune(pruned.model, data, pruned.masks, config, teacher=teacher,
                      eval_fn=eval_fn, checkpoint_dir=state, resume=args.resume)
    pruned.model = result.model
    out["ppl"]["after"] = eval_fn(result.model)
    out["finetune"] = {"config": dataclasses.asdict(config),
                       "steps": result.steps, "tokens": result.tokens,
                       "seconds": round(result.seconds, 1), "history": result.history,
                       "lora": result.lora}
    print(f"fine-tuned {result.steps} steps on {result.tokens:,} tokens in "
          f"{result.seconds:.0f} s; perplexity after: {out['ppl']['after']:.3f}")
    if result.lora:
        print(f"LoRA merge: the re-mask removed {result.lora['removed_fraction']:.1%} of the "
              f"update's energy")
    save_pruned(args.save, pruned.model, pruned.tokenizer, pruned, out, source_model=source,
                overwrite=args.overwrite)
    print(f"saved to {args.save}")
    if state.is_dir():  # only resuming needed it
        shutil.rmtree(state)
    return out


def run_progressive(args) -> dict:
    import copy

    from sparse_kernels.atomic import check_output_folder

    from .calibration import get_calibration
    from .recovery.data import finetune_data
    from .recovery.progressive import RESEARCH_SCHEDULE, progress_path, progressive, read_schedule

    schedule = read_schedule(args.schedule) if args.schedule else RESEARCH_SCHEDULE
    if args.epoch_steps < 1:
        raise SystemExit(f"--epoch-steps must be >= 1, got {args.epoch_steps}")
    config = finetune_config(args)
    if not args.resume or not progress_path(args.save).is_file():
        check_output_folder(args.save)  # a fresh run: an empty or new folder
    model, tokenizer, name = _load(args)
    teacher = copy.deepcopy(model).eval() if config.distills else None
    calibration = get_calibration(
        args.calibration, tokenizer, nsamples=args.nsamples or (
            EMBEDDED_NSAMPLES if args.model is None else HUB_NSAMPLES),
        seqlen=args.seqlen, seed=args.seed)
    data = finetune_data(args.data, tokenizer, args.seqlen, args.batch_size, args.seed,
                         fields=_fields(args.fields))

    def eval_fn(m):
        return _perplexity(m, tokenizer, args)

    budgeted = any(step.budget is not None for step in schedule)
    reports = progressive(
        model, tokenizer, calibration, schedule, args.save, data=data, finetune_config=config,
        method=args.method, topk=args.topk, ranking=args.ranking or (
            "model" if budgeted else "matrix"),
        teacher=teacher, eval_fn=eval_fn, resume=args.resume, source_model=name)
    print(f"{'iteration':>9} {'bytes':>7} {'ppl pruned':>11} {'ppl tuned':>10}")
    for r in reports:
        size = (r.get("packed_bytes") or {}).get("fraction")
        print(f"{r['iteration']:>9} {'-' if size is None else f'{size:.4f}':>7} "
              f"{r.get('eval_pruned', float('nan')):>11.3f} "
              f"{r.get('eval_finetuned', float('nan')):>10.3f}")
    print(f"saved to {args.save}/iteration-<i>; the last is iteration-{len(schedule)}")
    return {"model": name, "iterations": reports}


def run_structured(args) -> dict:
    from sparse_kernels.atomic import check_output_folder

    from .loading import device_plan
    from .structured import save_structured, structured_prune, write_structured_outputs
    from .evaluation.timing import decode_step_ms

    if args.budget is not None and not args.then_three_tier:
        raise SystemExit("--budget applies to --then-three-tier")
    embedded = args.model is None
    eval_ppl = embedded if args.eval_ppl is None else args.eval_ppl
    timing = embedded if args.time_decode is None else args.time_decode
    if args.save:
        check_output_folder(args.save, overwrite=args.overwrite)
    if args.offload or args.device_map:
        raise SystemExit("structured pruning takes gradients through the whole model: load it "
                         "onto one --device (no --offload / --device-map)")
    plan = device_plan(args.device)
    model, tokenizer, name = _load(args)
    out = {"model": name, "dtype": str(next(model.parameters()).dtype),
           "device": plan.model_device, "ppl": {}, "decode_step_ms": {}}
    if eval_ppl:
        out["ppl"]["dense"] = _perplexity(model, tokenizer, args)
        print(f"dense perplexity ({args.ppl_source}): {out['ppl']['dense']:.3f}")
    if timing:
        out["decode_step_ms"]["dense"] = round(decode_step_ms(model), 3)
    result = structured_prune(model, args.calibration, args.ratio, args.importance,
                              temperature=args.temperature, tau=args.tau, epsilon=args.epsilon,
                              uniform=args.uniform, tokenizer=tokenizer, nsamples=args.nsamples,
                              seqlen=args.seqlen, prior_samples=args.prior_samples,
                              seed=args.seed)
    out["structured"] = result.summary
    summary = result.summary
    print(f"removed {summary['removed_fraction']:.1%} of {summary['params_before']:,} parameters "
          f"({summary['importance']}, temperature {summary['temperature']}) in "
          f"{summary['seconds']} s; collapsed layers: {summary['collapsed_layers'] or 'none'}")
    print("from_pretrained loads it" if summary["stock_loadable"] else
          "per-layer sizes: load it with pruning.structured.load_structured (or any "
          "hybrid-prune --model)")
    if eval_ppl:
        out["ppl"]["structured"] = _perplexity(model, tokenizer, args)
        print(f"structured perplexity ({args.ppl_source}): {out['ppl']['structured']:.3f}")
    if timing:
        out["decode_step_ms"]["structured"] = round(decode_step_ms(model), 3)
    tiers = None
    if args.then_three_tier:
        from . import prune

        tiers = prune(model, args.calibration, "sparsegpt", "three_tier",
                      budget=DEFAULT_BUDGET if args.budget is None else args.budget,
                      ranking="model", tokenizer=tokenizer, nsamples=args.nsamples,
                      seqlen=args.seqlen, seed=args.seed)
        out["three_tier"] = {"packed_bytes": tiers.report.get("packed_bytes"),
                             "sparsity": tiers.report["sparsity"]}
        packed = tiers.report["packed_bytes"]
        print(f"three-tier on what remains: {packed['fraction']:.4f} of its dense bytes")
        if eval_ppl:
            out["ppl"]["structured+three_tier"] = _perplexity(model, tokenizer, args)
            print(f"structured + three-tier perplexity ({args.ppl_source}): "
                  f"{out['ppl']['structured+three_tier']:.3f}")
    if args.save:
        if tiers is None:
            save_structured(args.save, model, tokenizer, result, out, overwrite=args.overwrite)
        else:  # packed: the kernels run it
            from .checkpoints.packed import save_pruned

            save_pruned(args.save, model, tokenizer, tiers, out, source_model=name,
                        overwrite=args.overwrite,
                        extra=lambda tmp: write_structured_outputs(tmp, result))
        print(f"saved to {args.save}")
    if timing and tiers is not None:
        from .checkpoints.packed import pack_model

        if not args.save:
            pack_model(model, tiers)
        out["decode_step_ms"]["structured+three_tier"] = round(decode_step_ms(model), 3)
    if timing:
        ms = out["decode_step_ms"]
        print("one decode step (batch 1): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    if args.save and timing:
        from .checkpoints.packed import write_report

        write_report(args.save, out)
    return out


def _source_model(folder: str) -> str:
    """The model a pruned folder started from, as its report.json names it."""
    import os

    report = os.path.join(os.path.expanduser(folder), "report.json")
    if os.path.isfile(report):
        with open(report) as f:
            return json.load(f).get("model", folder)
    return folder


def run_eval(args) -> dict:
    from .evaluation.metrics import format_zero_shot, zero_shot

    model, tokenizer, name = _load(args)
    out = {"model": name}
    if args.sparsify:
        if not args.tier_maps:
            raise SystemExit("--sparsify needs --tier-maps (a packed checkpoint needs neither)")
        from .checkpoints.packed import packable_tier_maps
        from .checkpoints.tier_maps import load_tier_maps

        import sparse_kernels as sk

        tier_maps, meta = load_tier_maps(args.tier_maps, model)
        maps = packable_tier_maps(model, tier_maps)
        topk = meta["topk"] if isinstance(meta["topk"], int) else \
            {n: meta["topk"][n] for n in maps}
        sk.sparsify_model(model, maps, topk=topk, block_size=meta["block_size"])
        out["modules_swapped"] = len(maps)
    if not args.no_ppl:
        out["ppl"] = _perplexity(model, tokenizer, args)
        print(f"perplexity ({args.ppl_source}): {out['ppl']:.3f}")
    tasks, task_dir = args.tasks, args.task_dir
    if tasks is None:  # the offline default
        from .evaluation.tasks import embedded_task_dir

        tasks, task_dir = [EMBEDDED_TASK], task_dir or embedded_task_dir()
    if tasks:
        out["zero_shot"] = zero_shot(model, tokenizer, tasks, task_dir=task_dir,
                                     limit=args.limit)
        print(format_zero_shot(out["zero_shot"]))
    if args.out:
        from sparse_kernels.atomic import atomic_file

        with atomic_file(args.out) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "prune")  # no subcommand: prune
    args = build_parser().parse_args(argv)
    try:
        {"prune": run_prune, "finetune": run_finetune, "progressive": run_progressive,
         "eval": run_eval, "structured": run_structured}[args.command](args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        raise SystemExit(f"hybrid-prune: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
