"""Recovery: held-out perplexity against fine-tune tokens, from the same pruned starts.

On the embedded SmolLM2-135M-Instruct. Each start is pruned once from the dense weights (the
package's recipe at a 0.62 byte budget, the research code's fixed Wanda mix, SparseGPT 2:4);
every run fine-tunes a copy of it on the embedded text's training part (masked or LoRA; LM loss,
distillation from the dense model, or both), evaluating every ``--eval-every`` steps, and checks
that no pruned weight came back and that the tier maps still pack. ``--progressive`` adds the
progressive schedule ``--progressive-budgets`` (fine-tune tokens split over its steps by their
epochs) against the one-shot start at the last budget with the same tokens.

Each record is written to the JSON as soon as it is measured (``--resume`` skips finished ones);
at the end a PNG beside it: perplexity against tokens and against training seconds.

  python benchmarks/bench_recovery.py                        # the default plan (about an hour)
  python benchmarks/bench_recovery.py --starts recipe@0.62 --runs masked-lm --tokens 200000
  python benchmarks/bench_recovery.py --plot benchmarks/results/recovery-....json
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PruneRun, add_prune_run_args, results_path,  # noqa: E402
                    resumed_records, write_results)
from pruning.workflows import RECIPE  # noqa: E402

# Pruned starts: prune() arguments.
STARTS = {
    "recipe@0.62": dict(RECIPE, budget=0.62),
    "wanda-mix-0.35/0.45/0.20": dict(method="wanda", pattern="three_tier",
                                     tier_ratios=(0.35, 0.45, 0.20)),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
}
# Fine-tune runs: FinetuneConfig fields (the learning rate comes from --lr-masked / --lr-lora).
RUNS = {
    "masked-lm": dict(mode="masked", loss="lm"),
    "masked-distill": dict(mode="masked", loss="distill"),
    "masked-lm+distill": dict(mode="masked", loss="lm+distill"),
    "lora-lm": dict(mode="lora", loss="lm"),
    "lora-distill": dict(mode="lora", loss="distill"),
}


def check_sparsity_kept(model, result) -> dict:
    """Every pruned weight still exactly zero, and every tier map still packs the weight."""
    import sparse_kernels as sk
    from pruning.models import get_weight

    revived = 0
    for name, mask in result.masks.items():
        weight = get_weight(model.get_submodule(name)).detach()
        revived += int((weight[~mask] != 0).sum())
        if result.tier_maps:
            sk.HybridWeight.from_dense(weight, result.tier_maps[name], result.topks[name],
                                       result.block_size)
    if revived:
        raise AssertionError(f"{revived} pruned weights came back")
    return {"revived": 0, "tier_maps_pack": bool(result.tier_maps)}


def curve(history: list[dict], start_ppl: float) -> list[dict]:
    """(tokens, seconds, ppl) at step 0 and at every evaluated step."""
    points = [{"step": 0, "tokens": 0, "seconds": 0.0, "ppl": start_ppl}]
    return points + [{"step": h["step"], "tokens": h["tokens"], "seconds": h["seconds"],
                      "ppl": h["eval"]} for h in history if "eval" in h]


def finetune_run(run, start, data, config, teacher) -> dict:
    """Fine-tune the pruned ``start`` (its state and result) by ``config``; the record."""
    from pruning.recovery import finetune

    state, result, start_ppl = start
    run.model.load_state_dict(state)
    tuned = finetune(run.model, data, result.masks, config, teacher=teacher,
                     eval_fn=lambda m: _ppl(run, m), progress=False)
    if tuned.model is not run.model:  # LoRA: merged into the base model
        run.model = tuned.model
    final = run.ppl()
    record = {"finetune": dataclasses.asdict(config), "start_ppl": start_ppl, "ppl": final,
              "steps": tuned.steps, "tokens": tuned.tokens, "seconds": round(tuned.seconds, 1),
              "curve": curve(tuned.history, start_ppl), "lora": tuned.lora,
              "sparsity_kept": check_sparsity_kept(run.model, result)}
    if record["curve"][-1]["step"] != tuned.steps:
        record["curve"].append({"step": tuned.steps, "tokens": tuned.tokens,
                                "seconds": round(tuned.seconds, 2), "ppl": final})
    return record


def _ppl(run, model) -> float:
    from pruning.evaluation import perplexity

    return perplexity(model, run.tokenizer, run.eval_text, seqlen=run.seqlen,
                      max_windows=run.ppl_windows, progress=False)


def progressive_run(run, budgets, epochs, data, config, teacher) -> dict:
    """The progressive schedule from the dense weights; its steps' fine-tunes add up to the
    tokens of ``config`` (whose ``max_steps`` is the whole run's)."""
    from pruning.recovery import ScheduleStep, progressive

    steps = [ScheduleStep(i + 1, e, budget=b) for i, (b, e) in enumerate(zip(budgets, epochs))]
    epoch = dataclasses.replace(config, max_steps=max(1, round(config.max_steps / sum(epochs))),
                                max_tokens=None)
    run.model.load_state_dict(run.dense_state)
    with tempfile.TemporaryDirectory() as folder:
        reports = progressive(run.model, run.tokenizer, run.ids, steps, folder, data=data,
                              finetune_config=epoch, method="sparsegpt", ranking="model",
                              teacher=teacher, eval_fn=lambda m: _ppl(run, m), progress=False)
    return {"schedule": [dataclasses.asdict(s) for s in steps],
            "finetune": dataclasses.asdict(epoch), "ppl": reports[-1]["eval_finetuned"],
            "tokens": sum(r["finetune"]["tokens"] for r in reports),
            "seconds": round(sum(r["finetune"]["seconds"] for r in reports), 1),
            "packed_bytes_fraction": reports[-1]["packed_bytes"]["fraction"],
            "iterations": [{k: r.get(k) for k in ("iteration", "eval_pruned", "eval_finetuned")}
                           | {"bytes": r["packed_bytes"]["fraction"],
                              "tokens": r["finetune"]["tokens"]} for r in reports]}


def plot(path: str) -> str | None:
    """Perplexity against tokens and against seconds, a panel per start."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        payload = json.load(f)
    records = [r for r in payload["records"] if "curve" in r]
    starts = list(dict.fromkeys(r["start"] for r in records))
    if not starts:
        return None
    fig, axes = plt.subplots(len(starts), 2, figsize=(11, 4 * len(starts)), squeeze=False)
    for row, start in zip(axes, starts):
        for r in records:
            if r["start"] != start:
                continue
            label = f"{r['run']} ({r['tokens'] // 1000}k tokens)"
            for ax, x in zip(row, ("tokens", "seconds")):
                ax.plot([p[x] for p in r["curve"]], [p["ppl"] for p in r["curve"]],
                        marker=".", label=label)
        for r in payload["records"]:
            if r.get("run") == "progressive" and r["start"] == start:
                row[0].scatter(r["tokens"], r["ppl"], marker="*", s=120, color="black",
                               zorder=3, label="progressive (end)")
        for ax, x in zip(row, ("fine-tune tokens", "training seconds (this CPU)")):
            ax.axhline(payload["dense_ppl"], linestyle="--", color="black", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel("perplexity (held-out)")
            ax.set_title(start, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(f"{payload['model']}: recovery (dense {payload['dense_ppl']:.2f})")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [s for s in text.split(",") if s and s != "none"]
    unknown = [s for s in names if s not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated numbers, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", default=",".join(STARTS),
                   help=f"pruned starts, comma-separated, from: {', '.join(STARTS)}")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"fine-tune runs of every start, from: {', '.join(RUNS)}")
    p.add_argument("--tokens", type=int, default=49152,
                   help="fine-tune tokens of each run (default 49152 = 48 steps of 4 x 256)")
    p.add_argument("--train-seqlen", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--lr-masked", type=float, default=3e-4,
                   help="peak learning rate of masked runs (default 3e-4: see NOTES-recovery)")
    p.add_argument("--lr-lora", type=float, default=1e-3,
                   help="peak learning rate of LoRA runs (default 1e-3)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=8, help="steps between evaluations")
    p.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=True,
                   help="also the progressive schedule vs one-shot at the same tokens")
    p.add_argument("--progressive-budgets", default="0.8,0.7,0.62")
    p.add_argument("--progressive-epochs", default="1,1,2",
                   help="fine-tune share of each progressive step (the tokens split by these)")
    p.add_argument("--progressive-run", default="masked-lm", choices=RUNS,
                   help="how the progressive schedule fine-tunes (its one-shot twin is this run "
                        "from the start at the last budget)")
    add_prune_run_args(p, nsamples=32)
    p.set_defaults(ppl_windows=16)
    p.add_argument("--resume", action="store_true",
                   help="keep the records already in --out and run only the missing ones")
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the PNG of a JSON")
    args = p.parse_args(argv)
    if args.plot:
        return args
    args.starts = _names(args.starts, STARTS, "starts")
    args.runs = _names(args.runs, RUNS, "runs")
    args.progressive_budgets = _floats(args.progressive_budgets, "--progressive-budgets")
    args.progressive_epochs = _floats(args.progressive_epochs, "--progressive-epochs")
    if len(args.progressive_budgets) != len(args.progressive_epochs):
        raise SystemExit("--progressive-budgets and --progressive-epochs need one value each "
                         "per step")
    if args.tokens < args.train_seqlen * args.batch_size:
        raise SystemExit(f"--tokens {args.tokens} is less than one step "
                         f"({args.batch_size} x {args.train_seqlen})")
    return args


def main(argv=None, model=None, tokenizer=None, calibration=None, eval_text="embedded",
         train_ids=None):
    """Run the plan. ``model`` / ``tokenizer`` / ``calibration`` / ``eval_text`` / ``train_ids``
    (token ids ``[n]`` to fine-tune on) replace the embedded ones (tests use a tiny model)."""
    from pruning.calibration import get_tokens
    from pruning.recovery import FinetuneConfig
    from pruning.recovery import TextData

    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    run = PruneRun(args.nsamples, args.seqlen, args.ppl_windows, args.seed, model=model,
                   tokenizer=tokenizer, calibration=calibration, eval_text=eval_text)
    path = args.out or results_path(torch.device("cpu"), prefix="recovery-")
    settings = dict(model=run.name, nsamples=args.nsamples, seqlen=args.seqlen,
                    ppl_windows=args.ppl_windows, seed=args.seed, train_seqlen=args.train_seqlen,
                    batch_size=args.batch_size, threads=torch.get_num_threads())
    records, dense_ppl = resumed_records(path, settings, args.resume)
    if dense_ppl is None:
        dense_ppl = run.ppl()
    print(f"dense perplexity {dense_ppl:.3f}")
    done = {(r["start"], r["run"], r["tokens_asked"]) for r in records}
    ids = train_ids if train_ids is not None else get_tokens("embedded", run.tokenizer, "train")
    data = TextData(ids, args.train_seqlen, args.batch_size, args.seed)
    steps = args.tokens // (args.train_seqlen * args.batch_size)
    teacher = copy.deepcopy(run.model).eval()  # the dense weights, before any prune

    def config(name: str, **extra) -> FinetuneConfig:
        fields = RUNS[name]
        lr = args.lr_lora if fields["mode"] == "lora" else args.lr_masked
        return FinetuneConfig(**fields, max_steps=steps, lr=lr, lora_rank=args.lora_rank,
                              eval_every=args.eval_every, **extra)

    def save(record):
        records.append(record)
        write_results(path, torch.device("cpu"), records, dense_ppl=dense_ppl, **settings)

    starts = list(args.starts)
    last = f"recipe@{args.progressive_budgets[-1]:g}"
    if args.progressive and last not in starts:
        starts.append(last)
    print(f"{'start':28} {'run':20} {'tokens':>7} {'ppl before':>11} {'after':>8} {'s':>7}")
    for start_name in starts:
        plan = [r for r in args.runs if (start_name, r, args.tokens) not in done]
        if args.progressive and start_name == last:
            plan += [args.progressive_run] if args.progressive_run not in plan and \
                (start_name, args.progressive_run, args.tokens) not in done else []
        if not plan:
            continue
        arguments = dict(STARTS.get(start_name) or dict(STARTS["recipe@0.62"], budget=float(
            start_name.split("@")[1])))
        result, prune_seconds = run.prune(**arguments)
        start = ({k: v.clone() for k, v in run.model.state_dict().items()}, result, run.ppl())
        for name in plan:
            record = finetune_run(run, start, data, config(name), teacher)
            record.update(start=start_name, run=name, tokens_asked=args.tokens,
                          prune_seconds=round(prune_seconds, 1))
            save(record)
            print(f"{start_name:28} {name:20} {record['tokens']:>7} {record['start_ppl']:>11.2f} "
                  f"{record['ppl']:>8.2f} {record['seconds']:>7.0f}", flush=True)
    if args.progressive and (last, "progressive", args.tokens) not in done:
        record = progressive_run(run, args.progressive_budgets, args.progressive_epochs, data,
                                 config(args.progressive_run), teacher)
        record.update(start=last, run="progressive", tokens_asked=args.tokens)
        save(record)
        print(f"{last:28} {'progressive':20} {record['tokens']:>7} {'-':>11} "
              f"{record['ppl']:>8.2f} {record['seconds']:>7.0f}", flush=True)
    write_results(path, torch.device("cpu"), records, dense_ppl=dense_ppl, **settings)
    print(f"\nwrote {path}")
    png = plot(path)
    if png:
        print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
