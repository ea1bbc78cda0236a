"""Uniform allocation: every layer gets the same K and V ranks."""

from __future__ import annotations

from vllm_palu.offline.allocation.base import (LayerLayout, RankAllocation, RankBudget, Sensitivity, round_rank,
                                               split_budget, total_budget)


class UniformAllocation(RankAllocation):
    name = "uniform"

    def allocate(self, layout: LayerLayout, budget: RankBudget,
                 sensitivity: Sensitivity | None = None) -> tuple[list[int], list[int]]:
        total_budget(layout, budget)  # refuses budgets below the smallest ranks
        full = layout.group_width
        total = budget.kv_ratio * 2 * full
        k_width, _ = split_budget(total, budget.k_fraction, full)
        k_rank = round_rank(k_width, budget.multiple, full)
        # V takes what rounding K left, so rounding errors do not add up.
        v_rank = round_rank(min(total - k_rank, full), budget.multiple, full)
        return [k_rank] * layout.num_layers, [v_rank] * layout.num_layers
