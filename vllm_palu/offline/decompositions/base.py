"""Shared interface of the decomposition methods: one file per method, one test matrix for all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class Factorization:
    """``weight[g] ~= up[g] @ down[g]`` for every group g."""

    down: torch.Tensor  # [num_groups, rank, in_features]
    up: torch.Tensor  # [num_groups, group_width, rank]


class Decomposition(ABC):
    """Factorizes one layer's grouped k/v weight at a given per-group rank.

    ``prepare`` sees the layer's input statistics once (the Gram matrix ``X^T X`` of the calibration activations,
    float64) and returns whatever ``factorize`` needs for both k_proj and v_proj, which share that input.
    """

    name: ClassVar[str]

    def prepare(self, gram: torch.Tensor) -> Any:
        return None

    @abstractmethod
    def factorize(self, weight: torch.Tensor, prepared: Any, rank: int) -> Factorization:
        """``weight``: ``[num_groups, group_width, in_features]`` float64; returns float64 factors."""


def relative_error(weight: torch.Tensor, factors: Factorization, gram: torch.Tensor) -> float:
    """Activation-weighted relative error ``||(W - UD) X^T|| / ||W X^T||`` over all groups.

    Method-independent, so every decomposition is scored the same way.
    """
    residual = weight - factors.up @ factors.down
    num = torch.einsum("goi,ij,goj->", residual, gram, residual)
    den = torch.einsum("goi,ij,goj->", weight, gram, weight)
    return float((num.clamp_min(0) / den).sqrt())
