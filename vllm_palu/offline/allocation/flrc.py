"""FLRC-style fine-grained allocation (Lu et al., "FLRC: Fine-grained Low-Rank Compressor", EMNLP 2025).

FLRC's code is not public; what is known (../shared/notes/method.md, section C) is that its allocation is
Fisher-based, scores individual projections rather than blocks, and is much faster than an iterative search.
Our reading, restricted to the KV projections (the assumptions are listed in docs/ALLOCATION.md):

* the unit is one projection (k_proj or v_proj) of one layer, and the step is one rank multiple (a kernel tile):
  the finest grain that keeps ranks uniform over the groups of a layer;
* the cost of a rank is a second-order estimate of the loss increase, the whitened-SVD truncation error of the
  projection's outputs weighted by the diagonal Fisher of those outputs
  (``Sensitivity.loss_curves``; exact for the whitened truncation under a diagonal output Fisher);
* the search is one greedy pass (water-filling): start every projection at one multiple, then repeatedly give
  one more multiple to the projection whose loss falls most, until the budget is spent. On convex curves this is
  the optimum of the separable problem, at the cost of one heap operation per step, no model evaluation.

FLRC's other half, progressive low-rank decoding (ranks shrinking as generation proceeds), is not implemented.
"""

from __future__ import annotations

import heapq

from vllm_palu.offline.allocation.base import (LayerLayout, RankAllocation, RankBudget, Sensitivity, min_rank,
                                               to_layers, total_budget)


class FLRCAllocation(RankAllocation):
    name = "flrc"
    needs_sensitivity = True
    uses_k_fraction = False

    def allocate(self, layout: LayerLayout, budget: RankBudget,
                 sensitivity: Sensitivity | None = None) -> tuple[list[int], list[int]]:
        stats = self._sensitivity(layout, sensitivity)
        total = total_budget(layout, budget)
        full, step = layout.group_width, budget.multiple
        curves = list(stats.loss_curves["k"]) + list(stats.loss_curves["v"])
        ranks = [min_rank(layout, budget)] * len(curves)

        def gain(i: int) -> tuple[float, int]:
            nxt = min(full, ranks[i] + step)
            return (curves[i][ranks[i]] - curves[i][nxt]) / (nxt - ranks[i]), nxt

        heap = [(-gain(i)[0], i) for i in range(len(curves)) if ranks[i] < full]
        heapq.heapify(heap)
        used = sum(ranks)
        while heap:
            _, i = heapq.heappop(heap)
            nxt = gain(i)[1]
            if used + (nxt - ranks[i]) - total > step / 2:  # one more step would overshoot beyond rounding
                break
            used += nxt - ranks[i]
            ranks[i] = nxt
            if ranks[i] < full:
                heapq.heappush(heap, (-gain(i)[0], i))
        return to_layers(ranks, layout.num_layers)
