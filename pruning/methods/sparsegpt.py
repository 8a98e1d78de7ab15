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
``m``, at least ``m``, so groups stay aligned to the whole matrix). Tiered patterns (and any
fixed mask, e.g. Wanda's in ``wanda_obs``) take the saliency once up front, build the mask, and
sweep with it fixed.

Global torch settings (TF32 and the like) are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import sparse_kernels as sk

from ..patterns import Pattern, build_mask
from ..stats import LinearStats
from . import LayerPruning, check_hessian, check_pattern, check_weight

__all__ = ["SparseGPT", "prepare_obs", "obs_saliency", "obs_sweep", "obs_update"]


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


def obs_saliency(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SparseGPT's importance ``W^2 / diag(U)^2`` (fp32, ``[out, in]``)."""
    return w.float().pow(2) / u.diagonal().pow(2).unsqueeze(0)


def obs_sweep(w: torch.Tensor, u: torch.Tensor, *, mask: torch.Tensor | None = None,
              sparsity: float = 0.0, nm: tuple[int, int] | None = None, blocksize: int = 128):
    """The OBS sweep: returns ``(new weight fp32, kept mask)``; ``w`` is not modified.

    w: fp32 ``[out, in]`` (from :func:`prepare_obs`); u: the upper Cholesky factor of ``H^-1``.
    Exactly one way of choosing the mask: ``mask`` (bool, True = kept) fixed up front; or
    ``nm=(n, m)``, chosen per group of ``m`` columns during the sweep; or else unstructured
    ``sparsity``, chosen per block of ``blocksize`` columns during the sweep.
    Weights outside the mask come back exactly zero.
    """
    if mask is not None and nm is not None:
        raise ValueError("obs_sweep: give either a fixed mask or nm, not both")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    w = w.detach().float().clone()
    rows, cols = w.shape
    if mask is not None:
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {(rows, cols)}")
        pruned = ~mask.to(device=w.device, dtype=torch.bool)
    else:
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if nm is not None:
        n, m = nm
        blocksize = max(m, blocksize - blocksize % m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        p1 = pruned[:, i1:i2].clone()
        if mask is None and nm is None:
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
            col = w1[:, i]
            q = col.masked_fill(p1[:, i], 0)
            err = (col - q) / d1[i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)
            q1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = q1
        if i2 < cols:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        pruned[:, i1:i2] = p1
    return w, ~pruned


def obs_update(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
               blocksize: int = 128, percdamp: float = 0.01, nsamples: int | None = None
               ) -> torch.Tensor:
    """``weight`` pruned to the fixed ``mask`` (True = kept) with SparseGPT's OBS update, in
    the weight's dtype (a new tensor)."""
    w, u = prepare_obs(weight, hessian, percdamp, nsamples)
    new, _ = obs_sweep(w, u, mask=mask, blocksize=blocksize)
    return new.to(weight.dtype)


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT; ``blocksize`` columns per sweep block, damping ``percdamp * mean(diag H)``."""

    blocksize: int = 128
    percdamp: float = 0.01
    name: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True
    needs_activations: ClassVar[bool] = False

    def _prepare(self, weight: torch.Tensor, stats: LinearStats):
        weight = check_weight(weight)
        hessian = check_hessian(self.name, weight, stats)
        return weight, *prepare_obs(weight, hessian, self.percdamp, stats.nsamples)

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """``W^2 / diag(U)^2`` (dead columns score 0) in fp32 ``[out, in]``."""
        _, w, u = self._prepare(weight, stats)
        return obs_saliency(w, u)

    def prune(self, weight: torch.Tensor, stats: LinearStats, pattern: Pattern | str,
              tier_map: torch.Tensor | None = None) -> LayerPruning:
        pattern = check_pattern(pattern, tier_map)
        if pattern.use_variant:
            raise ValueError("use_variant is Wanda's cumulative-score variant; SparseGPT does "
                             "not support it (use method 'wanda' or 'wanda_obs')")
        weight, w, u = self._prepare(weight, stats)
        tiers = None
        if pattern.kind == "unstructured":
            new, mask = obs_sweep(w, u, sparsity=pattern.sparsity, blocksize=self.blocksize)
        elif pattern.kind == "nm":
            new, mask = obs_sweep(w, u, nm=(pattern.n, pattern.m), blocksize=self.blocksize)
        else:
            fixed, tiers = build_mask(obs_saliency(w, u), pattern, weight=w, tier_map=tier_map)
            new, mask = obs_sweep(w, u, mask=fixed, blocksize=self.blocksize)
        return LayerPruning(mask, tiers, new.to(weight.dtype))
