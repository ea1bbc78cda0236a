"""Fisher allocation (Palu's ``fisher_uniform`` rank search, ``palu/rank_search.py``).

One Fisher score per k_proj and per v_proj of every layer (mean over the weights of ``sqrt(mean grad^2)`` of the
LM loss on the calibration windows) shares out one global latent budget: each projection's rank is proportional
to its score, clipped to ``[multiple, group width]`` (what a clipped projection cannot take is re-shared among the
others, where Palu only caps), then rounded to the multiple by largest remainder so that the sum stays within
rounding of the budget. K and V get different ranks and ranks vary per layer; all groups of a layer share one
rank. ``--k-fraction`` is not used: the scores split K vs V.
"""

from __future__ import annotations

from vllm_palu.offline.allocation.base import (LayerLayout, RankAllocation, RankBudget, Sensitivity, min_rank,
                                               round_to_budget, to_layers, total_budget)


def proportional_targets(scores: list[float], total: float, low: float, high: float) -> list[float]:
    """Real ranks ``clip(lam * score, low, high)`` summing to ``total`` (bisection on lam)."""
    if total >= high * len(scores):
        return [high] * len(scores)
    if total <= low * len(scores) or not any(s > 0 for s in scores):
        return [max(low, min(high, total / len(scores)))] * len(scores)

    def used(lam: float) -> float:
        return sum(min(high, max(low, lam * s)) for s in scores)

    lo, hi = 0.0, 1.0
    while used(hi) < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(mid) < total else (lo, mid)
    return [min(high, max(low, hi * s)) for s in scores]


class FisherAllocation(RankAllocation):
    name = "fisher"
    needs_sensitivity = True
    uses_k_fraction = False

    def allocate(self, layout: LayerLayout, budget: RankBudget,
                 sensitivity: Sensitivity | None = None) -> tuple[list[int], list[int]]:
        stats = self._sensitivity(layout, sensitivity)
        total = total_budget(layout, budget)
        scores = list(stats.fisher["k"]) + list(stats.fisher["v"])
        targets = proportional_targets(scores, total, min_rank(layout, budget), layout.group_width)
        ranks = round_to_budget(targets, total, budget.multiple, layout.group_width)
        return to_layers(ranks, layout.num_layers)
