"""Rank-allocation strategies by name (``--rank-alloc``)."""

from vllm_palu.offline.allocation.base import LayerLayout, RankAllocation, RankBudget, Sensitivity
from vllm_palu.offline.allocation.fisher import FisherAllocation
from vllm_palu.offline.allocation.flrc import FLRCAllocation
from vllm_palu.offline.allocation.measured import MeasuredAllocation
from vllm_palu.offline.allocation.uniform import UniformAllocation

ALLOCATIONS: dict[str, type[RankAllocation]] = {
    cls.name: cls for cls in (UniformAllocation, FisherAllocation, FLRCAllocation, MeasuredAllocation)}

__all__ = ["ALLOCATIONS", "FLRCAllocation", "FisherAllocation", "LayerLayout", "MeasuredAllocation", "RankAllocation", "RankBudget",
           "Sensitivity", "UniformAllocation"]
