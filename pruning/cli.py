"""``hybrid-prune``: prune a Hugging Face causal LM and measure it, from the command line.

  hybrid-prune                       # = hybrid-prune prune: the embedded SmolLM2, three-tier
                                     # within 0.62 of its bytes (SparseGPT, whole-model budget)
  hybrid-prune prune --model meta-llama/Llama-2-7b-hf --device cuda --save out/
  hybrid-prune eval --model out/ --tasks boolq rte
  hybrid-prune finetune --model out/ --save tuned/ --loss lm+distill --max-tokens 200000
  hybrid-prune progressive --schedule steps.csv --save runs/ --epoch-steps 20
  hybrid-prune structured --ratio 0.2 --importance taylor --save smaller/ [--then-three-tier]
  hybrid-prune quantize --model tuned/ --bits 4 --save tuned-int4/

This module only turns the arguments (``cli_parser.py``) into the config dataclasses of ``pruning.workflows`` and
calls its runs, which a Python user calls the same way.
"""
from __future__ import annotations

import sys

from sparse_kernels.rules import DEFAULT_TOPK

from .cli_parser import DTYPES, build_parser
from .recovery import RESEARCH_SCHEDULE, FinetuneConfig, read_schedule
from .workflows import (DEFAULT_BUDGET, EvalJob, FinetuneJob, ModelSource, Perplexity,
                        ProgressiveJob, PruneJob, QuantizeJob, StructuredJob, TrainingData,
                        run_eval, run_finetune, run_progressive, run_prune, run_quantize,
                        run_structured)

__all__ = ["build_parser", "main", "tier_arguments"]


def finetune_config(args) -> FinetuneConfig:
    """The ``FinetuneConfig`` of the command line's fine-tuning arguments."""
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


def _model(args) -> ModelSource:
    return ModelSource(args.model, DTYPES[args.dtype] if args.dtype else None, args.device,
                       args.offload, args.device_map)


def _ppl(args) -> Perplexity:
    return Perplexity(args.ppl_source, args.seqlen, args.ppl_windows or None)


def tier_arguments(args) -> dict:
    """prune()'s tier arguments from the command line: a three_tier prune takes a byte budget
    (default ``DEFAULT_BUDGET``, shared by the whole model) unless --tier-ratios asks for the
    research code's fixed fractions. Only the combination of flags is checked here; prune()
    checks the values."""
    budgeted = args.pattern.strip().lower().replace("-", "_") == "three_tier" \
        and args.tier_ratios is None
    if args.budget is not None and not budgeted:
        raise SystemExit("--budget applies to --pattern three_tier without --tier-ratios")
    if not budgeted:
        if args.no_topk or args.budget_dtype:
            raise SystemExit("--no-topk and --budget-dtype apply to a byte budget")
        topk = args.topk or [DEFAULT_TOPK]
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


def prune_job(args) -> PruneJob:
    embedded = args.model is None
    eval_ppl = embedded if args.eval_ppl is None else args.eval_ppl
    bits = args.bits or [16]
    prune_args = dict(method=args.method, pattern=args.pattern, sparsity=args.sparsity,
                      block_size=args.block_size, within_block=args.within_block,
                      use_variant=args.use_variant,
                      bits=bits[0] if len(bits) == 1 else tuple(bits),
                      group_size=args.group_size,
                      sensitivity=None if args.sensitivity == "none" else args.sensitivity,
                      sensitivity_samples=args.sensitivity_samples,
                      offload_dir=args.offload_dir, **tier_arguments(args))
    return PruneJob(_model(args), prune_args, args.calibration, args.nsamples, args.seqlen,
                    args.seed, args.batch_size, _ppl(args) if eval_ppl else None,
                    embedded if args.sparsify is None else args.sparsify, args.save,
                    args.save_dense, args.overwrite)


def _train(args) -> TrainingData:
    return TrainingData(args.data, _fields(args.fields), args.seqlen, args.batch_size, args.seed)


def finetune_job(args) -> FinetuneJob:
    return FinetuneJob(_model(args), args.save, finetune_config(args), _train(args),
                       args.teacher, _ppl(args), args.resume, args.overwrite,
                       args.distributed)


def progressive_job(args) -> ProgressiveJob:
    if args.epoch_steps < 1:
        raise SystemExit(f"--epoch-steps must be >= 1, got {args.epoch_steps}")
    schedule = read_schedule(args.schedule) if args.schedule else RESEARCH_SCHEDULE
    return ProgressiveJob(_model(args), args.save, tuple(schedule), finetune_config(args),
                          _train(args), args.method, args.topk, args.ranking, args.calibration,
                          args.nsamples, _ppl(args), args.resume)


def structured_job(args) -> StructuredJob:
    if args.budget is not None and not args.then_three_tier:
        raise SystemExit("--budget applies to --then-three-tier")
    embedded = args.model is None
    eval_ppl = embedded if args.eval_ppl is None else args.eval_ppl
    return StructuredJob(
        _model(args), args.ratio, args.importance, args.temperature, args.tau, args.epsilon,
        args.uniform, args.calibration, args.nsamples, args.prior_samples, args.seqlen,
        args.seed, args.then_three_tier, DEFAULT_BUDGET if args.budget is None else args.budget,
        _ppl(args) if eval_ppl else None,
        embedded if args.time_decode is None else args.time_decode, args.save, args.overwrite)


def quantize_job(args) -> QuantizeJob:
    return QuantizeJob(_model(args), args.save, args.bits, args.group_size, args.method,
                       args.calibration, args.nsamples, args.seqlen, args.seed, args.batch_size,
                       _ppl(args) if args.eval_ppl else None, args.overwrite)


def eval_job(args) -> EvalJob:
    return EvalJob(_model(args), None if args.no_ppl else _ppl(args), args.tasks, args.task_dir,
                   args.limit, args.tier_maps, args.sparsify, args.out)


COMMANDS = {"prune": (prune_job, run_prune), "finetune": (finetune_job, run_finetune),
            "progressive": (progressive_job, run_progressive), "eval": (eval_job, run_eval),
            "structured": (structured_job, run_structured),
            "quantize": (quantize_job, run_quantize)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "prune")  # no subcommand: prune
    args = build_parser().parse_args(argv)
    make_job, run = COMMANDS[args.command]
    try:
        run(make_job(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        raise SystemExit(f"hybrid-prune: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
