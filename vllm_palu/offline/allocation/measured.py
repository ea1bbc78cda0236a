"""Measured allocation: ranks from the loss increase each projection actually causes when truncated.

The statistics come from ``probes.measure`` (one forward pass per probe rank, per layer and per k/v projection,
the rest of the model at full precision); each projection gets a non-increasing loss curve over its ranks. The
allocation minimizes the sum of these curves over all projections for the global budget, exactly, by dynamic
programming over rank multiples (measured curves need not be convex, so a greedy pass could stop short).
The sum assumes the projections' damages add up; the probes measure each alone.
"""

from __future__ import annotations

from math import gcd

import numpy as np

from vllm_palu.offline.allocation.base import (LayerLayout, RankAllocation, RankBudget, Sensitivity, min_rank,
                                               to_layers, total_budget)


class MeasuredAllocation(RankAllocation):
    name = "measured"
    needs_sensitivity = True
    uses_k_fraction = False
    statistics = ("loss_curves",)

    def measure(self, model, windows, layout: LayerLayout, device, decomposition: str,
                key: str | None = None) -> tuple[Sensitivity, float]:
        from vllm_palu.offline.allocation import probes

        return probes.measure(model, windows, layout, device, decomposition, key=key)

    def allocate(self, layout: LayerLayout, budget: RankBudget,
                 sensitivity: Sensitivity | None = None) -> tuple[list[int], list[int]]:
        stats = self._sensitivity(layout, sensitivity)
        total = total_budget(layout, budget)
        full = layout.group_width
        choices = sorted(set(range(min_rank(layout, budget), full + 1, budget.multiple)) | {full})
        curves = list(stats.loss_curves["k"]) + list(stats.loss_curves["v"])
        return to_layers(cheapest_ranks(curves, choices, total), layout.num_layers)


def cheapest_ranks(curves: list[list[float]], choices: list[int], total: float) -> list[int]:
    """One rank from ``choices`` per curve, minimizing the summed curve values, with the rank sum the reachable
    sum closest to ``total`` (the lower one on a tie). Dynamic programming over sums in units of the choices' gcd."""
    unit = 0
    for rank in choices:
        unit = gcd(unit, rank)
    steps = [rank // unit for rank in choices]
    size = len(curves) * steps[-1] + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for curve in curves:
        options = np.full((len(steps), size), np.inf)
        for j, (rank, step) in enumerate(zip(choices, steps)):
            options[j, step:] = best[:size - step] + curve[rank]
        pick = np.argmin(options, axis=0)  # first minimum: deterministic
        best = options[pick, np.arange(size)]
        picks.append(pick)
    reachable = np.flatnonzero(np.isfinite(best))
    target = reachable[np.argmin(np.abs(reachable * unit - total) + 1e-9 * reachable)]
    ranks = []
    for pick in reversed(picks):
        j = int(pick[target])
        ranks.append(choices[j])
        target -= steps[j]
    return ranks[::-1]
