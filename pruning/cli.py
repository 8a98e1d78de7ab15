"""``hybrid-prune``: prune a Hugging Face causal LM and measure it, from the command line.

  hybrid-prune                       # = hybrid-prune prune: the embedded SmolLM2, three-tier
                                     # within 0.62 of its bytes (SparseGPT, whole-model budget)
  hybrid-prune prune --model meta-llama/Llama-2-7b-hf --device cuda --save out/
  hybrid-prune eval --model out/ --tasks boolq rte

This module only parses arguments and calls the functions that do the work (loading.py,
api.py, eval.py, checkpoint.py, timing.py), which a Python user calls the same way.
"""
from __future__ import annotations

import argparse
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


def _perplexity(model, tokenizer, args) -> float:
    from .eval import perplexity

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

    from .checkpoint import pack_model, save_pruned, write_report
    from .loading import device_plan
    from .report import format_report
    from .timing import decode_step_ms

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
    out["pattern_spec"] = result.pattern.describe()
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


def run_eval(args) -> dict:
    from .eval import format_zero_shot, zero_shot

    model, tokenizer, name = _load(args)
    out = {"model": name}
    if args.sparsify:
        if not args.tier_maps:
            raise SystemExit("--sparsify needs --tier-maps (a packed checkpoint needs neither)")
        from .checkpoint import packable_tier_maps
        from .tier_io import load_tier_maps

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
        from .tasks import embedded_task_dir

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
        (run_prune if args.command == "prune" else run_eval)(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        raise SystemExit(f"hybrid-prune: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
