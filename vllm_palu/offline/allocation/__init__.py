"""Rank-allocation strategies by name (``--rank-alloc``)."""

from vllm_palu.offline.allocation.base import LayerLayout, RankAllocation, RankBudget
from vllm_palu.offline.allocation.uniform import UniformAllocation

ALLOCATIONS: dict[str, type[RankAllocation]] = {cls.name: cls for cls in (UniformAllocation,)}

__all__ = ["ALLOCATIONS", "LayerLayout", "RankAllocation", "RankBudget", "UniformAllocation"]
