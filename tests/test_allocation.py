"""One test matrix for every rank-allocation strategy (``vllm_palu.offline.allocation``)."""

from __future__ import annotations

import pytest

from vllm_palu.errors import PaluError
from vllm_palu.offline.allocation import ALLOCATIONS, LayerLayout, RankBudget

LAYOUTS = [LayerLayout(num_layers=30, num_groups=1, group_width=192),   # SmolLM2, joint
           LayerLayout(num_layers=30, num_groups=3, group_width=64),    # SmolLM2, per head
           LayerLayout(num_layers=32, num_groups=2, group_width=512)]   # Llama-3-8B, groups of 4 heads


@pytest.fixture(params=sorted(ALLOCATIONS))
def strategy(request):
    return ALLOCATIONS[request.param]()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ratio", [0.25, 0.375, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("k_fraction", [0.25, 0.375, 0.5])
def test_budget_met_within_rounding(strategy, layout, ratio, k_fraction):
    budget = RankBudget(ratio, k_fraction, multiple=8)
    k_ranks, v_ranks = strategy.allocate(layout, budget)
    assert len(k_ranks) == len(v_ranks) == layout.num_layers
    for rank in k_ranks + v_ranks:
        assert rank % 8 == 0 and 8 <= rank <= layout.group_width  # never 0, never above full rank
    kept = sum(k_ranks) + sum(v_ranks)
    target = ratio * 2 * layout.group_width * layout.num_layers
    assert abs(kept - target) <= 8 * layout.num_layers / 2 + 1e-9
    if ratio == 1.0:
        assert set(k_ranks + v_ranks) == {layout.group_width}


def test_keys_get_their_fraction(strategy):
    k_ranks, v_ranks = strategy.allocate(LAYOUTS[0], RankBudget(0.5, 0.375))
    assert sum(k_ranks) / (sum(k_ranks) + sum(v_ranks)) == pytest.approx(0.375, abs=0.03)


def test_deterministic(strategy):
    budget = RankBudget(0.4, 0.3)
    assert strategy.allocate(LAYOUTS[2], budget) == strategy.allocate(LAYOUTS[2], budget)


@pytest.mark.parametrize("ratio, k_fraction, multiple", [(0, 0.5, 8), (-0.1, 0.5, 8), (1.01, 0.5, 8),
                                                        (0.5, 0, 8), (0.5, 1.0, 8), (0.5, 0.5, 0)])
def test_bad_budgets(ratio, k_fraction, multiple):
    with pytest.raises(PaluError):
        RankBudget(ratio, k_fraction, multiple)
