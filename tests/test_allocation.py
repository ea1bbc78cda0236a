"""One test matrix for every rank-allocation strategy (``vllm_palu.offline.allocation``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import convert_tiny
from vllm_palu.errors import PaluError
from vllm_palu.offline.allocation import ALLOCATIONS, LayerLayout, RankBudget, Sensitivity
from vllm_palu.offline.allocation.sensitivity import measure
from vllm_palu.offline.checkpoint import load_dense_model

LAYOUTS = [LayerLayout(num_layers=30, num_groups=1, group_width=192),   # SmolLM2, joint
           LayerLayout(num_layers=30, num_groups=3, group_width=64),    # SmolLM2, per head
           LayerLayout(num_layers=32, num_groups=2, group_width=512)]   # Llama-3-8B, groups of 4 heads


def synthetic_sensitivity(layout: LayerLayout, seed: int = 0) -> Sensitivity:
    """Per-projection Fisher scores and loss curves of a decaying random spectrum, different for every layer."""
    generator = torch.Generator().manual_seed(seed)
    fisher, curves = {}, {}
    for kind in ("k", "v"):
        fisher[kind] = (torch.rand(layout.num_layers, generator=generator) + 0.05).tolist()
        decay = torch.rand(layout.num_layers, 1, generator=generator) * 0.2 + 0.01
        scale = torch.rand(layout.num_layers, 1, generator=generator) * 10 + 0.1
        energy = scale * torch.exp(-decay * torch.arange(layout.group_width, dtype=torch.float64))
        tail = energy.flip(1).cumsum(1).flip(1)
        curves[kind] = [row + [0.0] for row in tail.tolist()]
    return Sensitivity(fisher=fisher, loss_curves=curves)


@pytest.fixture(params=sorted(ALLOCATIONS))
def strategy(request):
    return ALLOCATIONS[request.param]()


def allocate(strategy, layout, budget, seed=0):
    return strategy.allocate(layout, budget, synthetic_sensitivity(layout, seed))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ratio", [0.25, 0.375, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("k_fraction", [0.25, 0.375, 0.5])
def test_budget_met_within_rounding(strategy, layout, ratio, k_fraction):
    budget = RankBudget(ratio, k_fraction, multiple=8)
    k_ranks, v_ranks = allocate(strategy, layout, budget)
    assert len(k_ranks) == len(v_ranks) == layout.num_layers
    for rank in k_ranks + v_ranks:
        assert rank % 8 == 0 and 8 <= rank <= layout.group_width  # never 0, never above full rank
    kept = sum(k_ranks) + sum(v_ranks)
    target = ratio * 2 * layout.group_width * layout.num_layers
    assert abs(kept - target) <= 8 * layout.num_layers / 2 + 1e-9
    if strategy.needs_sensitivity:  # a global budget: off by at most half a multiple
        assert abs(kept - target) <= 4 + 1e-9
    if ratio == 1.0:
        assert set(k_ranks + v_ranks) == {layout.group_width}


def test_keys_get_their_fraction(strategy):
    if not strategy.uses_k_fraction:
        pytest.skip(f"{strategy.name} splits K vs V from its statistics, not --k-fraction")
    k_ranks, v_ranks = allocate(strategy, LAYOUTS[0], RankBudget(0.5, 0.375))
    assert sum(k_ranks) / (sum(k_ranks) + sum(v_ranks)) == pytest.approx(0.375, abs=0.03)


def reversed_layers(stats: Sensitivity) -> Sensitivity:
    """The same statistics with the layers listed last to first."""
    return Sensitivity(fisher={kind: scores[::-1] for kind, scores in stats.fisher.items()},
                       loss_curves={kind: curves[::-1] for kind, curves in stats.loss_curves.items()})


def test_deterministic(strategy):
    """The ranks are a function of the inputs: the same on a second call, from a fresh instance given a copy of the
    statistics, and layer for layer with the layers listed in reverse order, the statistics left as they were; a
    different budget gives different ranks, and so do different statistics to a strategy that reads them (uniform
    ignores them)."""
    layout, budget = LAYOUTS[2], RankBudget(0.4, 0.3)
    stats = synthetic_sensitivity(layout, seed=3)
    before = copy.deepcopy(stats)
    ranks = strategy.allocate(layout, budget, stats)
    assert stats == before
    assert strategy.allocate(layout, budget, stats) == ranks
    assert ALLOCATIONS[strategy.name]().allocate(layout, budget, copy.deepcopy(stats)) == ranks
    k_reversed, v_reversed = strategy.allocate(layout, budget, reversed_layers(stats))
    assert (k_reversed[::-1], v_reversed[::-1]) == ranks
    assert strategy.allocate(layout, RankBudget(0.5, 0.3), stats) != ranks
    other_stats = synthetic_sensitivity(layout, seed=4)
    assert (strategy.allocate(layout, budget, other_stats) != ranks) == strategy.needs_sensitivity


def test_sensitive_strategies_follow_the_statistics(strategy):
    """Non-uniform statistics give non-uniform ranks; a layer made far more sensitive gets more rank."""
    if not strategy.needs_sensitivity:
        pytest.skip("uniform ignores statistics")
    layout, budget = LAYOUTS[0], RankBudget(0.5, 0.3)
    stats = synthetic_sensitivity(layout)
    k_ranks, v_ranks = strategy.allocate(layout, budget, stats)
    assert len(set(k_ranks + v_ranks)) > 2
    stats.fisher["v"][7] *= 100
    stats.loss_curves["v"][7] = [x * 100 for x in stats.loss_curves["v"][7]]
    assert strategy.allocate(layout, budget, stats)[1][7] > v_ranks[7]


@pytest.mark.parametrize("ratio, k_fraction, multiple", [(0, 0.5, 8), (-0.1, 0.5, 8), (1.01, 0.5, 8),
                                                        (0.5, 0, 8), (0.5, 1.0, 8), (0.5, 0.5, 0)])
def test_bad_budgets(ratio, k_fraction, multiple):
    with pytest.raises(PaluError):
        RankBudget(ratio, k_fraction, multiple)


def test_budget_below_the_smallest_ranks_is_refused(strategy):
    layout = LayerLayout(num_layers=4, num_groups=1, group_width=64)
    with pytest.raises(PaluError, match=r"--kv-ratio 0.05 is below what --rank-multiple 16 allows.*>= 0.125"):
        allocate(strategy, layout, RankBudget(0.05, 0.5, multiple=16))


@pytest.mark.parametrize("name", ["fisher", "flrc", "measured"])
def test_missing_or_mismatched_statistics_are_refused(name):
    strategy = ALLOCATIONS[name]()
    with pytest.raises(PaluError, match="needs calibration statistics"):
        strategy.allocate(LAYOUTS[0], RankBudget(0.5, 0.3))
    with pytest.raises(PaluError, match="do not match the model"):
        strategy.allocate(LAYOUTS[0], RankBudget(0.5, 0.3), synthetic_sensitivity(LAYOUTS[2]))


def test_measured_statistics(tiny_llama, calib_file):
    """The layer-by-layer Fisher pass on a real (tiny) model: positive scores, non-increasing curves that reach 0
    at full rank, the same numbers twice, and weights left frozen as they were."""
    from transformers import AutoTokenizer

    from vllm_palu.offline.calibration import windows_from_text

    model = load_dense_model(tiny_llama)
    windows = windows_from_text(AutoTokenizer.from_pretrained(tiny_llama), calib_file, 4, 32, seed=0).windows
    layout = LayerLayout(num_layers=2, num_groups=2, group_width=32)
    first, _ = measure(model, windows, layout, torch.device("cpu"))
    second, _ = measure(model, windows, layout, torch.device("cpu"))
    assert first == second
    for kind in ("k", "v"):
        assert all(score > 0 for score in first.fisher[kind])
        for curve in first.loss_curves[kind]:
            assert len(curve) == 33 and curve[-1] == 0.0 and curve[0] > 0
            assert all(a >= b - 1e-12 * curve[0] for a, b in zip(curve, curve[1:]))
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["fisher", "flrc", "measured"])
def test_converter_records_the_allocation(tiny_checkpoints, calib_file, tmp_path, name):
    output = convert_tiny(tiny_checkpoints["llama"], tmp_path / name, calib_file, kv_ratio=0.5, rank_alloc=name)
    palu = json.loads((output / "config.json").read_text())["palu"]
    assert palu["method"]["rank_alloc"] == name and palu["method"]["k_fraction"] is None
    assert palu["method"]["allocation_seconds"] >= 0
    assert abs(sum(palu["k_ranks"]) + sum(palu["v_ranks"]) - 0.5 * 2 * 64 * 2) <= 4


def test_probed_curves(tiny_llama, calib_file):
    """The measured strategy's probes on a real (tiny) model: non-negative non-increasing curves that reach 0 at
    full rank, probes at the documented ranks, the same numbers twice, weights left as they were."""
    from transformers import AutoTokenizer

    from vllm_palu.offline.allocation import probes
    from vllm_palu.offline.calibration import windows_from_text

    model = load_dense_model(tiny_llama)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    windows = windows_from_text(AutoTokenizer.from_pretrained(tiny_llama), calib_file, 4, 32, seed=0).windows
    layout = LayerLayout(num_layers=2, num_groups=2, group_width=32)
    strategy = ALLOCATIONS["measured"]()
    first, seconds = strategy.measure(model, windows, layout, torch.device("cpu"), "whitened_svd")
    second, _ = strategy.measure(model, windows, layout, torch.device("cpu"), "whitened_svd")
    assert first.loss_curves == second.loss_curves and seconds >= 0
    assert probes.probe_ranks(32) == [8, 24] and probes.probe_ranks(192) == [16, 32, 64, 128]
    for kind in ("k", "v"):
        for curve, record in zip(first.loss_curves[kind], first.probes[kind]):
            assert len(curve) == 33 and curve[-1] == 0.0 and curve[8] > 0
            assert all(a >= b for a, b in zip(curve, curve[1:]))
            assert set(record.kl) == {8, 24} and record.error[0] == 1.0 and record.error[-1] < 1e-9
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    k_ranks, v_ranks = strategy.allocate(layout, RankBudget(0.5, 0.3), first)
    assert sum(k_ranks) + sum(v_ranks) == 64


def test_measured_allocation_is_the_optimum_of_the_curves():
    """Dynamic programming finds the cheapest ranks even on non-convex curves where greedy stops short."""
    from vllm_palu.offline.allocation.measured import cheapest_ranks

    step = [10.0] * 8 + [0.0] * 9  # nothing gained until rank 8 is reached in full
    smooth = [float(16 - r) for r in range(17)]
    assert cheapest_ranks([step, smooth], [4, 8, 12, 16], 16) == [8, 8]
    assert sum(cheapest_ranks([smooth, smooth], [4, 8, 12, 16], 18)) == 16  # tie 16 vs 20: the lower sum
