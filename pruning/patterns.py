"""Sparsity patterns, and the masks and tier maps they imply for a matrix of importance scores.

A :class:`Pattern` says *what shape* of sparsity to produce; a pruning method (``methods/``)
says *which weights matter* (its scores). The builders here are pure functions of the scores:
higher score = more important = kept. Masks are bool ``[out, in]``, ``True`` = kept.

Tie rules (everywhere here, and matching the ``sparse_kernels`` selection ops):

* unstructured: scores are sorted ascending with a stable sort and the first ``k`` are pruned,
  so among equal scores the lower index (column in a row, or flat row-major index in a matrix)
  is pruned first (Wanda's and magnitude's behaviour, but with exactly ``k`` pruned: the
  upstream magnitude code prunes everything ``<=`` the k-th value, i.e. ``k + 1`` or more).
* N:M, 2:4 and top-K inside blocks: the ``sparse_kernels`` ops, where among equal scores the
  lower index is kept.
* blocks: ranked highest first with a stable sort, so among equal block scores the lower flat
  block index ranks higher (as ``sparse_kernels.tiers.assign_tiers``).

Tier maps use the codes of ``sparse_kernels``: ``DENSE = 0``, ``SPARSE_24 = 1``, ``TOPK = 2``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import sparse_kernels as sk
from sparse_kernels.format import check_tier_map
from sparse_kernels.rules import (DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE, DEFAULT_TOPK, DENSE,
                                  RESEARCH_MIX, SPARSE_24, TOPK, check_bits, check_block_size,
                                  check_topk, group_size_for)
from sparse_kernels.tiers import assign_tiers, check_ratios, per_entry_tiers, tier_mask

__all__ = [
    "Pattern", "parse_pattern", "PATTERN_KINDS", "TIERED_KINDS", "WITHIN_BLOCK",
    "unstructured_row_mask", "unstructured_matrix_mask", "wanda_variant_mask",
    "block_scores", "kept_block_scores", "rank_blocks", "rank_blocks_jointly", "demote_tiers",
    "tiered_mask", "build_mask",
]

PATTERN_KINDS = ("unstructured", "nm", "block", "block_topk", "three_tier", "dense")
TIERED_KINDS = ("block", "block_topk", "three_tier")
WITHIN_BLOCK = ("score", "magnitude")

_NM = re.compile(r"^(\d+):(\d+)$")
_PATTERN_HELP = ("unstructured, N:M (e.g. 2:4 or 4:8, with 1 <= N < M), block, block_topk, "
                 "three_tier or dense (nothing pruned: quantization alone)")


@dataclass(frozen=True)
class Pattern:
    """The shape of sparsity to produce for one weight matrix. How blocks of several matrices
    share tiers or a byte budget is a model-level choice: :class:`pruning.planning.TierPolicy`.

    kind:
        ``"unstructured"``: any ``sparsity`` fraction of the weights (per output row for Wanda,
        per matrix for magnitude, per 128-column block for SparseGPT).
        ``"nm"``: keep ``n`` of every ``m`` consecutive input columns of each row.
        ``"block"``: whole ``block_size`` x ``block_size`` blocks; the lowest-scoring
        ``int(n_blocks * sparsity)`` blocks are zeroed, the others stay dense.
        ``"block_topk"``: as ``block``, but the cut blocks keep their ``topk`` best weights.
        ``"three_tier"``: each block goes dense, 2:4 or top-K, ranked by score into fixed
        ``tier_ratios`` (or given a tier map a planner chose, e.g. under a byte budget).
        ``"dense"``: nothing pruned (with ``bits`` 8 / 4: quantization alone, GPTQ with the OBS
        methods); packs as every block dense.
    sparsity: unstructured: fraction of weights pruned; block: fraction of blocks zeroed;
        block_topk: fraction of blocks cut to their top-K. Unused by nm and three_tier.
    n, m: the N:M pattern (2:4 keeps 2 of every 4).
    tier_ratios: (dense, 2:4, top-K) fractions of blocks for three_tier, summing to 1.
    topk: K, the weights a top-K block keeps (three_tier, block_topk), 1..block_size^2.
    block_size: B, in ``sparse_kernels.rules.BLOCK_SIZES``.
    within_block: what picks the kept weights inside 2:4 and top-K blocks: the method's
        ``"score"`` (default) or ``"magnitude"`` (|W|, the research code's behaviour).
    per_row: rank the blocks into tiers within each block-row, so every group of B output
        features gets the ratios (as Wanda compares weights within each output row); default:
        over the whole matrix, as the research code does.
    use_variant: Wanda's per-row cumulative-score variant (unstructured only).
    bits: the kept values' precision (``sparse_kernels.rules.BITS``): 16 keeps them as they
        are; 8 / 4 puts them on symmetric integer grids with one scale per output row per
        group of input columns (the OBS methods quantize inside their sweep, the others round
        to nearest after the mask).
    group_size: the preferred group G (a multiple of B); each matrix uses
        ``rules.group_size_for(in_features, group_size)``.

    Tier maps of ``block`` and ``block_topk``: kept blocks are ``DENSE`` (0), removed / cut
    blocks are ``TOPK`` (2). For ``block_topk`` the cut blocks really keep their top-K. For
    ``block`` a removed block is all zero, which a top-K block with no non-zeros represents
    exactly (``HybridWeight.from_dense`` accepts top-K blocks with fewer than K non-zeros), so
    the same map packs and runs with the hybrid kernels.

    Constructing a Pattern validates it (``ValueError`` naming the bad value and what is
    allowed); :func:`parse_pattern` builds one from a string such as ``"2:4"``.
    """

    kind: str
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    tier_ratios: tuple[float, float, float] = RESEARCH_MIX
    topk: int = DEFAULT_TOPK
    block_size: int = DEFAULT_BLOCK_SIZE
    within_block: str = "score"
    per_row: bool = False
    use_variant: bool = False
    bits: int = 16
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"unknown pattern kind {self.kind!r}; choose one of "
                             f"{', '.join(PATTERN_KINDS)}")
        try:
            sparsity = float(self.sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") \
                from None
        if not 0.0 <= sparsity < 1.0:  # also rejects NaN
            raise ValueError(f"sparsity must be in [0, 1) (the fraction pruned), got "
                             f"{self.sparsity!r}")
        object.__setattr__(self, "sparsity", sparsity)
        if self.kind == "nm":
            if not (_is_int(self.n) and _is_int(self.m) and 1 <= self.n < self.m):
                raise ValueError(f"N:M pattern {self.n}:{self.m} needs integers 1 <= N < M")
        object.__setattr__(self, "tier_ratios", check_ratios(self.tier_ratios))
        check_block_size(self.block_size)
        check_topk(self.topk, self.block_size)
        check_bits(self.bits)
        if not (_is_int(self.group_size) and self.group_size >= self.block_size
                and self.group_size % self.block_size == 0):
            raise ValueError(f"group_size must be a positive multiple of the block size "
                             f"{self.block_size}, got {self.group_size!r}")
        if self.within_block not in WITHIN_BLOCK:
            raise ValueError(f"within_block must be one of {', '.join(WITHIN_BLOCK)}, got "
                             f"{self.within_block!r}")
        for flag in ("use_variant", "per_row"):
            if getattr(self, flag) not in (True, False):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.use_variant and self.kind != "unstructured":
            raise ValueError(f"use_variant (Wanda's cumulative-score variant) applies to the "
                             f"unstructured pattern only, got pattern {self.name!r}")
        if self.per_row and not self.uses_tiers:
            raise ValueError(f"ranking='row' ranks blocks into tiers and applies to "
                             f"{', '.join(TIERED_KINDS)} only, got pattern {self.name!r}")
        if self.kind in ("unstructured", "nm") and self.within_block != "score":
            raise ValueError(f"within_block={self.within_block!r} picks weights inside 2:4 / "
                             f"top-K blocks and applies to block_topk and three_tier only, got "
                             f"pattern {self.name!r}")

    @property
    def uses_tiers(self) -> bool:
        """Whether this pattern produces a tier map (block, block_topk, three_tier)."""
        return self.kind in TIERED_KINDS

    @property
    def name(self) -> str:
        """Short name: ``unstructured``, ``2:4``, ``block``, ``block_topk``, ``three_tier``."""
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def nominal_sparsity(self) -> float:
        """Fraction of weights pruned for a matrix made of whole blocks (before rounding)."""
        bb = self.block_size * self.block_size
        if self.kind == "nm":
            return 1.0 - self.n / self.m
        if self.kind == "three_tier":
            return 0.5 * self.tier_ratios[1] + (1.0 - self.topk / bb) * self.tier_ratios[2]
        if self.kind == "block_topk":
            return (1.0 - self.topk / bb) * self.sparsity
        return 0.0 if self.kind == "dense" else self.sparsity

    def group_for(self, in_features: int) -> int:
        """The quantization group of a matrix with ``in_features`` columns."""
        return group_size_for(in_features, self.group_size, self.block_size)

    def describe(self, ranking: str | None = None) -> str:
        """A one-line human-readable summary, for logs and reports; ``ranking``: where a
        planner ranked the blocks (``"layer"``, ``"model"``) when not in this matrix."""
        bits = "" if self.bits == 16 else f", int{self.bits} g{self.group_size}"
        return self._describe_shape(ranking) + bits

    def _describe_shape(self, ranking: str | None) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "unstructured":
            return f"unstructured {self.sparsity:g}" + (" (variant)" if self.use_variant else "")
        if self.kind == "nm":
            return self.name
        b = f"B={self.block_size}"
        within = "" if self.within_block == "score" else ", within=magnitude"
        ranking = "row" if self.per_row else ranking
        rank = "" if ranking in (None, "matrix") else f", ranking={ranking}"
        if self.kind == "block":
            return f"block {self.sparsity:g} ({b}{rank})"
        if self.kind == "block_topk":
            return f"block_topk {self.sparsity:g} (K={self.topk}, {b}{within}{rank})"
        r = "/".join(f"{x:g}" for x in self.tier_ratios)
        return f"three_tier {r} (K={self.topk}, {b}{within}{rank})"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_pattern(pattern: str | Pattern, *, sparsity: float = 0.5,
                  tier_ratios=RESEARCH_MIX, topk: int = DEFAULT_TOPK,
                  block_size: int = DEFAULT_BLOCK_SIZE, within_block: str = "score",
                  per_row: bool = False, use_variant: bool = False, bits: int = 16,
                  group_size: int = DEFAULT_GROUP_SIZE) -> Pattern:
    """Pattern from a name: ``"unstructured"``, ``"N:M"`` (``"2:4"``, ``"4:8"``, any
    ``1 <= N < M``), ``"block"``, ``"block_topk"``, ``"three_tier"`` (or ``"three-tier"``),
    ``"dense"``.

    Names are case-insensitive and ``-`` reads as ``_``. A :class:`Pattern` passes through
    unchanged. Every bad argument raises ``ValueError`` naming it and what is allowed.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string ({_PATTERN_HELP}), got {pattern!r}")
    key = pattern.strip().lower().replace("-", "_").replace(" ", "")
    common = dict(sparsity=sparsity, tier_ratios=tier_ratios, topk=topk, block_size=block_size,
                  within_block=within_block, per_row=per_row, use_variant=use_variant,
                  bits=bits, group_size=group_size)
    nm = _NM.match(key)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n < m:
            raise ValueError(f"N:M pattern {pattern!r} needs 1 <= N < M (N kept of every M "
                             f"input columns, e.g. 2:4 or 4:8)")
        return Pattern("nm", n=n, m=m, **common)
    if key in ("unstructured", "block", "block_topk", "three_tier", "dense"):
        return Pattern(key, **common)
    raise ValueError(f"unknown pattern {pattern!r}; choose {_PATTERN_HELP}")


# ---------------------------------------------------------------------------------------------
# Mask builders
# ---------------------------------------------------------------------------------------------

def _sort_key(scores: torch.Tensor) -> torch.Tensor:
    """fp32 scores with NaN as -inf (pruned first), as the selection ops treat them."""
    return torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))


