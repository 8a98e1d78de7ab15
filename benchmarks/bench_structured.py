"""Global structured pruning on the embedded model: importance x prior, recovery, speed, and the
composition with three-tier, in one run.

Every configuration starts from the same dense weights and calibration samples. The unit
statistics (gradients, inputs) and the H-GSP skip losses are measured once on the dense model
and shared by all configurations. For each importance (taylor, taylor_2nd, wanda, magnitude),
with and without the prior: held-out perplexity after removing ``--ratio`` of the parameters.
Then, for the best of them (and its counterpart without the prior): a short masked fine-tune
(every remaining weight trains) and the perplexity after it; greedy-decode tokens/s of the
smaller model against the original (batch 1, KV cache, measured side by side); and the
composition: the best structured model pruned three-tier at ``--budget`` (the package's recipe)
against the recipe alone at the same bytes, with bytes, perplexity and decode speed.

  python benchmarks/bench_structured.py                  # about 25 minutes on 2 cores
  python benchmarks/bench_structured.py --finetune-steps 0 --ppl-windows 4   # a quick look
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PruneRun, add_prune_run_args, results_path, significant,  # noqa: E402
                    write_results)

IMPORTANCES = ("taylor", "taylor_2nd", "wanda", "magnitude")


def weight_bytes(model) -> int:
    """Bytes of the weights the kernels read (packed where packed), each storage once."""
    import sparse_kernels as sk

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, sk.HybridSparseLinear):
            total += module.hybrid_weight.nbytes
            seen.update(id(t) for t in module.buffers())
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def matrix_params(model) -> int:
    """Parameters, each storage once, with a packed module counted as the matrix it holds."""
    import sparse_kernels as sk

    packed = [m for m in model.modules() if isinstance(m, sk.HybridSparseLinear)]
    own = {id(p): p for p in model.parameters()}
    for m in packed:
        for p in m.parameters(recurse=False):
            own.pop(id(p), None)
    return sum(p.numel() for p in own.values()) + sum(m.out_features * m.in_features
                                                      for m in packed)


def decoder_linear_bytes(model) -> int:
    """Bytes of the decoder layers' projections (packed where packed)."""
    import sparse_kernels as sk
    from pruning.models import decoder_layers

    _, layers = decoder_layers(model)
    total = 0
    for module in layers.modules():
        if isinstance(module, sk.HybridSparseLinear):
            total += module.hybrid_weight.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def decode_tokens_per_s(models: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Greedy decode of exactly ``new_tokens`` tokens after a 16-token prompt, batch 1, for each
    of ``{name: model}``: the models take turns, ``repeats`` rounds after one warm-up round, so
    a slow phase of a shared machine hits all of them alike; the median per model."""
    ids = torch.arange(10, 26)[None]
    samples = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
                if round_:
                    samples[name].append(time.perf_counter() - t0)
    return {name: new_tokens / statistics.median(t) for name, t in samples.items()}


def main(argv=None, model=None, tokenizer=None, calibration=None, eval_text="embedded",
         train_ids=None):
    """Run it. ``model`` / ``tokenizer`` / ``calibration`` (ids ``[n, seqlen]``) /
    ``eval_text`` / ``train_ids`` (token ids ``[n]`` to fine-tune on) replace the embedded ones
    (tests use a tiny model)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prune_run_args(p, nsamples=32)
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters removed")
    p.add_argument("--temperature", type=float, default=1.0, help="the prior's temperature")
    p.add_argument("--tau", type=float, default=0.0, help="the prior's layer threshold")
    p.add_argument("--importances", default=",".join(IMPORTANCES),
                   help=f"comma-separated, among {', '.join(IMPORTANCES)} (default all)")
    p.add_argument("--finetune-steps", type=int, default=24,
                   help="masked fine-tune steps of 4 x 256 tokens (0: none)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-seqlen", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--budget", type=float, default=0.62, help="three-tier budget")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9, help="decode timing rounds")
    args = p.parse_args(argv)
    importances = args.importances.split(",")
    unknown = [i for i in importances if i not in IMPORTANCES]
    if unknown:
        raise SystemExit(f"--importances: unknown {unknown}; choose from {list(IMPORTANCES)}")

    from pruning.calibration import get_calibration, get_tokens
    from pruning.recovery import FinetuneConfig, finetune
    from pruning.recovery import TextData
    from pruning.structured import discover_units, skip_losses, structured_prune, unit_statistics

    if calibration is None:
        from pruning.embedded import load_embedded_tokenizer

        calibration = get_calibration("embedded", tokenizer or load_embedded_tokenizer(),
                                      nsamples=args.nsamples, seqlen=args.calib_seqlen,
                                      seed=args.seed)
    ids = calibration
    run = PruneRun(args.nsamples, args.seqlen, args.ppl_windows, args.seed, model=model,
                   tokenizer=tokenizer, calibration=ids, eval_text=eval_text)
    dense_ppl = run.ppl()
    print(f"dense perplexity {dense_ppl:.3f}")
    t0 = time.perf_counter()
    units = discover_units(run.model)
    stats = unit_statistics(run.model, units, list(ids.split(1)), progress=False)
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = skip_losses(run.model, units, list(ids[:8].split(4)), progress=False)
    prior_s = time.perf_counter() - t0
    print(f"unit statistics {stats_s:.0f} s, skip losses {prior_s:.0f} s")
    records = []

    def structured(importance, temperature, uniform=False):
        run.model.load_state_dict(run.dense_state)
        model = copy.deepcopy(run.model)
        result = structured_prune(model, ids, args.ratio, importance, temperature=temperature,
                                  tau=args.tau, uniform=uniform, statistics=stats,
                                  losses=losses, progress=False)
        return model, result

    def ppl_of(model):
        keep, run.model = run.model, model
        try:
            return run.ppl()
        finally:
            run.model = keep

    print(f"{'importance':<11} {'prior':>6} {'uniform':>8} {'removed':>8} {'ppl':>9}")
    for importance in importances:
        for temperature in (0.0, args.temperature):
            for uniform in ((False, True) if importance == "taylor" and not temperature
                            else (False,)):
                model, result = structured(importance, temperature, uniform)
                rec = {"config": "structured", "importance": importance,
                       "temperature": temperature, "tau": args.tau, "uniform": uniform,
                       "removed_fraction": result.summary["removed_fraction"],
                       "sizes": result.sizes, "ppl": ppl_of(model)}
                records.append(rec)
                print(f"{importance:<11} {temperature:>6} {str(uniform):>8} "
                      f"{rec['removed_fraction']:>8.4f} {rec['ppl']:>9.2f}", flush=True)

    per_layer = [r for r in records if not r["uniform"]]
    best = min(per_layer, key=lambda r: r["ppl"])
    other = next(r for r in per_layer if r["importance"] == best["importance"]
                 and r["temperature"] != best["temperature"])
    train = train_ids if train_ids is not None else get_tokens("embedded", run.tokenizer, "train")
    data = TextData(train, args.train_seqlen, 4, args.seed)
    for rec in (best, other) if args.finetune_steps else ():
        model, result = structured(rec["importance"], rec["temperature"])
        masks = {n: torch.ones_like(m.weight, dtype=torch.bool)
                 for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
        tuned = finetune(model, data, masks, FinetuneConfig(max_steps=args.finetune_steps,
                                                            lr=args.lr), progress=False)
        rec["finetuned"] = {"steps": tuned.steps, "tokens": tuned.tokens,
                            "seconds": round(tuned.seconds, 1), "lr": args.lr,
                            "ppl": ppl_of(model)}
        print(f"fine-tuned {rec['importance']} (prior {rec['temperature']}): "
              f"{rec['ppl']:.2f} -> {rec['finetuned']['ppl']:.2f} ({tuned.tokens:,} tokens)",
              flush=True)

    # Speed and the composition with three-tier, all measured side by side here.
    import pruning

    run.model.load_state_dict(run.dense_state)
    original = run.model
    smaller, _ = structured(best["importance"], best["temperature"])
    both = copy.deepcopy(smaller)
    from pruning.workflows import RECIPE

    tiers = pruning.prune(both, ids, budget=args.budget, batch_size=4, progress=False, **RECIPE)
    both_ppl = ppl_of(both)
    tiers.pack(both)
    dense_linear = decoder_linear_bytes(original)
    equal_budget = min(0.999, decoder_linear_bytes(both) / dense_linear)
    alone = copy.deepcopy(original)
    alone_tiers = pruning.prune(alone, ids, budget=equal_budget, batch_size=4, progress=False,
                                **RECIPE)
    alone_ppl = ppl_of(alone)
    alone_tiers.pack(alone)
    models = {"dense": (original, dense_ppl), "structured": (smaller, best["ppl"]),
              "structured+three_tier": (both, both_ppl),
              "three_tier": (alone, alone_ppl)}
    dense_total = weight_bytes(original)
    speed = decode_tokens_per_s({name: model for name, (model, _) in models.items()},
                                args.new_tokens, args.repeats)
    print(f"\nthree_tier alone at the combination's decoder bytes: budget {equal_budget:.4f}")
    print(f"\n{'model':<24} {'params':>11} {'linear bytes':>13} {'all bytes':>10} {'ppl':>8} "
          f"{'tok/s':>7} {'speedup':>8}")
    for name, (model, ppl) in models.items():
        rec = {"config": "speed", "model": name,
               "params": matrix_params(model),
               "decoder_linear_bytes_fraction": significant(decoder_linear_bytes(model)
                                                            / dense_linear),
               "weight_bytes_fraction": significant(weight_bytes(model) / dense_total),
               "ppl": ppl, "decode_tokens_per_s": significant(speed[name]),
               "speedup": significant(speed[name] / speed["dense"])}
        records.append(rec)
        print(f"{name:<24} {rec['params']:>11,} {rec['decoder_linear_bytes_fraction']:>13.4f} "
              f"{rec['weight_bytes_fraction']:>10.4f} {ppl:>8.2f} {speed[name]:>7.1f} "
              f"{rec['speedup']:>7.2f}x")

    path = args.out or results_path(torch.device("cpu"), prefix="structured-")
    write_results(path, torch.device("cpu"), records, dense_ppl=dense_ppl, ratio=args.ratio,
                  nsamples=args.nsamples, calib_seqlen=args.calib_seqlen, seqlen=args.seqlen,
                  ppl_windows=args.ppl_windows, temperature=args.temperature, tau=args.tau,
                  budget=args.budget, equal_budget=equal_budget,
                  statistics_seconds=round(stats_s, 1),
                  skip_loss_seconds=round(prior_s, 1), skip_losses=losses,
                  threads=torch.get_num_threads(),
                  command=" ".join(["bench_structured.py", *(argv if argv else sys.argv[1:])]))
    print(f"\nwrote {path}")
    plot(path)
    return records


def plot(path: str) -> None:
    """Perplexity per importance, with and without the prior (and after fine-tuning)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        payload = json.load(f)
    rows = [r for r in payload["records"] if r["config"] == "structured" and not r["uniform"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(dict.fromkeys(r["importance"] for r in rows))
    for offset, (label, pick) in enumerate((("no prior", lambda r: r["temperature"] == 0),
                                            ("H-GSP prior", lambda r: r["temperature"] > 0))):
        values = [next(r["ppl"] for r in rows if r["importance"] == n and pick(r))
                  for n in names]
        bars = ax.bar([i + 0.4 * offset - 0.2 for i in range(len(names))], values, width=0.4,
                      label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    tuned = [r for r in rows if "finetuned" in r]
    for r in tuned:
        x = names.index(r["importance"]) + (0.2 if r["temperature"] > 0 else -0.2)
        ax.plot([x], [r["finetuned"]["ppl"]], "k_", markersize=14)
    ax.axhline(payload["dense_ppl"], color="gray", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"structured {payload['ratio']:.0%} of the parameters "
                 f"(black: after {tuned[0]['finetuned']['tokens']:,} fine-tune tokens)"
                 if tuned else f"structured {payload['ratio']:.0%} of the parameters",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
