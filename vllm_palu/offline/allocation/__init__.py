"""Rank-allocation strategies by name (``--rank-alloc``)."""

from vllm_palu.offline.allocation.base import LayerLayout, RankAllocation, RankBudget, Sensitivity
from vllm_palu.offline.allocation.fisher import FisherAllocation
from vllm_palu.offline.allocation.flrc import FLRCAllocation
from vllm_palu.offline.allocation.uniform import UniformAllocation

ALLOCATIONS: dict[str, type[RankAllocation]] = {
    cls.name: cls for cls in (UniformAllocation, FisherAllocation, FLRCAllocation)}

__all__ = ["ALLOCATIONS", "FLRCAllocation", "FisherAllocation", "LayerLayout", "RankAllocation", "RankBudget",
           "Sensitivity", "UniformAllocation"]