def unstructured_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's rule: per output row prune the ``int(in * sparsity)`` lowest scores.

    Stable ascending sort, first ``k`` pruned, so every row has exactly ``k`` pruned and among
    equal scores the lower column is pruned first.
    """
    out_f, in_f = scores.shape
    k = int(in_f * sparsity)
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    order = torch.sort(_sort_key(scores), dim=1, stable=True).indices[:, :k]
    return mask.scatter_(1, order, False)


def unstructured_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude's rule: one threshold over the whole matrix, exactly ``int(numel * sparsity)``
    lowest scores pruned (stable: among ties the lower row-major index is pruned first)."""
    k = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(_sort_key(scores).flatten(), stable=True).indices[:k]] = False
    return mask.reshape(scores.shape)


def wanda_variant_mask(scores: torch.Tensor, sparsity: float, tol: float = 1e-3,
                       max_rounds: int = 50) -> torch.Tensor:
    """Wanda's ``use_variant``: per row, sort the scores ascending and prune the prefix whose
    cumulative sum is ``<= alpha * row sum``; ``alpha`` is found by bisection, starting at 0.4
    in [0, 0.8], until the overall sparsity is within ``tol`` of ``sparsity`` (or after
    ``max_rounds`` evaluations).

    Differences from the upstream code, on purpose: the pruned entries are the sorted prefix
    itself (upstream re-thresholds by value, which prunes a whole row when its prefix is empty
    and spills over ties), and if the tolerance is never met the closest mask seen is returned.
    """
    out_f, in_f = scores.shape
    if sparsity == 0 or scores.numel() == 0:
        return torch.ones(out_f, in_f, dtype=torch.bool, device=scores.device)
    key = _sort_key(scores).clamp_min(0).nan_to_num(posinf=torch.finfo(torch.float32).max)
    sorted_vals, order = torch.sort(key, dim=1, stable=True)
    cumsum = torch.cumsum(sorted_vals, dim=1)
    row_sum = key.sum(dim=1, keepdim=True)
    position = torch.arange(in_f, device=scores.device)

    def mask_for(alpha: float):
        # Length of the prefix with cumsum <= alpha * row sum (cumsum is non-decreasing).
        count = (cumsum <= alpha * row_sum).sum(dim=1, keepdim=True)
        pruned_sorted = position < count
        mask = torch.ones_like(pruned_sorted).scatter_(1, order, ~pruned_sorted)
        return mask, float(pruned_sorted.sum()) / scores.numel()

    alpha, low, high = 0.4, 0.0, 0.8
    best, best_gap = None, float("inf")
    for _ in range(max_rounds):
        mask, actual = mask_for(alpha)
        gap = abs(actual - sparsity)
        if gap < best_gap:
            best, best_gap = mask, gap
        if gap <= tol:
            break
        if actual > sparsity:
            high, alpha = alpha, (alpha + low) / 2
        else:
            low, alpha = alpha, (alpha + high) / 2
    return best


