"""How the blocks of a model get their tiers: the model-level half of a prune's settings.

A :class:`pruning.patterns.Pattern` is the shape of one matrix's sparsity; a :class:`TierPolicy`
says where blocks compete for tiers (each matrix, each decoder layer, the whole model) and
whether they share a byte budget. :func:`tier_settings` is the one place prune()'s arguments
become the two (a plain K, several candidate K, ``ranking="row"``, the budget's default K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_kernels.rules import (DEFAULT_GROUP_SIZE, DEFAULT_TOPK, RESEARCH_MIX, check_bits,
                                  check_topk, scaled_topk)

from ..patterns import TIERED_KINDS, Pattern, parse_pattern
from .allocation import check_budget_value

__all__ = ["TierPolicy", "tier_settings", "RANKINGS", "BUDGET_TOPK"]

RANKINGS = ("matrix", "row", "layer", "model")
# K of a byte budget's top-K blocks: a quarter of the block at 197 of 512 fp16 bytes. Measured on
# the embedded model (benchmarks/NOTES-frontier.md), K = 64 beats 15, 32 and 48, ties 80, and
# beats choosing K per matrix by the proxy.
BUDGET_TOPK = 64


@dataclass(frozen=True)
class TierPolicy:
    """Model-level choices of how blocks get their tiers.

    ranking: where blocks compete for tiers (and share a budget): ``"matrix"`` (each matrix on
        its own; the pattern's ``per_row`` narrows fixed ratios to each block-row), ``"layer"``
        (a decoder layer's matrices together) or ``"model"`` (every matrix of the model).
    budget: packed bytes / dense bytes (``HybridWeight.nbytes``: values, 2:4 metadata, top-K
        positions, block index), e.g. 0.62: each block then takes the tier that minimises the
        method's loss proxy within the budget (:mod:`pruning.planning.allocation`), instead of
        the pattern's ``tier_ratios``. None: fixed ratios.
    budget_dtype: the value dtype the budget's bytes are counted in (None: each weight's own).
    allow_topk: with a budget, False keeps every block dense or 2:4 (two tiers).
    topk_choices: with a budget, candidate values of K; each matrix gets the one its allocation
        loses least with (one K per matrix: the format's top-K slots are fixed). None: the
        pattern's K.
    bits_choices: with a budget, candidate value precisions (16, 8, 4); each matrix gets the
        one (with its K) whose allocation loses least for the bytes: structure and precision
        chosen together. None: the pattern's bits.

    Constructing one validates it alone; :meth:`check` validates it with a pattern.
    """

    ranking: str = "matrix"
    budget: float | None = None
    budget_dtype: torch.dtype | None = None
    allow_topk: bool = True
    topk_choices: tuple[int, ...] | None = None
    bits_choices: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.ranking not in ("matrix", "layer", "model"):
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got "
                             f"{self.ranking!r}")
        if self.allow_topk not in (True, False):
            raise ValueError(f"allow_topk must be a bool, got {self.allow_topk!r}")
        if self.budget_dtype is not None and not (isinstance(self.budget_dtype, torch.dtype)
                                                  and self.budget_dtype.is_floating_point):
            raise ValueError(f"budget_dtype must be a floating-point torch dtype or None, got "
                             f"{self.budget_dtype!r}")
        if self.budget is None:
            if not self.allow_topk or self.budget_dtype is not None or self.topk_choices \
                    or self.bits_choices:
                raise ValueError("allow_topk, budget_dtype and several K or bits (topk_choices, "
                                 "bits_choices) apply to a byte budget: pass budget= as well "
                                 "(or use tier_ratios with a 0 top-K share)")
            return
        object.__setattr__(self, "budget", check_budget_value(self.budget))
        if self.topk_choices is not None:
            choices = tuple(self.topk_choices)
            if not choices or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                  for k in choices):
                raise ValueError(f"topk_choices must be integers in 1..block_size^2, got "
                                 f"{self.topk_choices!r}")
            object.__setattr__(self, "topk_choices", tuple(sorted(set(choices))))
        if self.bits_choices is not None:
            if not self.bits_choices:
                raise ValueError("bits_choices must name at least one of 16, 8, 4")
            object.__setattr__(self, "bits_choices", tuple(sorted(
                {check_bits(b) for b in self.bits_choices}, reverse=True)))

    def check(self, pattern: Pattern) -> None:
        """``ValueError`` unless this policy applies to ``pattern``."""
        if self.ranking != "matrix" and not pattern.uses_tiers:
            raise ValueError(f"ranking={self.ranking!r} ranks blocks into tiers and applies to "
                             f"{', '.join(TIERED_KINDS)} only, got pattern {pattern.name!r}")
        if self.budget is None:
            return
        if pattern.kind != "three_tier":
            raise ValueError(f"a byte budget allocates dense / 2:4 / top-K blocks and applies to "
                             f"pattern three_tier only, got pattern {pattern.name!r}")
        if pattern.per_row:
            raise ValueError("ranking='row' gives every block-row the fixed tier_ratios; a "
                             "byte budget holds per 'matrix', 'layer' or 'model'")
        if pattern.within_block != "score":
            raise ValueError("a byte budget counts the loss of the weights the method's scores "
                             "drop inside each block; within_block='magnitude' (the research "
                             "code's fixed-ratio rule) cannot be combined with it")
        for k in self.topk_choices or ():
            check_topk(k, pattern.block_size)

    def candidate_bits(self, pattern: Pattern) -> tuple[int, ...]:
        """The value precisions a budget chooses between for each matrix."""
        return self.bits_choices or (pattern.bits,)

    def candidates(self, pattern: Pattern) -> list[tuple[int, int]]:
        """The ``(K, bits)`` a budget chooses between for each matrix: every candidate K with
        every precision when several K are given, else the pattern's K at 16 bits and, for low
        bits, the K whose top-K block keeps the same share of a 2:4 block's bytes
        (``rules.scaled_topk``)."""
        bits = self.candidate_bits(pattern)
        if self.topk_choices:
            return [(k, b) for b in bits for k in self.topk_choices]
        return [(scaled_topk(pattern.topk, b, pattern.block_size), b) for b in bits]

    def describe(self, pattern: Pattern) -> str:
        """A one-line summary of the pattern under this policy, for logs and reports."""
        if self.budget is None:
            return pattern.describe(self.ranking)
        tiers = "" if self.allow_topk else ", dense + 2:4 only"
        k = "/".join(map(str, sorted({k for k, _ in self.candidates(pattern)})))
        counted = "" if self.budget_dtype is None else \
            f", bytes in {str(self.budget_dtype).replace('torch.', '')}"
        bits = self.candidate_bits(pattern)
        values = "" if bits == (16,) else \
            f", int{'/'.join(map(str, bits))} g{pattern.group_size}".replace("int16", "16 bits")
        return (f"three_tier budget {self.budget:g} (K={k}, B={pattern.block_size}{values}, per "
                f"{self.ranking}{tiers}{counted})")


def tier_settings(pattern: str | Pattern = "three_tier", *, sparsity: float = 0.5,
                  tier_ratios=None, topk: int | tuple[int, ...] | list[int] | None = None,
                  block_size: int = 16, within_block: str = "score", ranking: str = "matrix",
                  use_variant: bool = False, budget: float | None = None,
                  budget_dtype: torch.dtype | None = None, allow_topk: bool = True,
                  bits: int | tuple[int, ...] | list[int] = 16,
                  group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Pattern, TierPolicy]:
    """``(Pattern, TierPolicy)`` from ``pruning.prune``'s arguments, validated together.

    ``topk``: one K, or several candidates a byte budget chooses between per matrix (default 64
    with a budget, else 15). ``bits``: one precision, or several a byte budget chooses between
    per matrix. ``ranking="row"`` is the pattern's ``per_row`` with ranking per matrix.
    ``tier_ratios`` and ``budget`` exclude each other (default ratios: the research code's mix).
    """
    if tier_ratios is not None and budget is not None:
        raise ValueError("give three_tier either a byte budget or tier_ratios, not both")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    choices = None
    if topk is None:
        topk = BUDGET_TOPK if budget is not None else DEFAULT_TOPK
    if isinstance(topk, (tuple, list)):
        if budget is None:
            raise ValueError(f"several K (topk={tuple(topk)}) are chosen between per matrix by "
                             f"a byte budget: pass budget= too, or one K")
        choices, topk = tuple(topk), min(topk) if topk else DEFAULT_TOPK
    bits_choices = None
    if isinstance(bits, (tuple, list)):
        if budget is None and len(set(bits)) > 1:
            raise ValueError(f"several precisions (bits={tuple(bits)}) are chosen between per "
                             f"matrix by a byte budget: pass budget= too, or one bits")
        bits_choices = tuple(bits) if budget is not None else None
        bits = max(bits) if bits else 16
    spec = parse_pattern(pattern, sparsity=sparsity,
                         tier_ratios=RESEARCH_MIX if tier_ratios is None else tier_ratios,
                         topk=topk, block_size=block_size, within_block=within_block,
                         per_row=ranking == "row", use_variant=use_variant, bits=bits,
                         group_size=group_size)
    policy = TierPolicy(ranking="matrix" if ranking == "row" else ranking, budget=budget,
                        budget_dtype=budget_dtype, allow_topk=allow_topk, topk_choices=choices,
                        bits_choices=bits_choices)
    policy.check(spec)
    return spec, policy
