"""Planning: which tier every block of every matrix gets, before a method prunes it.

policy.py holds the model-level half of a prune's settings (``TierPolicy``: where blocks compete,
the byte budget) and turns prune()'s arguments into a Pattern and a policy (``tier_settings``);
planners.py decides the tier maps layer by layer (one planner per strategy: fixed ratios ranked
jointly, a byte budget, a progressive demotion); allocation.py is the byte-budget math;
sensitivity.py the gradient pass that makes losses of different matrices comparable.
"""
from .planners import (ByteBudget, Demotion, JointRanking, PlanContext, TierPlanner,
                       make_planner, uncalibrated_stats)
from .policy import BUDGET_TOPK, RANKINGS, TierPolicy, tier_settings

__all__ = ["TierPolicy", "tier_settings", "RANKINGS", "BUDGET_TOPK", "PlanContext",
           "TierPlanner", "JointRanking", "ByteBudget", "Demotion", "make_planner",
           "uncalibrated_stats"]