def block_scores(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``|scores|`` over each ``block_size`` block, fp32 ``[ceil(out/B), ceil(in/B)]``
    (a ragged edge block is averaged over its real entries)."""
    ones = torch.ones(scores.shape[1], dtype=torch.float32, device=scores.device)
    return sk.wanda_scores(scores.float(), ones, block_size)[1]


def kept_block_scores(scores: torch.Tensor, weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``|scores|`` over each block's non-zero weights (0 for an all-zero block): how a
    block that is already sparse scores by what it still holds."""
    nonzero = (weight != 0).float()
    total = block_scores(scores.float().abs() * nonzero, block_size)
    share = block_scores(nonzero, block_size)  # the fraction of the block that is non-zero
    return torch.where(share > 0, total / share.clamp_min(1e-30), torch.zeros_like(total))


def demote_tiers(previous: torch.Tensor, scores: torch.Tensor, kept_scores: torch.Tensor,
                 ratios) -> torch.Tensor:
    """One step of progressive three-tier pruning (the research code's rule): tiers only ever
    go down. ``previous``: the last tier map; ``scores`` / ``kept_scores``: each block's mean
    score over all its weights / over its non-zero ones (same shape).

    First the lowest-scoring dense blocks become 2:4 until ``int(n * dense target)`` are left
    (the count :func:`sparse_kernels.assign_tiers` keeps); then the 2:4 blocks with the lowest
    ``kept_scores`` become top-K until ``int(n * 2:4 target)`` are left. Targets at or above
    what is there now demote nothing.
    """
    r_dense, r_24, _ = check_ratios(ratios)
    tiers = previous.to(torch.int8).flatten().clone()
    n = tiers.numel()
    for code, target, rank_by in ((DENSE, r_dense, scores), (SPARSE_24, r_24, kept_scores)):
        members = (tiers == code).nonzero().flatten()
        excess = len(members) - int(n * target)
        if excess <= 0:
            continue
        key = _sort_key(rank_by.flatten()[members])
        lowest = members[torch.sort(key, stable=True).indices[:excess]]
        tiers[lowest] = code + 1
    return tiers.reshape(previous.shape)


def rank_blocks(blocks: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Tier map (int8, shape of ``blocks``) from block scores, by the pattern.

    three_tier: ``assign_tiers(blocks, pattern.tier_ratios)``. block / block_topk: the lowest
    ``int(n_blocks * sparsity)`` blocks become ``TOPK`` (removed / cut), the rest ``DENSE``;
    ranked highest first with a stable sort (ties: the lower flat index ranks higher).
    """
    if not pattern.uses_tiers:
        raise ValueError(f"pattern {pattern.name!r} has no tier map; rank_blocks applies to "
                         f"{', '.join(TIERED_KINDS)}")
    if pattern.per_row and blocks.dim() == 2:
        return torch.stack([_rank_one_group(row, pattern) for row in blocks])
    return _rank_one_group(blocks, pattern)


def _rank_one_group(blocks: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Tier map of blocks that all compete with each other (any shape)."""
    if pattern.kind == "three_tier":
        return assign_tiers(blocks, pattern.tier_ratios)
    n = blocks.numel()
    n_cut = int(n * pattern.sparsity)
    order = torch.sort(_sort_key(blocks).flatten(), descending=True, stable=True).indices
    tiers = torch.full((n,), DENSE, dtype=torch.int8, device=blocks.device)
    tiers[order[n - n_cut:]] = TOPK
    return tiers.reshape(blocks.shape)


def rank_blocks_jointly(blocks: list[torch.Tensor], pattern: Pattern) -> list[torch.Tensor]:
    """Rank the blocks of several matrices together (``TierPolicy.ranking`` layer / model).

    ``blocks`` are block-score maps (see :func:`block_scores`), one per matrix; returns their
    tier maps, in order, with the pattern's ratios met over all blocks together. The scores must
    be comparable across matrices; that is the caller's choice of scores.
    """
    if not blocks:
        return []
    flat = torch.cat([b.float().flatten().to(blocks[0].device) for b in blocks])
    tiers = rank_blocks(flat, pattern)
    return [t.reshape(b.shape).to(b.device)
            for t, b in zip(torch.split(tiers, [b.numel() for b in blocks]), blocks)]


def tiered_mask(scores: torch.Tensor, pattern: Pattern, tier_map: torch.Tensor | None = None,
                selection: torch.Tensor | None = None):
    """Mask and tier map of a tiered pattern (block, block_topk, three_tier).

    scores: ``[out, in]`` importance; its block means rank the blocks unless ``tier_map`` is
    given (then it is used as is, e.g. from a layer- or model-wide ranking).
    selection: what picks the kept weights inside 2:4 / top-K blocks (default ``scores``; pass
    ``|W|`` for ``within_block="magnitude"``).
    Returns ``(mask bool [out, in], tier_map int8)`` on the device of ``scores``.
    """
    out_f, in_f = scores.shape
    b = pattern.block_size
    if tier_map is None:
        tier_map = rank_blocks(block_scores(scores, b), pattern)
    else:
        tier_map = check_tier_map(tier_map, out_f, in_f, b).to(scores.device)
    if pattern.kind == "block":
        if bool((tier_map == SPARSE_24).any()):
            raise ValueError("pattern 'block' keeps blocks dense (0) or removes them (2); its "
                             "tier_map must not contain 2:4 blocks (1)")
        return per_entry_tiers(tier_map == DENSE, out_f, in_f, b).contiguous(), tier_map
    selection = scores if selection is None else selection
    return tier_mask(selection.float(), tier_map, pattern.topk, b), tier_map


def build_mask(scores: torch.Tensor, pattern: Pattern, *, unstructured: str = "row",
               weight: torch.Tensor | None = None, tier_map: torch.Tensor | None = None):
    """Mask (and tier map, or None) of ``pattern`` from ``scores [out, in]`` (higher = keep).

    unstructured: ``"row"`` (Wanda: per output row) or ``"matrix"`` (magnitude: one threshold
        per matrix); ``pattern.use_variant`` picks Wanda's cumulative-score variant instead.
    weight: the weight, needed for ``within_block="magnitude"`` (selection by ``|W|``).
    tier_map: an explicit tier map for tiered patterns, overriding the pattern's own ranking
        (what a planner passes when blocks were ranked across matrices or under a byte budget).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    if tier_map is not None and not pattern.uses_tiers:
        raise ValueError(f"a tier_map was given but pattern {pattern.name!r} has no tiers")
    if pattern.kind == "unstructured":
        if pattern.use_variant:
            return wanda_variant_mask(scores, pattern.sparsity), None
        if unstructured == "row":
            return unstructured_row_mask(scores, pattern.sparsity), None
        if unstructured == "matrix":
            return unstructured_matrix_mask(scores, pattern.sparsity), None
        raise ValueError(f"unstructured must be 'row' or 'matrix', got {unstructured!r}")
    if pattern.kind == "dense":
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device), None
    if pattern.kind == "nm":
        return sk.nm_mask(scores.float(), pattern.n, pattern.m), None
    selection = None
    if pattern.within_block == "magnitude":
        if weight is None:
            raise ValueError("within_block='magnitude' needs the weight to select by |W|")
        selection = weight.detach().float().abs()
    return tiered_mask(scores, pattern, tier_map, selection)
