"""Shared interface of the rank-allocation strategies: one file per strategy, one test matrix for all.

A strategy turns one global latent budget into per-layer K and V ranks (every group of a layer shares its ranks,
which is what the paged kernels need). Strategies that look at the model (``needs_sensitivity``) get a
:class:`Sensitivity` measured once on the calibration windows (``RankAllocation.measure``: the Fisher pass of
``sensitivity.py``, or the probes of ``probes.py`` for ``measured``); the others ignore it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from vllm_palu.errors import PaluError


@dataclass(frozen=True)
class RankBudget:
    """The latent budget: ``kv_ratio`` of the K+V width, ``k_fraction`` of it for keys, ranks a multiple of
    ``multiple`` (kernels want aligned tiles)."""

    kv_ratio: float
    k_fraction: float
    multiple: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_ratio <= 1.0:
            raise PaluError(f"--kv-ratio must be in (0, 1], got {self.kv_ratio}")
        if not 0.0 < self.k_fraction < 1.0:
            raise PaluError(f"--k-fraction must be in (0, 1), got {self.k_fraction}")
        if self.multiple < 1:
            raise PaluError(f"--rank-multiple must be >= 1, got {self.multiple}")


@dataclass(frozen=True)
class LayerLayout:
    """What an allocation needs to know about the model: every layer has ``num_groups`` groups whose
    up-projections are ``group_width`` wide (so a rank can be at most ``group_width``)."""

    num_layers: int
    num_groups: int
    group_width: int


@dataclass
class Sensitivity:
    """Calibration statistics of the k/v projections, per kind ("k", "v") and layer.

    ``fisher[kind][layer]``: Palu's module score, the mean over the weights of ``sqrt(mean over windows of
    grad^2)`` of the LM loss. ``loss_curves[kind][layer][r]`` (r = 0..group_width): estimated loss increase when
    every group of that projection keeps rank r (non-increasing, 0 at full rank): for the Fisher pass the
    whitened-SVD tail weighted by the diagonal Fisher of the projection's outputs; for the probes the measured KL
    divergence, interpolated (then ``fisher`` is empty).
    """

    fisher: dict[str, list[float]]
    loss_curves: dict[str, list[list[float]]]
    # What the measured strategy's probes saw (``probes.ProbeRecord`` per kind and layer); None for the others.
    probes: dict | None = None

    def check(self, layout: LayerLayout, fields: tuple[str, ...] = ("fisher", "loss_curves")) -> None:
        for kind in ("k", "v"):
            if any(len(getattr(self, name).get(kind, [])) != layout.num_layers for name in fields):
                raise PaluError(f"sensitivity statistics do not match the model: need {layout.num_layers} layers "
                                f"for {kind}_proj")
            for curve in self.loss_curves[kind]:
                if len(curve) != layout.group_width + 1:
                    raise PaluError(f"sensitivity curve has {len(curve)} points, need group width + 1 = "
                                    f"{layout.group_width + 1}")


class RankAllocation(ABC):
    name: ClassVar[str]
    # Whether allocate() needs calibration statistics (then the converter measures them first).
    needs_sensitivity: ClassVar[bool] = False
    # Whether --k-fraction fixes the K/V split (otherwise the strategy splits K vs V itself).
    uses_k_fraction: ClassVar[bool] = True
    # Which Sensitivity fields allocate() reads.
    statistics: ClassVar[tuple[str, ...]] = ("fisher", "loss_curves")

    def measure(self, model, windows, layout: LayerLayout, device, decomposition: str,
                key: str | None = None) -> tuple[Sensitivity, float]:
        """(statistics, seconds): the layer-by-layer Fisher pass unless the strategy measures something else."""
        from vllm_palu.offline.allocation.sensitivity import measure  # it imports this module

        return measure(model, windows, layout, device, key=key)

    @abstractmethod
    def allocate(self, layout: LayerLayout, budget: RankBudget,
                 sensitivity: Sensitivity | None = None) -> tuple[list[int], list[int]]:
        """Per-layer (k_ranks, v_ranks), each the rank of every group of that layer."""

    def _sensitivity(self, layout: LayerLayout, sensitivity: Sensitivity | None) -> Sensitivity:
        if sensitivity is None:
            raise PaluError(f"--rank-alloc {self.name} needs calibration statistics; none were "
                            "measured")
        sensitivity.check(layout, self.statistics)
        return sensitivity


def min_rank(layout: LayerLayout, budget: RankBudget) -> int:
    return min(budget.multiple, layout.group_width)


def total_budget(layout: LayerLayout, budget: RankBudget) -> float:
    """Sum over layers of k + v ranks (per group) that the budget allows; PaluError when even the smallest ranks
    (one multiple for K and for V in every layer) overshoot it by more than rounding."""
    total = budget.kv_ratio * 2 * layout.group_width * layout.num_layers
    smallest = min_rank(layout, budget)
    # "Within rounding": half a multiple per projection, i.e. one multiple per layer.
    if total < layout.num_layers * smallest:
        least = smallest / (2 * layout.group_width)
        raise PaluError(f"--kv-ratio {budget.kv_ratio} is below what --rank-multiple {budget.multiple} allows: every "
                        f"layer keeps at least rank {smallest} for K and for V (use --kv-ratio >= {least:.4g} for "
                        f"group width {layout.group_width}, or a smaller --rank-multiple)")
    return total


def round_rank(rank: float, multiple: int, full: int) -> int:
    """Nearest multiple of ``multiple`` in ``[multiple, full]`` (``full`` itself when it is smaller)."""
    rounded = int(rank / multiple + 0.5) * multiple  # half up, not to even
    return max(min(multiple, full), min(rounded, full))


def split_budget(total: float, k_fraction: float, full: int) -> tuple[float, float]:
    """Split one group's latent width between K and V; what one side cannot use (above full rank) goes to the other."""
    k_width = min(total * k_fraction, full)
    v_width = min(total - k_width, full)
    k_width = min(total - v_width, full)
    return k_width, v_width


def round_to_budget(targets: list[float], total: float, multiple: int, full: int) -> list[int]:
    """Round real-valued ranks (each in [min, full]) to multiples so that their sum stays within half a multiple
    of ``total``: floor every target, then hand out whole multiples by largest remainder (ties: lowest index)."""
    smallest = min(multiple, full)
    ranks = [max(smallest, min(full, int(t // multiple) * multiple)) for t in targets]
    while sum(ranks) + multiple / 2 <= total:
        candidates = [(targets[i] - ranks[i], -i) for i in range(len(ranks)) if ranks[i] < full]
        if not candidates:
            break
        _, neg = max(candidates)
        ranks[-neg] = min(full, ranks[-neg] + multiple)
    while sum(ranks) - multiple / 2 > total:
        candidates = [(ranks[i] - targets[i], -i) for i in range(len(ranks)) if ranks[i] > smallest]
        if not candidates:
            break
        _, neg = max(candidates)
        ranks[-neg] = max(smallest, ranks[-neg] - multiple)
    return ranks


def to_layers(ranks: list[int], num_layers: int) -> tuple[list[int], list[int]]:
    """[k_0..k_{L-1}, v_0..v_{L-1}] -> (k_ranks, v_ranks)."""
    return ranks[:num_layers], ranks[num_layers:]
