"""Accuracy per byte: perplexity against packed bytes for every way of filling the format.

On the embedded SmolLM2-135M-Instruct: 2:4 (Wanda, SparseGPT), the research code's fixed tier
mixes, and byte-budget allocation (``pruning.planning.allocation``) at a range of budgets, per
matrix, per decoder layer and over the whole model, with Wanda's proxy and with SparseGPT's
(OBS proxy and update), plus dense + 2:4 only; 50 % unstructured as a reference (no kernel
here runs it at fewer bytes). Every configuration starts from the dense weights and the same calibration
samples; bytes are measured by packing the pruned weights (``HybridWeight.nbytes``: values,
2:4 metadata, top-K positions, block index) in ``--budget-dtype`` (fp16: what a GPU runs).

Each record is written to the JSON the moment it is measured (a killed run keeps what it
finished, and ``--resume`` skips it). At the end, two PNGs beside the JSON: perplexity vs bytes
(log scale; the top axis is 1 / bytes, the most a memory-bound decode can gain), and the tier
mix per layer x module of ``--map-config``'s allocation (where the bytes went).

  python benchmarks/bench_frontier.py                         # the whole frontier (hours)
  python benchmarks/bench_frontier.py --series sparsegpt-model --budgets 0.5625,0.62
  python benchmarks/bench_frontier.py --plot benchmarks/results/frontier-....json
  python benchmarks/bench_frontier.py --allocation-of out/report.json --out main-job.png
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PruneRun, add_prune_run_args, results_path,  # noqa: E402
                    resumed_records, write_results)
from pruning.workflows import RECIPE  # noqa: E402

BUDGETS = (0.45, 0.50, 0.5625, 0.62, 0.70, 0.80)
# Byte-budget series: prune() arguments besides the budget. "matrix": every matrix at the budget;
# "model": one budget for the whole model (needs the gradient sensitivity to compare matrices).
SERIES = {
    "wanda-matrix": dict(method="wanda", ranking="matrix", sensitivity=None),
    "sparsegpt-matrix": dict(method="sparsegpt", ranking="matrix", sensitivity=None),
    "sparsegpt-layer": dict(method="sparsegpt", ranking="layer", sensitivity="gradient"),
    "wanda-model": dict(method="wanda", ranking="model", sensitivity="gradient"),
    "sparsegpt-model": dict(method="sparsegpt", ranking="model", sensitivity="gradient"),
    "sparsegpt-model-dense+2:4": dict(method="sparsegpt", ranking="model",
                                      sensitivity="gradient", allow_topk=False),
    # Structure and precision chosen together: each matrix takes its tiers and 16, 8 or 4 bits
    # (groups of 64: 128 does not divide the embedded model's 576-wide inputs).
    "sparsegpt-model-bits": dict(method="sparsegpt", ranking="model", sensitivity="gradient",
                                 bits=(16, 8, 4), group_size=64),
    "sparsegpt-model-int4": dict(method="sparsegpt", ranking="model", sensitivity="gradient",
                                 bits=4, group_size=64),
}
LOW_BUDGETS = (0.15, 0.20, 0.25, 0.27, 0.30, 0.35, 0.45)
# Budgets a series runs at when not all of BUDGETS (dense + 2:4 cannot go below all-2:4).
SERIES_BUDGETS = {"sparsegpt-layer": (0.5625, 0.62),
                  "sparsegpt-model-dense+2:4": (0.62, 0.70, 0.80),
                  "sparsegpt-model-bits": LOW_BUDGETS + (0.62,),
                  "sparsegpt-model-int4": (0.15, 0.20, 0.25, 0.27)}
_RECIPE = RECIPE  # the default recipe's prune() arguments besides the budget (workflows.py)
# Single configurations: baselines, references, and the choices the recipe made.
FIXED = {
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "wanda-mix-0.35/0.45/0.20": dict(method="wanda", pattern="three_tier",
                                     tier_ratios=(0.35, 0.45, 0.20)),
    "wanda-mix-0.4/0.4/0.2": dict(method="wanda", pattern="three_tier",
                                  tier_ratios=(0.4, 0.4, 0.2)),
    "sparsegpt-mix-0.35/0.45/0.20": dict(method="sparsegpt", pattern="three_tier",
                                         tier_ratios=(0.35, 0.45, 0.20)),
    "wanda-unstructured-50%": dict(method="wanda", pattern="unstructured", sparsity=0.5),
    "sparsegpt-unstructured-50%": dict(method="sparsegpt", pattern="unstructured",
                                       sparsity=0.5),
    # Why the recipe is what it is: without the sensitivity, with SparseGPT's own saliency as
    # the allocation's proxy, with the research code's K, with K chosen per matrix.
    "sparsegpt-model-no-sensitivity@0.62": dict(_RECIPE, budget=0.62, sensitivity=None),
    "sparsegpt-model-obs-proxy@0.5625": dict(_RECIPE, budget=0.5625,
                                              method_options={"proxy": "obs"}),
    "sparsegpt-model-obs-proxy@0.62": dict(_RECIPE, budget=0.62,
                                            method_options={"proxy": "obs"}),
    "sparsegpt-model-K15@0.5625": dict(_RECIPE, budget=0.5625, topk=15),
    "sparsegpt-model-K15@0.62": dict(_RECIPE, budget=0.62, topk=15),
    "sparsegpt-model-K15/32/64@0.5625": dict(_RECIPE, budget=0.5625, topk=(15, 32, 64)),
    # Today's fp16 recipe at its default budget, beside the low-bit series of one run.
    "sparsegpt-model@0.62": dict(_RECIPE, budget=0.62),
    # Quantization alone, from the same code (pattern "dense"): GPTQ (in act order, and left to
    # right) and round-to-nearest.
    "gptq-int8-g64": dict(method="sparsegpt", pattern="dense", bits=8, group_size=64),
    "gptq-int4-g64": dict(method="sparsegpt", pattern="dense", bits=4, group_size=64),
    "gptq-int4-g64-left-to-right": dict(method="sparsegpt", pattern="dense", bits=4,
                                        group_size=64, method_options={"act_order": False}),
    "rtn-int4-g64": dict(method="magnitude", pattern="dense", bits=4, group_size=64),
    "gptq-int4-g128": dict(method="sparsegpt", pattern="dense", bits=4, group_size=128),
    # The fixed-structure peers with low-bit values: 2:4 + int4 (Sparse-Marlin's format), and
    # int8 at the structures of the fp16 baselines (int8 must cost them nearly nothing).
    "sparsegpt-2:4-int4-g64": dict(method="sparsegpt", pattern="2:4", bits=4, group_size=64),
    "sparsegpt-2:4-int4-g64-left-to-right": dict(method="sparsegpt", pattern="2:4", bits=4,
                                                 group_size=64,
                                                 method_options={"act_order": False}),
    "sparsegpt-2:4-int8-g64": dict(method="sparsegpt", pattern="2:4", bits=8, group_size=64),
    "sparsegpt-mix-0.35/0.45/0.20-int8-g64": dict(method="sparsegpt", pattern="three_tier",
                                                  tier_ratios=(0.35, 0.45, 0.20), bits=8,
                                                  group_size=64),
}
MAP_CONFIG = "sparsegpt-model@0.62"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def configurations(series: list[str], budgets: list[float], fixed: list[str]) -> dict:
    """``{config name: prune() arguments}`` in the order they run: baselines, the series, then
    the single configurations at a budget (the ablations of the recipe)."""
    configs = {name: dict(FIXED[name]) for name in fixed if "@" not in name}
    for s in series:
        for b in budgets:
            if s not in SERIES_BUDGETS or b in SERIES_BUDGETS[s]:
                configs[f"{s}@{b:g}"] = dict(SERIES[s], pattern="three_tier", budget=b)
    configs.update({name: dict(FIXED[name]) for name in fixed if "@" in name})
    return configs


def series_of(name: str) -> str:
    return name.split("@")[0] if "@" in name and name.split("@")[0] in SERIES else name


def measure(run, name: str, arguments: dict, budget_dtype: torch.dtype,
            keep_modules: bool = False) -> dict:
    """Prune the dense weights of ``run`` (a ``PruneRun``) by ``arguments``, then measure."""
    from pruning.methods import get_method

    kwargs = dict(arguments)
    kwargs["method"] = get_method(kwargs["method"], **kwargs.pop("method_options", {}))
    if kwargs.get("budget") is not None:
        kwargs["budget_dtype"] = budget_dtype
    result, seconds = run.prune(**kwargs)
    model = run.model
    record = {"config": name, "series": series_of(name),
              "arguments": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in arguments.items()},
              "sparsity": result.report["sparsity"], "ppl": run.ppl(),
              "prune_seconds": round(seconds, 1)}
    packed = result.report.get("packed_bytes")
    if result.tier_maps:
        # Counted in budget_dtype whatever the run's dtype, so every record compares.
        record["packed_bytes_fraction"] = _packed_fraction(model, result, budget_dtype)
        if packed is not None and packed.get("dtype") == str(budget_dtype):
            assert abs(packed["fraction"] - record["packed_bytes_fraction"]) < 1e-9
        record["tiers"] = {t: e["fraction"] for t, e in result.report["per_tier"].items()}
    if keep_modules:
        record["per_module"] = {n: e.get("tier_blocks") for n, e in
                                result.report["per_module"].items()}
    return record


def _packed_fraction(model, result, dtype: torch.dtype) -> float:
    """Packed bytes / dense bytes (in ``dtype``) of the pruned weights, measured by packing
    them (the report counts them without packing: this checks it)."""
    import sparse_kernels as sk
    from pruning.models import get_weight
    from sparse_kernels.rules import group_size_for

    modules = dict(model.named_modules())
    packed = dense = 0
    for name, tiers in result.tier_maps.items():
        weight = get_weight(modules[name]).detach().to(dtype)
        hw = sk.HybridWeight.from_dense(
            weight, tiers, result.topks[name], result.block_size, bits=result.bits[name],
            group_size=group_size_for(weight.shape[1], result.group_size, result.block_size),
            scales=result.scales.get(name))
        packed, dense = packed + hw.nbytes, dense + weight.numel() * weight.element_size()
    return packed / dense


def plot_frontier(payload: dict, path: str) -> str:
    """Log perplexity vs packed bytes: a line per series, a marker per single configuration,
    horizontal references for dense and 50 % unstructured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = payload["records"]
    fig, ax = plt.subplots(figsize=(9, 6))
    lines = {}
    for r in records:
        if r["series"] in SERIES:
            lines.setdefault(r["series"], []).append((r["packed_bytes_fraction"], r["ppl"]))
    for name, points in lines.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=name)
    for r in records:
        if r["series"] in SERIES:
            continue
        if "@" in r["config"]:  # an ablation of the recipe: a small unlabelled mark
            ax.scatter(r["packed_bytes_fraction"], r["ppl"], marker="x", color="gray", s=18)
        elif "packed_bytes_fraction" in r:
            ax.scatter(r["packed_bytes_fraction"], r["ppl"], marker="s", zorder=3)
            ax.annotate(r["config"], (r["packed_bytes_fraction"], r["ppl"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        else:
            ax.axhline(r["ppl"], linestyle=":", color="gray", linewidth=1)
            ax.annotate(f"{r['config']} (no packed kernel)", (0.01, r["ppl"]), fontsize=7,
                        xycoords=("axes fraction", "data"), xytext=(0, 2),
                        textcoords="offset points", color="gray")
    ax.axhline(payload["dense_ppl"], linestyle="--", color="black", linewidth=1)
    ax.annotate("dense", (0.01, payload["dense_ppl"]), fontsize=7, xytext=(0, 2),
                xycoords=("axes fraction", "data"), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel(f"packed bytes / dense bytes ({payload['budget_dtype']})")
    ax.set_ylabel("perplexity (held-out embedded text)")
    ax.set_title(f"{payload['model']}: accuracy per byte ({payload['nsamples']} x "
                 f"{payload['seqlen']} calibration, {payload['ppl_windows']} eval windows)")
    inverse = lambda v: 1 / np.maximum(v, 1e-3)  # noqa: E731 (matplotlib probes 0 too)
    top = ax.secondary_xaxis("top", functions=(inverse, inverse))
    top.set_xlabel("decode byte limit: dense bytes / packed bytes (x)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _layer_and_module(name: str) -> tuple[str, str]:
    """'model.layers.3.mlp.up_proj' -> ('model.layers.3', 'mlp.up_proj')."""
    parts = name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[:index + 1]), ".".join(parts[index + 1:])


def plot_allocation(record: dict, path: str) -> str:
    """Heat maps of the fraction of blocks in each tier, per decoder layer x module."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_module = {_layer_and_module(n): counts for n, counts in record["per_module"].items()}
    layers = list(dict.fromkeys(layer for layer, _ in per_module))
    modules = list(dict.fromkeys(module for _, module in per_module))
    tiers = ("dense", "2:4", "top-K")
    grids = {t: torch.full((len(layers), len(modules)), float("nan")) for t in tiers}
    for (layer, module), counts in per_module.items():
        li, mi = layers.index(layer), modules.index(module)
        total = sum(counts.values())
        for t in tiers:
            grids[t][li, mi] = counts[t] / total
    fig, axes = plt.subplots(1, 3, figsize=(12, max(4, 0.22 * len(layers) + 1.5)), sharey=True)
    for ax, t in zip(axes, tiers):
        image = ax.imshow(grids[t].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{t} blocks")
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels([m.split(".")[-1] for m in modules], rotation=60, fontsize=7)
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels([layer.split(".")[-1] for layer in layers], fontsize=6)
    axes[0].set_ylabel("decoder layer")
    fig.colorbar(image, ax=list(axes), fraction=0.02, label="fraction of the module's blocks")
    fig.suptitle(f"{record['config']}: packed bytes {record['packed_bytes_fraction']:.3f} "
                 f"of dense, perplexity {record['ppl']:.1f}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_report_allocation(report_path: str, png: str | None) -> str:
    """The heat map of a ``hybrid-prune prune --save`` run, from its ``report.json``."""
    with open(report_path) as f:
        report = json.load(f)
    prune = report["report"]
    record = {"config": f"{report['model']}: {report.get('pattern_spec', report['pattern'])}",
              "packed_bytes_fraction": prune["packed_bytes"]["fraction"],
              "ppl": report.get("ppl", {}).get("pruned", float("nan")),
              "per_module": {n: e["tier_blocks"] for n, e in prune["per_module"].items()}}
    return plot_allocation(record, png or os.path.splitext(report_path)[0] + "-allocation.png")


def plot(path: str) -> list[str]:
    """Both PNGs of a frontier JSON (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    with open(path) as f:
        payload = json.load(f)
    stem = os.path.splitext(path)[0]
    written = [plot_frontier(payload, stem + ".png")]
    mapped = [r for r in payload["records"] if "per_module" in r]
    if mapped:
        written.append(plot_allocation(mapped[0], stem + "-allocation.png"))
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", default=",".join(SERIES),
                   help=f"byte-budget series, comma-separated (or none), from: "
                        f"{', '.join(SERIES)}")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
                   help="budgets (packed / dense bytes) of every series")
    p.add_argument("--fixed", default=",".join(FIXED),
                   help=f"single configurations, comma-separated (or none), from: "
                        f"{', '.join(FIXED)}".replace("%", "%%"))
    p.add_argument("--map-config", default=MAP_CONFIG,
                   help="the configuration whose allocation the heat map shows")
    p.add_argument("--budget-dtype", choices=DTYPES, default="float16",
                   help="the dtype bytes are counted in (default float16)")
    add_prune_run_args(p, nsamples=64)
    p.add_argument("--resume", action="store_true",
                   help="keep the records already in --out and run only the missing ones")
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the PNGs of a JSON")
    p.add_argument("--allocation-of", default=None, metavar="REPORT",
                   help="only draw the tier heat map of a hybrid-prune --save report.json "
                        "(to --out, a .png)")
    args = p.parse_args(argv)
    if args.plot or args.allocation_of:
        return args
    args.series = [s for s in args.series.split(",") if s and s != "none"]
    args.fixed = [s for s in args.fixed.split(",") if s and s != "none"]
    unknown = [s for s in args.series if s not in SERIES] + \
        [s for s in args.fixed if s not in FIXED]
    if unknown:
        raise SystemExit(f"unknown series / configurations {unknown}; series: {list(SERIES)}, "
                         f"single: {list(FIXED)}")
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        raise SystemExit(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    return args


def main(argv=None, model=None, tokenizer=None, calibration=None, eval_text="embedded"):
    """Run the frontier. ``model`` / ``tokenizer`` / ``calibration`` (token ids ``[n, seqlen]``)
    / ``eval_text`` (a perplexity source) replace the embedded ones (tests use a tiny model)."""
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    if args.allocation_of:
        return plot_report_allocation(args.allocation_of, args.out)
    run = PruneRun(args.nsamples, args.seqlen, args.ppl_windows, args.seed, model=model,
                   tokenizer=tokenizer, calibration=calibration, eval_text=eval_text)
    path = args.out or results_path(torch.device("cpu"), prefix="frontier-")
    settings = dict(model=run.name, nsamples=args.nsamples, seqlen=args.seqlen,
                    ppl_windows=args.ppl_windows, seed=args.seed,
                    budget_dtype=args.budget_dtype, threads=torch.get_num_threads())
    records, dense_ppl = resumed_records(path, settings, args.resume)
    if dense_ppl is None:
        dense_ppl = run.ppl()
    done = {r["config"] for r in records}
    print(f"dense perplexity {dense_ppl:.3f}")
    print(f"{'config':42} {'bytes':>7} {'ppl':>9} {'prune s':>8}  tiers (dense/2:4/top-K)")
    configs = configurations(args.series, args.budgets, args.fixed)
    for config, arguments in configs.items():
        if config in done:
            continue
        record = measure(run, config, arguments, DTYPES[args.budget_dtype],
                         keep_modules=config == args.map_config)
        records.append(record)
        write_results(path, torch.device("cpu"), records, dense_ppl=dense_ppl, **settings)
        tiers = "/".join(f"{v:.3f}" for v in record.get("tiers", {}).values())
        size = record.get("packed_bytes_fraction")
        print(f"{config:42} {'-' if size is None else f'{size:.4f}':>7} {record['ppl']:>9.3f} "
              f"{record['prune_seconds']:>8.1f}  {tiers}", flush=True)
    write_results(path, torch.device("cpu"), records, dense_ppl=dense_ppl, **settings)
    print(f"\nwrote {path}")
    for png in plot(path):
        print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
