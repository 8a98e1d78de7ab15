"""``structured_prune``: the whole structured pipeline on one model, and saving its result."""
from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sparse_kernels.atomic import write_into_folder

from ..calibration import calibration_ids
from ..models import decoder_layers
from .importance import IMPORTANCES, unit_importance, unit_statistics
from .io import record_sizes
from .prior import prior_factors, skip_losses
from .select import Plan, select_units
from .slicing import apply_plan
from .units import ATTENTION, MLP, discover_units

__all__ = ["StructuredResult", "structured_prune", "save_structured", "write_structured_outputs"]


@dataclass
class StructuredResult:
    """What :func:`structured_prune` did. ``units``: one row per unit (layer, kind, index,
    importance, cost, prior, score, kept); ``layers``: per original layer, the units and
    parameters before and after; ``summary``: the settings and totals."""

    plan: Plan
    units: list[dict]
    layers: list[dict]
    summary: dict
    skip_losses: dict | None = None
    sizes: list[dict] = field(default_factory=list)


def _model_params(model: nn.Module) -> int:
    """Parameters, each storage once (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# A plan whose removed units, measured by independent samples, carry this much more importance
# than those samples' own plan removes is not settled by its calibration: a warning.
UNSETTLED_EXCESS = 0.05


def _removed(plan: Plan) -> set[tuple]:
    return {(key, i) for key, indices in plan.removed.items() for i in indices}


def ranking_stability(model: nn.Module, units, importance: str, statistics, select,
                      weight: dict) -> dict | None:
    """How well the calibration settles which units go, by two-fold cross-validation of the
    plan: the first and the second half of the samples each make a plan (``select(raw
    importance) -> Plan``, the rest of the selection), and each plan's removed units are
    measured by the other half's importance (times ``weight``, the prior per (layer, kind)).

    Returns ``{"agreement": units both plans remove / the larger plan, "excess": importance a
    plan removes as the other half measures it over what that half's own plan removes, minus
    one, averaged over the two}``; None when there is no first half to compare."""
    first = getattr(statistics, "first_half", None)
    if first is None or first.samples < 1 or statistics.samples - first.samples < 1:
        return None
    halves = [unit_importance(model, units, importance, half)
              for half in (first, statistics.minus(first))]
    a, b = (_removed(select(imp)) for imp in halves)

    def removed_importance(chosen, imp):
        return sum(float(imp[key][i]) * weight[key] for key, i in chosen)

    excess = [removed_importance(mine, theirs) / max(removed_importance(own, theirs), 1e-30) - 1
              for mine, own, theirs in ((a, b, halves[1]), (b, a, halves[0]))]
    return {"agreement": len(a & b) / max(len(a), len(b), 1), "excess": sum(excess) / 2}


def warn_if_unsettled(stability: dict, nsamples: int) -> None:
    """Warn when the full calibration's plan is expected to remove more than UNSETTLED_EXCESS
    extra importance. A plan's excess over the best falls like the variance of the importance
    estimate, 1 / samples: the halves' excess with n / 2 samples each predicts half of it for
    all n, and the samples that would bring it to UNSETTLED_EXCESS."""
    expected = stability["excess"] / 2
    if expected <= UNSETTLED_EXCESS:
        return
    enough = int(math.ceil(nsamples * expected / UNSETTLED_EXCESS))
    warnings.warn(f"the unit ranking is unstable on these {nsamples} calibration samples: the plan "
                  f"of one half of them removes {stability['excess']:.0%} more importance, as the "
                  f"other half measures it, than that half's own plan (the two agree on "
                  f"{stability['agreement']:.0%} of the units); about {enough} samples would "
                  f"bring this plan within {UNSETTLED_EXCESS:.0%} of its best (nsamples={enough})",
                  stacklevel=3)


def structured_prune(model: nn.Module, calibration="embedded", ratio: float = 0.2,
                     importance: str = "taylor", *, temperature: float = 0.0, tau: float = 0.0,
                     epsilon: float = 0.0, uniform: bool = False, tokenizer=None,
                     nsamples: int = 32, seqlen: int = 256, prior_samples: int = 8,
                     seed: int = 0, statistics=None, losses: dict | None = None,
                     progress: bool = True) -> StructuredResult:
    """Remove ``ratio`` of ``model``'s parameters as whole attention groups and MLP channels,
    in place; the model becomes a smaller model of the same class.

    calibration: a source name for ``get_calibration`` (with ``tokenizer``) or token ids
    ``[nsamples, seqlen]``. importance: ``taylor``, ``taylor_2nd``, ``wanda`` or ``magnitude``
    (:mod:`.importance`). temperature / tau: the H-GSP prior (:mod:`.prior`; 0 = off).
    epsilon / uniform: :mod:`.select`. ``statistics`` / ``losses``: a previous run's
    ``unit_statistics`` / ``skip_losses`` of the same unpruned model, to compare settings
    without recomputing them. The plans of two halves of the samples are cross-checked
    (:func:`ranking_stability`, ``summary["ranking_stability"]``), with a warning naming the
    samples that would be enough when the ranking is not settled.
    """

    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got "
                         f"{importance!r}")
    t0 = time.perf_counter()
    units = discover_units(model)
    total = _model_params(model)
    needs_data = importance != "magnitude" or temperature > 0
    ids = calibration_ids(calibration, tokenizer, nsamples, seqlen, seed) if needs_data \
        else None
    if importance != "magnitude" and statistics is None:
        statistics = unit_statistics(model, units, list(ids.split(1)),
                                     gradients=importance.startswith("taylor"),
                                     halfway=True, progress=progress)
    scores_raw = unit_importance(model, units, importance, statistics)
    _, layers = decoder_layers(model)
    costs = {(u.index, kind): u.unit_cost(kind, layers[u.index])
             for u in units for kind in (ATTENTION, MLP)}
    factors = {key: 1.0 for key in scores_raw}
    if temperature > 0:
        if losses is None:
            losses = skip_losses(model, units, list(ids[:prior_samples].split(4)),
                                 progress=progress)
        factors = prior_factors(losses, temperature, tau)

    def select(raw):
        scores = {key: raw[key] / costs[key] * factors[key] for key in raw}
        return select_units(scores, costs, ratio, total, epsilon=epsilon, uniform=uniform)

    scores = {key: scores_raw[key] / costs[key] * factors[key] for key in scores_raw}
    plan = select(scores_raw)
    stability = None if importance == "magnitude" else \
        ranking_stability(model, units, importance, statistics, select, factors)
    if stability is not None:
        warn_if_unsettled(stability, statistics.samples)

    rows, per_layer = [], []
    for u in units:
        entry = {"layer": u.index, "collapsed": u.index in plan.collapsed}
        for kind in (ATTENTION, MLP):
            key = (u.index, kind)
            removed = set(plan.removed.get(key, []))
            for i in range(u.count(kind)):
                rows.append({"layer": u.index, "type": kind, "index": i,
                             "importance": float(scores_raw[key][i]), "cost": costs[key],
                             "prior": factors[key], "score": float(scores[key][i]),
                             "kept": i not in removed})
            entry[f"{kind}_units"] = u.count(kind)
            entry[f"{kind}_kept"] = u.count(kind) - len(removed)
            entry[f"{kind}_params"] = u.count(kind) * costs[key]
            entry[f"{kind}_kept_params"] = (u.count(kind) - len(removed)) * costs[key]
        per_layer.append(entry)

    sizes = apply_plan(model, units, plan)
    stock = record_sizes(model, sizes, units[0].head_dim, units[0].channels)
    after = _model_params(model)
    summary = {"ratio": ratio, "importance": importance, "temperature": temperature, "tau": tau,
               "epsilon": epsilon, "uniform": uniform,
               "nsamples": None if ids is None else int(ids.shape[0]),
               "seqlen": None if ids is None else int(ids.shape[1]),
               "params_before": total, "params_after": after,
               "removed_fraction": 1 - after / total, "planned_fraction": plan.fraction,
               "collapsed_layers": plan.collapsed, "stock_loadable": stock,
               "ranking_stability": stability,
               "seconds": round(time.perf_counter() - t0, 1)}
    return StructuredResult(plan, rows, per_layer, summary, losses, sizes)


def save_structured(folder: str | os.PathLike, model: nn.Module, tokenizer,
                    result: StructuredResult, report: dict | None = None, *,
                    overwrite: bool = False) -> list[str]:
    """Write the smaller model (safetensors, its config with the per-layer sizes), its
    tokenizer (when not None), the outputs of :func:`write_structured_outputs` and
    ``report.json`` (``report``, default the summary) into ``folder``, atomically (see
    :func:`sparse_kernels.atomic.write_into_folder`)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_structured_outputs(tmp, result)
        (tmp / "report.json").write_text(json.dumps(report or result.summary, indent=1))

    return write_into_folder(folder, write, overwrite=overwrite)


