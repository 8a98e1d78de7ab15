"""Read a GPU check's folder (benchmarks/gpu_check.py) into a summary, a JSON file and a plot.

  python benchmarks/plot_gpu.py OUT_DIR [--out benchmarks/results/gpu-<gpu>-<date>]

Needs no torch and no GPU: run it anywhere on the files a GPU machine returned. Writes
``PREFIX.json`` (the summary and every record of the run) and, where matplotlib is installed,
``PREFIX.png`` (our kernels' speedup over cuBLAS against the batch, one panel per weight shape);
prints the summary the check itself prints last.
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The measurement targets the summary checks (issue: GPU truth), kernel -> shape -> speedup.
DECODE_TARGETS = {"11008x4096": 1.45, "4096x4096": 1.3}
PREFILL_TARGET = 0.95
MODEL_TARGET = 1.35
NCU_TARGET = 0.75
LOW_BIT_TARGET = {"11008x4096": 3.0}  # int4 values, batch 1, over cuBLAS fp16


def kernel_name(record: dict) -> str:
    """A bench_linear record's kernel, with its precision where its values are low-bit codes
    (``triton-int4``; torch's own low-bit kernels carry it already)."""
    bits = record.get("bits", 16)
    kernel = record["kernel"]
    return kernel if bits == 16 or kernel.startswith("torch-int") else f"{kernel}-int{bits}"


def read_jsonl(path: str) -> list[dict]:
    """Every complete line of a JSON-lines file (a line cut by a kill is skipped)."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


def read_env(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, "env.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def shape_of(rec: dict) -> str:
    return f"{rec['out_features']}x{rec['in_features']}"


def tests_line(out_dir: str) -> str | None:
    """pytest's last summary line in tests.txt ("12 passed, 3 skipped in 20.1s")."""
    try:
        with open(os.path.join(out_dir, "tests.txt")) as f:
            lines = [ln.strip() for ln in f
                     if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
    except OSError:
        return None
    return lines[-1].strip("= ") if lines else None


def summarize(out_dir: str) -> dict:
    """What the run found, from its files: steps, environment, every kernel's speedups, the
    sanitizer, ncu, the whole model, the pruning kernels, and each target met or missed."""
    env = read_env(out_dir)
    steps = read_jsonl(os.path.join(out_dir, "steps.jsonl"))
    kernels = read_jsonl(os.path.join(out_dir, "kernels.jsonl"))
    model = read_jsonl(os.path.join(out_dir, "model.jsonl"))
    linear = [r for r in kernels if r.get("record") == "linear"]
    ours = [r for r in linear if r["kernel"] not in ("cublas", "F.linear")]
    speedups = [dict(kernel=kernel_name(r), bits=r.get("bits", 16), shape=shape_of(r), batch=r["batch"], ms=r.get("ms"),
                     dense_ms=r.get("dense_ms"), speedup=r.get("speedup"),
                     gb_per_s=r.get("gb_per_s"), tasks=r.get("tasks"),
                     error=r.get("error") or (None if r["output_ok"] else
                                              f"wrong output ({r.get('max_rel_error')})"))
                for r in ours]
    smoke = [r for r in kernels if r.get("record") == "smoke"]
    ncu = [r for r in kernels if r.get("record") == "ncu"]
    targets = []
    for r in speedups:
        if r["kernel"] == "cuda-v2" and r["shape"] in DECODE_TARGETS and r["speedup"]:
            targets.append(dict(target=f"decode v2 {r['shape']} batch {r['batch']} >= "
                                       f"{DECODE_TARGETS[r['shape']]}x cuBLAS",
                                value=r["speedup"], met=r["speedup"] >= DECODE_TARGETS[r["shape"]]))
        if (r["bits"] == 4 and r["batch"] == 1 and r["shape"] in LOW_BIT_TARGET
                and r["speedup"]):
            targets.append(dict(target=f"{r['kernel']} {r['shape']} batch 1 >= "
                                       f"{LOW_BIT_TARGET[r['shape']]}x cuBLAS fp16",
                                value=r["speedup"],
                                met=r["speedup"] >= LOW_BIT_TARGET[r["shape"]]))
        if r["kernel"] in ("cuda-unpack", "cuda-v1") and r["batch"] >= 1024 and r["speedup"]:
            targets.append(dict(target=f"prefill {r['kernel']} {r['shape']} batch {r['batch']} "
                                       f">= {PREFILL_TARGET}x", value=r["speedup"],
                                met=r["speedup"] >= PREFILL_TARGET))
    for r in model:
        if r.get("phase") == "decode-step" and r.get("speedup"):
            targets.append(dict(target=f"whole-model decode step batch {r['batch']} >= "
                                       f"{MODEL_TARGET}x", value=r["speedup"],
                                met=r["speedup"] >= MODEL_TARGET))
    for r in ncu:
        if r.get("fraction_of_copy"):
            targets.append(dict(target=f"ncu DRAM rate of v2 >= {NCU_TARGET:.0%} of copy",
                                value=r["fraction_of_copy"],
                                met=r["fraction_of_copy"] >= NCU_TARGET))
    sanitizer = [r for r in kernels if r.get("record") == "sanitizer"]
    if env.get("dry_run"):
        targets = []  # CPU numbers at toy sizes: plumbing, not measurements
    elif sanitizer:
        targets.append(dict(target="compute-sanitizer clean",
                            value=[(r.get("tool"), r.get("errors")) for r in sanitizer],
                            met=all(r.get("ok") for r in sanitizer)))
    return dict(
        env={k: env.get(k) for k in ("gpu", "torch", "torch_cuda", "triton", "nvcc", "driver",
                                     "copy_gb_per_s", "commit", "cpu", "dry_run", "backends",
                                     "cuda_unavailable")},
        steps=[{k: s.get(k) for k in ("step", "status", "seconds", "why")} for s in steps],
        smoke=dict(passed=sum(1 for r in smoke if r.get("ok")),
                   failed=[r for r in smoke if not r.get("ok")]),
        baselines=[dict(kernel=r["kernel"], shape=shape_of(r), batch=r["batch"], ms=r.get("ms"),
                        error=r.get("error"))
                   for r in linear if r["kernel"] in ("cublas", "F.linear")],
        speedups=speedups, ncu=ncu, sanitizer=sanitizer, tests=tests_line(out_dir),
        model=model, prune_kernels=[r for r in kernels if r.get("record") == "prune-kernel"],
        targets=targets)


def format_summary(summary: dict) -> str:
    """A few dozen lines for a console: what was measured and which targets were met."""
    env = summary["env"]
    lines = ["==== GPU check summary", f"device {env.get('gpu') or env.get('cpu')}, torch "
             f"{env.get('torch')}, triton {env.get('triton')}, nvcc {env.get('nvcc')}, copy "
             f"{env.get('copy_gb_per_s')} GB/s, commit {env.get('commit')}"]
    if env.get("cuda_unavailable"):
        lines.append(f"CUDA kernels unavailable: {env['cuda_unavailable']}")
    lines.append("steps: " + ", ".join(f"{s['step']} {s['status']}"
                                       + (f" {s['seconds']}s" if s.get("seconds") else "")
                                       for s in summary["steps"]))
    smoke = summary["smoke"]
    lines.append(f"smoke: {smoke['passed']} ok, {len(smoke['failed'])} failed"
                 + "".join(f"\n  FAIL {json.dumps(r)[:300]}" for r in smoke["failed"][:5]))
    if summary["speedups"]:
        lines.append(f"{'kernel':12} {'shape':>11} {'batch':>5} {'ms':>9} {'dense ms':>9} "
                     f"{'speedup':>7}")
        for r in summary["speedups"]:
            if r["error"]:
                lines.append(f"{r['kernel']:12} {r['shape']:>11} {r['batch']:>5}  !! "
                             f"{r['error'][:160]}")
                continue
            rate = f"  {r['gb_per_s']:.0f} GB/s {r['tasks']} tasks" if r.get("gb_per_s") else ""
            lines.append(f"{r['kernel']:12} {r['shape']:>11} {r['batch']:>5} {r['ms']:>9.4f} "
                         f"{r['dense_ms'] or 0:>9.4f} {r['speedup'] or 0:>6.2f}x{rate}")
    for r in summary["ncu"]:
        lines.append("ncu: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "record"))
    for r in summary["sanitizer"]:
        lines.append(f"sanitizer {r.get('tool')}: {'clean' if r.get('ok') else 'NOT CLEAN'} "
                     f"(errors {r.get('errors')}{', ' + r['error'] if r.get('error') else ''})")
    if summary["tests"]:
        lines.append(f"tests: {summary['tests']}")
    for r in summary["model"]:
        error = f" !! {r['error']}" if r.get("error") else ""
        lines.append(f"model {r.get('phase')} batch {r.get('batch')}: dense "
                     f"{r.get('dense_tokens_per_s')} tok/s, hybrid {r.get('hybrid_tokens_per_s')} "
                     f"tok/s, {r.get('speedup')}x{error}")
    for r in summary["prune_kernels"]:
        lines.append(f"prune kernel {r.get('backend')} {r.get('op')}: "
                     + (f"{r['fraction_of_copy']:.0%} of copy" if r.get("fraction_of_copy")
                        else "wrong output"))
    for t in summary["targets"]:
        lines.append(f"target {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}")
    return "\n".join(lines)


def default_prefix(summary: dict) -> str:
    env = summary["env"]
    name = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "cpu-dry-run").strip("-").lower()
    return os.path.join(HERE, "results", f"gpu-{name}-{env.get('commit') or 'unknown'}")


def speedup_panels(series: dict, path: str, title: str, limits: dict | None = None) -> bool:
    """Speedup over the dense baseline against the batch, a panel per weight shape: ``series``
    ``{shape: {kernel: [(batch, speedup), ...]}}``; ``limits`` ``{shape: byte limit}``, drawn
    dashed. False (nothing drawn) without matplotlib or without points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not series:
        return False
    limits = limits or {}
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.8), squeeze=False)
    for ax, (shape, lines) in zip(axes[0], sorted(series.items())):
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([b for b, _ in points], [s for _, s in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        if shape in limits:
            ax.axhline(limits[shape], color="grey", linestyle="--", linewidth=1,
                       label=f"byte limit {limits[shape]:.2f}x")
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("rows of x (batch)")
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(summary: dict, path: str) -> bool:
    """Our kernels' speedups of a GPU check (:func:`speedup_panels`)."""
    series = {}
    for r in summary["speedups"]:
        if r["speedup"]:
            series.setdefault(r["shape"], {}).setdefault(r["kernel"], []).append(
                (r["batch"], r["speedup"]))
    env = summary["env"]
    return speedup_panels(series, path, f"{env.get('gpu') or env.get('cpu')}, commit "
                                        f"{env.get('commit')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the folder a GPU check wrote")
    p.add_argument("--out", default=None,
                   help="path prefix of the .json / .png (default benchmarks/results/gpu-...)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        raise SystemExit(f"{args.out_dir} is not a folder a GPU check wrote")
    summary = summarize(args.out_dir)
    prefix = args.out or default_prefix(summary)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(dict(summary, records=dict(
            kernels=read_jsonl(os.path.join(args.out_dir, "kernels.jsonl")),
            steps=read_jsonl(os.path.join(args.out_dir, "steps.jsonl")))), f, indent=1)
    print(format_summary(summary))
    print(f"\nwrote {prefix}.json" + (f" and {prefix}.png" if plot(summary, prefix + ".png")
                                      else " (no plot: matplotlib is missing or nothing timed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
