"""Decomposition methods by name (``--decomposition``)."""

from vllm_palu.offline.decompositions.base import Decomposition, Factorization, relative_error
from vllm_palu.offline.decompositions.svd import PlainSVD
from vllm_palu.offline.decompositions.whitened_svd import WhitenedSVD

DECOMPOSITIONS: dict[str, type[Decomposition]] = {cls.name: cls for cls in (WhitenedSVD, PlainSVD)}

__all__ = ["DECOMPOSITIONS", "Decomposition", "Factorization", "PlainSVD", "WhitenedSVD", "relative_error"]