def write_structured_outputs(folder: str | os.PathLike, result: StructuredResult) -> None:
    """``units.csv`` (one row per unit), ``structured.json`` (settings, totals, per layer, the
    skip losses) and ``kept.png`` (kept fraction per layer, attention and MLP; skipped with a
    warning without matplotlib) into ``folder``."""
    folder = Path(folder)
    with open(folder / "units.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.units[0]))
        writer.writeheader()
        writer.writerows(result.units)
    (folder / "structured.json").write_text(json.dumps(
        {"summary": result.summary, "layers": result.layers, "sizes": result.sizes,
         "skip_losses": result.skip_losses}, indent=1))
    plot_kept(result.layers, folder / "kept.png", title=(
        f"{result.summary['importance']}, ratio {result.summary['ratio']}, temperature "
        f"{result.summary['temperature']}"))


def plot_kept(layers: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """Kept fraction of each layer's attention groups and MLP channels, as bars. An optional
    output: without matplotlib it is skipped with one warning naming the package (False), so a
    save never fails for want of a plot."""
    try:  # optional: the plot is skipped without it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {Path(path).name} was not drawn "
                      f"(pip install matplotlib); everything else was written", stacklevel=2)
        return False

    x = [entry["layer"] for entry in layers]
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.3), 3.5))
    for offset, kind in ((-0.2, ATTENTION), (0.2, MLP)):
        kept = [0 if e["collapsed"] else e[f"{kind}_kept"] / e[f"{kind}_units"] for e in layers]
        ax.bar([i + offset for i in x], kept, width=0.4, label=f"{kind} kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
