"""The argument parser of ``hybrid-prune`` (``pruning/cli.py``): every subcommand's flags, their
defaults and help; nothing here runs anything."""
from __future__ import annotations

import argparse

import torch

from sparse_kernels.rules import BITS, DEFAULT_GROUP_SIZE

from .evaluation import EMBEDDED_TASK
from .planning import RANKINGS
from .recovery import LOSSES, MODES, STRATEGIES
from .structured import IMPORTANCES
from .workflows import DEFAULT_BUDGET, EMBEDDED_NSAMPLES, HUB_NSAMPLES

DESCRIPTION = "prune a Hugging Face causal LM and measure it, from the command line."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WANDA_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa")


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


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="let --save replace the files it writes in a non-empty DIR (others stay)")


def _add_calibration_args(p: argparse.ArgumentParser, nsamples: int | None = None) -> None:
    """Calibration text, samples and seed (``nsamples`` None: the embedded / hub default)."""
    p.add_argument("--calibration", default="embedded",
                   help="embedded | wikitext2 | c4 | ptb | squad[:format] | gsm8k | a .txt/.jsonl "
                        "file or folder | a mixture like wikitext2:0.5,c4:0.5")
    p.add_argument("--nsamples", type=int, default=nsamples,
                   help=f"calibration samples (default {nsamples}" if nsamples else
                        f"calibration samples (default {EMBEDDED_NSAMPLES} for the embedded "
                        f"model, {HUB_NSAMPLES} for others, as Wanda and SparseGPT)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-prune", description=DESCRIPTION)
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
    p.add_argument("--bits", type=int, nargs="+", choices=BITS, default=None,
                   help="values of every tier in 16 bits (as they are), int8 or int4 with "
                        "group scales; several with a budget: each matrix takes the one that "
                        "loses least for its bytes (default 16)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"int8 / int4: input columns per scale (default {DEFAULT_GROUP_SIZE}; "
                        f"64 where that does not divide a matrix's width)")
    p.add_argument("--block-size", type=int, default=16, help="block size B (default 16)")
    p.add_argument("--within-block", choices=("score", "magnitude"), default="score",
                   help="what picks the kept weights inside 2:4 / top-K blocks")
    p.add_argument("--ranking", choices=RANKINGS, default=None,
                   help="where blocks compete for tiers (and share a budget): each matrix, "
                        "each block-row of a matrix (fixed ratios), each decoder layer, or the "
                        "whole model (default: model with a budget, else matrix)")
    p.add_argument("--sensitivity", choices=("auto", "none", "gradient"), default="auto",
                   help="weight scores by each output's squared loss gradient (one gradient "
                        "pass); auto: where matrices share a budget")
    p.add_argument("--sensitivity-samples", type=int, default=8,
                   help="calibration samples of the gradient pass (default 8)")
    p.add_argument("--use-variant", action="store_true", help="Wanda's per-row variant")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="write each pruned layer to DIR and map it back, so that a model "
                        "larger than memory is pruned holding one layer (keep DIR until the "
                        "model is saved; delete it after)")
    _add_calibration_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward call")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the packed checkpoint (from_pretrained loads it after import "
                        "sparse_kernels), tokenizer, tier_maps.safetensors, report.json")
    p.add_argument("--save-dense", action="store_true",
                   help="also write the zero-filled dense model to DIR/dense")
    _add_overwrite_arg(p)
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
    _add_overwrite_arg(f)

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
    g.add_argument("--ranking", choices=RANKINGS, default=None,
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

    q = sub.add_parser("quantize", help="put a pruned (fine-tuned) model's values on an int8 / "
                                        "int4 grid, keeping its tiers")
    _add_model_args(q)
    q.add_argument("--bits", type=int, choices=(8, 4), default=4)
    q.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"input columns per scale (default {DEFAULT_GROUP_SIZE})")
    q.add_argument("--method", default="sparsegpt",
                   help="sparsegpt / wanda_obs: GPTQ's error feedback in the OBS sweep (needs "
                        "calibration); magnitude: round to nearest (default sparsegpt)")
    _add_calibration_args(q)
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--eval-ppl", action=argparse.BooleanOptionalAction, default=True,
                   help="perplexity before and after (default on)")
    q.add_argument("--save", required=True, metavar="DIR", help="the quantized packed checkpoint")
    _add_overwrite_arg(q)

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
    _add_calibration_args(p, nsamples=32)
    p.add_argument("--prior-samples", type=int, default=8,
                   help="calibration samples of the H-GSP skip losses (default 8)")
    p.add_argument("--then-three-tier", action="store_true",
                   help="then prune what remains three-tier (SparseGPT, whole-model budget)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"--then-three-tier's byte budget (default {DEFAULT_BUDGET})")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the smaller model (safetensors), tokenizer, units.csv, "
                        "structured.json, kept.png, report.json")
    _add_overwrite_arg(p)
    p.add_argument("--eval-ppl", action=argparse.BooleanOptionalAction, default=None,
                   help="perplexity before and after (default: on for the embedded model)")
    p.add_argument("--time-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="time one decode step before and after (default: on for the embedded "
                        "model)")


def _add_finetune_args(p: argparse.ArgumentParser, progressive: bool = False) -> None:
    """Fine-tuning options; ``progressive``: without the length and resume options (a
    schedule's epochs set the length, and the whole run resumes)."""
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
        p.add_argument("--distributed", choices=STRATEGIES, default="auto",
                       help="under torchrun / accelerate launch: ddp (every process the whole "
                            "model) or fsdp (each process its shards); auto: the accelerate "
                            "config's FSDP, else ddp with several processes, else single")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
