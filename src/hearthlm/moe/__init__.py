"""Budgeted expert residency: MoE experts live in a slow tier (the memory-mapped checkpoint on CPU, host
memory beside a GPU) and a fixed pool of slots in fast memory holds the hot ones.

budget.py parses `--expert-budget`; tier.py reads one expert from the slow tier (into a slot, or to run once
without one); policy.py scores (layer, expert) pairs for eviction and admission; pool.py owns the slots;
ahead.py fetches on a thread ahead of the compute (optional); stats.py the counters; profile.py the usage
profile `hearth moe-profile` writes.
"""

from .budget import Budget, BudgetError, parse_budget
from .stats import MoEStats

__all__ = ["Budget", "BudgetError", "MoEStats", "parse_budget"]
