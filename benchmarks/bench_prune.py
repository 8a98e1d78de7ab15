"""Perplexity of the embedded model pruned by every method and pattern, in one run.

Loads the embedded SmolLM2-135M-Instruct once, measures the dense perplexity on the held-out
embedded text, then for each configuration restores the dense weights, prunes with the same
calibration samples, and measures perplexity and the wall time of the prune. Prints a table and
writes ``benchmarks/results/prune-<device>-<YYYYMMDD>.json``.

  python benchmarks/bench_prune.py                      # 32 samples x 512 tokens, 64 eval windows
  python benchmarks/bench_prune.py --nsamples 128 --configs wanda:three_tier
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PruneRun, add_prune_run_args, results_path, write_results  # noqa: E402

# name -> prune() arguments
CONFIGS = {
    "magnitude:unstructured": dict(method="magnitude", pattern="unstructured", sparsity=0.5),
    "wanda:unstructured": dict(method="wanda", pattern="unstructured", sparsity=0.5),
    "sparsegpt:unstructured": dict(method="sparsegpt", pattern="unstructured", sparsity=0.5),
    "magnitude:2:4": dict(method="magnitude", pattern="2:4"),
    "wanda:2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt:2:4": dict(method="sparsegpt", pattern="2:4"),
    "wanda:three_tier": dict(method="wanda", pattern="three_tier"),
    "wanda:three_tier:magnitude": dict(method="wanda", pattern="three_tier",
                                       within_block="magnitude"),
    "sparsegpt:three_tier": dict(method="sparsegpt", pattern="three_tier"),
    "wanda:three_tier:row": dict(method="wanda", pattern="three_tier", ranking="row"),
    "sparsegpt:three_tier:row": dict(method="sparsegpt", pattern="three_tier", ranking="row"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    add_prune_run_args(p, nsamples=32)
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = PruneRun(args.nsamples, args.seqlen, args.ppl_windows, args.seed)
    dense_ppl = run.ppl()
    print(f"{'config':28} {'sparsity':>8} {'ppl':>9} {'prune s':>8}")
    print(f"{'dense':28} {0.0:>8.3f} {dense_ppl:>9.3f} {'-':>8}", flush=True)
    records = [dict(config="dense", sparsity=0.0, ppl=dense_ppl, prune_seconds=0.0)]
    for name in args.configs.split(","):
        result, seconds = run.prune(**CONFIGS[name])
        value = run.ppl()
        records.append(dict(config=name, arguments=CONFIGS[name],
                            sparsity=result.report["sparsity"], ppl=value,
                            prune_seconds=round(seconds, 1)))
        print(f"{name:28} {result.report['sparsity']:>8.3f} {value:>9.3f} {seconds:>8.1f}",
              flush=True)
    path = args.out or results_path(torch.device("cpu"), prefix="prune-")
    write_results(path, torch.device("cpu"), records, model=run.name,
                  nsamples=args.nsamples, seqlen=args.seqlen, ppl_windows=args.ppl_windows,
                  threads=torch.get_num_threads())
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
