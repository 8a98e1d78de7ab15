"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the layer Hessian ``H = (2/N) X^T X``.

The algorithm, in fp32 on the weight's device:

1. ``H`` is copied from ``stats.hessian``; a dead input (``H_jj == 0``) gets ``H_jj = 1`` and its
   weight column is zeroed; damping ``percdamp * mean(diag(H))`` is added to the diagonal.
2. ``U`` = upper Cholesky factor of ``H^-1`` (Cholesky of H, inverse, Cholesky again).
3. Columns are swept left to right in blocks of ``blocksize`` (128): each pruned weight's error
   ``(w - q) / U_jj`` is propagated to the later columns of its row through row ``j`` of ``U``
   (inside the block one column at a time, to later blocks once per block).

Masks: unstructured chooses per ``blocksize``-column block, when the sweep reaches it, the
``int(rows * cols * sparsity)`` lowest of ``W^2 / diag(U)^2`` (one threshold over the block's
entries, exact count: upstream prunes everything ``<=`` that value, one more and any ties);
N:M chooses per group of ``m`` columns, when the sweep reaches it, the ``n`` best of each row by
the same saliency (``sparse_kernels.nm_mask``; the block size is rounded down to a multiple of
``m``, at least ``m``, so groups stay aligned to the whole matrix). Tiered patterns place the
tiers up front (by the saliency's block means, or the tier map given) and choose the kept
weights inside the tiers during the sweep, as N:M does: each top-K block its ``K`` best when the
sweep reaches its first column, each 2:4 group of 4 columns its 2 best when the sweep reaches it
(the block size is rounded down to a multiple of ``B``). The pattern ``block`` (whole blocks
removed), ``within_block="magnitude"`` and any fixed mask (e.g. Wanda's in ``wanda_obs``) sweep
with the mask fixed up front.

Low-bit patterns quantize inside the same sweep (SparseGPT's joint mode; GPTQ when nothing is
pruned): when the sweep reaches the first column of a group of ``G`` input columns, each row's
scale of that group is set from the largest of its current (already updated) weights not yet
known to be pruned; every column is then pruned and its kept weights rounded to the grid in
one step, and the error of both is spread over the later columns. The sweep takes the groups in
act order (GPTQ's ``desc_act``, :func:`act_order`): the groups holding the inputs with the
largest ``H_jj`` first, while the most weights are left to absorb their error; whole groups
(whole ``lcm(G, m)`` runs for N:M), so every group, block and N:M group stays one run of
columns, and a ragged last group stays last. ``act_order=False`` sweeps left to right
(benchmarks/NOTES-frontier.md measures both).

Global torch settings (TF32 and the like) are left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import sparse_kernels as sk
from sparse_kernels.rules import (DEFAULT_BLOCK_SIZE, DEFAULT_TOPK, QMAX, SCALE_DTYPE, SPARSE_24,
                                  TOPK)

from ..patterns import Pattern, build_mask
from ..statistics.stats import LinearStats
from . import (LayerPruning, check_hessian, check_pattern, check_weight,
               weight_rows)

__all__ = ["SparseGPT", "act_order", "ordered_sweep", "prepare_obs", "obs_saliency", "obs_sweep",
           "obs_update"]


def prepare_obs(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01,
                nsamples: int | None = None):
    """``(W, U)``: the weight as a new fp32 tensor with dead input columns zeroed, and ``U``,
    the upper Cholesky factor of the damped ``H^-1``. ``hessian`` is not modified.

    Raises ``ValueError`` when ``H`` is not finite, and ``RuntimeError`` when it is not
    positive definite even after damping.
    """
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    w = weight.detach().to(dtype=torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    n = h.shape[0]
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"the [{n}x{n}] Hessian has NaN or inf entries; check the calibration "
                         f"inputs of this layer")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0
    damp = percdamp * float(diag.mean())
    diag.add_(damp)

    def fail(step: str):
        seen = "" if nsamples is None else f" from {nsamples} calibration samples"
        return RuntimeError(
            f"SparseGPT: the [{n}x{n}] Hessian{seen} is not positive definite even after "
            f"damping ({percdamp} * mean diagonal = {damp:.3g}; {step} failed). Calibrate with "
            f"more samples (or longer ones), or raise the damping (percdamp).")

    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise fail("Cholesky of H")
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        raise fail("Cholesky of H^-1")
    return w, u


def act_order(hessian: torch.Tensor, run: int) -> torch.Tensor:
    """int64 ``[in]``: the input columns in GPTQ's act order, in whole runs of ``run`` columns
    (a ragged last run stays last), the runs by their largest ``H_jj``, descending (stable)."""
    diag = hessian.diagonal().float()
    n = diag.numel()
    full = n - n % run
    order = torch.sort(diag[:full].reshape(-1, run).amax(1), descending=True, stable=True).indices
    columns = (order[:, None] * run + torch.arange(run, device=diag.device)).flatten()
    return torch.cat([columns, torch.arange(full, n, device=diag.device)])


def ordered_sweep(weight: torch.Tensor, hessian: torch.Tensor, order: torch.Tensor | None, *,
                  percdamp: float, nsamples: int | None, block_size: int = DEFAULT_BLOCK_SIZE,
                  mask: torch.Tensor | None = None, tier_map: torch.Tensor | None = None,
                  prepared: tuple[torch.Tensor, torch.Tensor] | None = None, **sweep):
    """:func:`obs_sweep` of ``weight`` with its columns taken in ``order`` (a permutation of the
    input columns in whole block columns, as :func:`act_order` gives; None: left to right): the
    problem (weight, Hessian, a fixed ``mask``, the ``tier_map``'s block columns) is permuted,
    swept, and the weight and mask put back. Returns what :func:`obs_sweep` does. ``prepared``:
    :func:`prepare_obs`'s ``(W, U)`` in column order, if the caller has them already."""
    if order is None:
        w, u = prepared or prepare_obs(weight, hessian, percdamp, nsamples)
        return obs_sweep(w, u, mask=mask, tier_map=tier_map, block_size=block_size, **sweep)
    order = order.to(weight.device)
    w, u = prepare_obs(weight[:, order], hessian[order][:, order], percdamp, nsamples)
    if mask is not None:
        mask = mask[:, order]
    if tier_map is not None:
        tier_map = tier_map[:, order[::block_size] // block_size]
    new, kept, scales = obs_sweep(w, u, mask=mask, tier_map=tier_map, block_size=block_size,
                                  **sweep)
    back = torch.argsort(order)
    if scales is not None:  # the sweep's group p is the weight's group order[p * G] // G
        g = sweep["group_size"]
        scales = scales[:, torch.argsort(order[::g] // g)]
    return new[:, back], kept[:, back], scales


def obs_saliency(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SparseGPT's importance ``W^2 / diag(U)^2`` (fp32, ``[out, in]``)."""
    return w.float().pow(2) / u.diagonal().pow(2).unsqueeze(0)


def obs_sweep(w: torch.Tensor, u: torch.Tensor, *, mask: torch.Tensor | None = None,
              sparsity: float = 0.0, nm: tuple[int, int] | None = None,
              tier_map: torch.Tensor | None = None, topk: int = DEFAULT_TOPK,
              block_size: int = DEFAULT_BLOCK_SIZE,
              row_weight: torch.Tensor | None = None, blocksize: int = 128, bits: int = 16,
              group_size: int = 128):
    """The OBS sweep: returns ``(new weight fp32, kept mask, scales)``; ``w`` is not modified.

    w: fp32 ``[out, in]`` (from :func:`prepare_obs`); u: the upper Cholesky factor of ``H^-1``.
    Exactly one way of choosing the mask: ``mask`` (bool, True = kept) fixed up front; or
    ``nm=(n, m)``, chosen per group of ``m`` columns during the sweep; or ``tier_map`` (int8
    ``[ceil(out/B), ceil(in/B)]``), whose top-K blocks keep their ``topk`` best when the sweep
    reaches their first column and whose 2:4 groups their 2 best when it reaches them (top-K
    ranks by the saliency times ``row_weight [out]`` when given); or else unstructured
    ``sparsity``, chosen per block of ``blocksize`` columns during the sweep.
    Weights outside the mask come back exactly zero, and so do weights that were zero already
    (never revived by the update, so a progressive prune only ever removes). ``bits`` 8 / 4:
    the kept weights come back on their grid, ``scales`` fp16 ``[out, ceil(in / group_size)]``
    (the module docstring); None for 16 bits.
    """
    if sum(x is not None for x in (mask, nm, tier_map)) > 1:
        raise ValueError("obs_sweep: give at most one of a fixed mask, nm or tier_map")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    w = w.detach().float().clone()
    rows, cols = w.shape
    # A weight that is exactly zero stays zero: pruned earlier (a progressive prune), its slot is
    # not the sweep's to fill, whatever the choice below would keep.
    zero = w == 0
    if mask is not None:
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {(rows, cols)}")
        pruned = ~mask.to(device=w.device, dtype=torch.bool)
    else:
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if nm is not None:
        n, m = nm
        blocksize = max(m, blocksize - blocksize % m)
    choose = None
    if tier_map is not None:
        blocksize = max(block_size, blocksize - blocksize % block_size)
        choose = _TierChoice(tier_map.to(w.device), rows, topk, block_size, row_weight)
    grid = _Grid(rows, cols, bits, group_size, w.device) if bits < 16 else None
    if grid is not None:  # a group lies inside one sweep block: its weights are all in w1
        blocksize = max(group_size, blocksize - blocksize % group_size)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        p1 = pruned[:, i1:i2].clone()
        if mask is None and nm is None and tier_map is None:
            k = int(w1.numel() * sparsity)
            if k:
                sal = obs_saliency(w1, u1).flatten()
                order = torch.sort(torch.nan_to_num(sal, nan=float("-inf")), stable=True).indices
                p1.view(-1)[order[:k]] = True
        for i in range(count):
            if nm is not None and i % m == 0:
                width = min(m, count - i)
                sal = w1[:, i:i + width].pow(2) / d1[i:i + width].pow(2).unsqueeze(0)
                p1[:, i:i + width] = ~sk.nm_mask(sal, n, m)
            if choose is not None and i % 4 == 0:
                choose(w1, d1, p1, i, i1 + i)
            p1[:, i] |= zero[:, i1 + i]
            col = w1[:, i]
            if grid is not None:
                if (i1 + i) % group_size == 0:
                    width = min(group_size, count - i)
                    grid.set_scales(w1[:, i:i + width], p1[:, i:i + width] |
                                    zero[:, i1 + i:i1 + i + width], i1 + i)
                col = grid.round(col, i1 + i)
            q = col.masked_fill(p1[:, i], 0)
            err = (w1[:, i] - q) / d1[i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)
            q1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = q1
        if i2 < cols:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        pruned[:, i1:i2] = p1
    return w, ~pruned, None if grid is None else grid.scales


class _Grid:
    """The quantization grid as the sweep builds it: a group's scales, set at its first column
    from the largest of its weights not known to be pruned (``sparse_kernels.quant``'s
    symmetric codes), and each column rounded to them."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, device):
        self.qmax, self.g = QMAX[bits], group_size
        self.scales = torch.zeros(rows, -(-cols // group_size), dtype=SCALE_DTYPE, device=device)

    def set_scales(self, weights: torch.Tensor, pruned: torch.Tensor, col: int) -> None:
        amax = weights.masked_fill(pruned, 0).abs().amax(1)
        self.scales[:, col // self.g] = (amax / self.qmax).to(SCALE_DTYPE)

    def round(self, column: torch.Tensor, col: int) -> torch.Tensor:
        s = self.scales[:, col // self.g].float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = (column / safe).round().clamp(-self.qmax, self.qmax)
        return torch.where(s > 0, codes * s, torch.zeros_like(column))


class _TierChoice:
    """Chooses the kept weights inside the tiers as the sweep reaches them: at the first column
    of a block column the top-K blocks keep their K best, at the first column of each group of 4
    the 2:4 rows their 2 best, by the saliency of the weights as the sweep has updated them so
    far (top-K times ``row_weight [out]`` when given). Block columns never straddle two sweep
    blocks (the sweep block is a multiple of B)."""

    def __init__(self, tier_map: torch.Tensor, rows: int, topk: int, block_size: int,
                 row_weight: torch.Tensor | None):
        self.topk, self.b = topk, block_size
        per_row = tier_map.repeat_interleave(block_size, 0)[:rows]  # [rows, nbc]
        self.rows_24 = [(per_row[:, c] == SPARSE_24).nonzero().flatten()
                        for c in range(tier_map.shape[1])]
        self.rows_topk = [(per_row[:, c] == TOPK).nonzero().flatten()
                          for c in range(tier_map.shape[1])]
        self.row_weight = None if row_weight is None else \
            row_weight.to(device=tier_map.device, dtype=torch.float32).unsqueeze(1)

    def __call__(self, w1, d1, p1, i: int, col: int) -> None:
        """At column ``col`` of the matrix, ``i`` of the sweep block (a multiple of 4)."""
        c = col // self.b
        if col % self.b == 0:
            rows = self.rows_topk[c]
            if len(rows):
                width = min(self.b, w1.shape[1] - i)
                sal = w1[rows, i:i + width].pow(2) / d1[i:i + width].pow(2).unsqueeze(0)
                if self.row_weight is not None:
                    sal = sal * self.row_weight[rows]
                # Whole block-rows in order (a ragged one last), so blocks stay aligned.
                p1[rows, i:i + width] = ~sk.block_topk_mask(sal, self.topk, self.b)
        rows = self.rows_24[c]
        if len(rows):
            width = min(4, w1.shape[1] - i)
            sal = w1[rows, i:i + width].pow(2) / d1[i:i + width].pow(2).unsqueeze(0)
            p1[rows, i:i + width] = ~sk.nm_mask(sal, 2, 4)


def obs_update(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
               blocksize: int = 128, percdamp: float = 0.01, nsamples: int | None = None,
               bits: int = 16, group_size: int = 128, ordered: bool = True):
    """``(weight, kept mask, scales)``: ``weight`` pruned to the fixed ``mask`` (True = kept)
    with SparseGPT's OBS update (and with ``bits`` 8 / 4 quantized in the same sweep, in act
    order unless ``ordered=False``), in the weight's dtype (a new tensor); the kept mask is ``mask`` less any weight that was zero
    already (see :func:`obs_sweep`)."""
    order = act_order(hessian, group_size) if bits < 16 and ordered else None
    new, kept, scales = ordered_sweep(weight, hessian, order, percdamp=percdamp,
                                      nsamples=nsamples, mask=mask, blocksize=blocksize,
                                      bits=bits, group_size=group_size)
    return new.to(weight.dtype), kept, scales


PROXIES = ("error", "obs")


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT; ``blocksize`` columns per sweep block, damping ``percdamp * mean(diag H)``;
    ``proxy``: what a byte-budget allocation counts (see :meth:`loss_proxy`); ``act_order``:
    low-bit sweeps take the groups in act order (the module docstring)."""

    blocksize: int = 128
    percdamp: float = 0.01
    proxy: str = "error"
    act_order: bool = True
    name: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True
    needs_activations: ClassVar[bool] = False

    def _prepare(self, weight: torch.Tensor, stats: LinearStats):
        weight = check_weight(weight)
        hessian = check_hessian(self.name, weight, stats)
        return weight, *prepare_obs(weight, hessian, self.percdamp, stats.nsamples)

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """``W^2 / diag(U)^2`` (dead columns score 0) in fp32 ``[out, in]`` (times the row's
        sensitivity)."""
        _, w, u = self._prepare(weight, stats)
        return weight_rows(obs_saliency(w, u), stats, 1)

    def loss_proxy(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """What dropping each weight costs, for the byte-budget allocation (times the row's
        sensitivity). ``proxy="error"`` (default): ``W^2 * H_jj / 2``, the output error of
        dropping the weight with no update (Wanda's proxy, from the Hessian's diagonal).
        ``"obs"``: the saliency (``scores``), the error left after the update of the other
        weights - true for one weight at a time, but a top-K block drops most of a row's weights
        in that block at once, the update has little left to shift the error to, and the
        saliency underestimates such blocks (benchmarks/NOTES-frontier.md measures both)."""
        if self.proxy not in PROXIES:
            raise ValueError(f"SparseGPT proxy must be one of {', '.join(PROXIES)}, got "
                             f"{self.proxy!r}")
        if self.proxy == "obs":
            return self.scores(weight, stats)
        weight = check_weight(weight)
        hessian = check_hessian(self.name, weight, stats)
        error = weight.float().pow(2) * (hessian.diagonal() / 2).clamp_min(0).unsqueeze(0)
        return weight_rows(error, stats, 1)

    def prune(self, weight: torch.Tensor, stats: LinearStats, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning:
        pattern = check_pattern(pattern, tier_map)
        if pattern.use_variant:
            raise ValueError("use_variant is Wanda's cumulative-score variant; SparseGPT does "
                             "not support it (use method 'wanda' or 'wanda_obs')")
        weight = check_weight(weight)
        hessian = check_hessian(self.name, weight, stats)
        group_size = pattern.group_for(weight.shape[1])
        order = None
        if pattern.bits < 16 and self.act_order:
            order = act_order(hessian, group_size if pattern.kind != "nm" else
                              math.lcm(group_size, pattern.m))
        sweep = dict(percdamp=self.percdamp, nsamples=stats.nsamples, blocksize=self.blocksize,
                     bits=pattern.bits, group_size=group_size, block_size=pattern.block_size)
        tiers = None
        if pattern.kind in ("unstructured", "dense"):
            sparsity = pattern.sparsity if pattern.kind == "unstructured" else 0.0
            new, mask, scales = ordered_sweep(weight, hessian, order, sparsity=sparsity, **sweep)
        elif pattern.kind == "nm":
            new, mask, scales = ordered_sweep(weight, hessian, order, nm=(pattern.n, pattern.m),
                                              **sweep)
        else:
            _, w, u = self._prepare(weight, stats)  # the tiers by the saliency in column order
            fixed, tiers = build_mask(weight_rows(obs_saliency(w, u), stats, 1), pattern,
                                      weight=w, tier_map=tier_map)
            if pattern.kind == "block" or pattern.within_block == "magnitude":
                new, mask, scales = ordered_sweep(weight, hessian, order, mask=fixed,
                                                  prepared=(w, u), **sweep)
            else:
                new, mask, scales = ordered_sweep(
                    weight, hessian, order, tier_map=tiers, topk=pattern.topk, prepared=(w, u),
                    row_weight=getattr(stats, "out_sensitivity", None), **sweep)
        return LayerPruning(mask, tiers, new.to(weight.dtype), scales)
