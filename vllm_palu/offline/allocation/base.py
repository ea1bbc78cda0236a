"""Shared interface of the rank-allocation strategies: one file per strategy, one test matrix for all."""

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


class RankAllocation(ABC):
    name: ClassVar[str]

    @abstractmethod
    def allocate(self, layout: LayerLayout, budget: RankBudget) -> tuple[list[int], list[int]]:
        """Per-layer (k_ranks, v_ranks), each the rank of every group of that layer."""


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
