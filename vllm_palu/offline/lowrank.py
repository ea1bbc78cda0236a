"""The factorized projections that replace ``k_proj`` / ``v_proj`` in a Palu model.

    latent = down(x)                                  hidden -> num_groups * rank   (what serving caches)
    out[g] = up.weight[g] @ latent[g] (+ bias[g])     rank -> group_size * head_dim, per group

Split layout: ``k_proj`` and ``v_proj`` are each a :class:`LowRankProjection`. Shared layout: ``k_proj`` is one
(its ``down`` makes the one latent), ``v_proj`` a :class:`SharedValueProjection`, only an ``up`` over that latent.
The state-dict names (``k_proj.down.weight``, ``{k,v}_proj.up.weight``, ``{k,v}_proj.up.bias``, and in the split
layout ``v_proj.down.weight``) are the checkpoint format.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from vllm_palu.attention.latent_quant import fake_quant_latent
from vllm_palu.config import LatentFormat


class GroupedUpProjection(nn.Module):
    """Block-diagonal latent -> heads projection: one ``[group_width, rank]`` matrix per group."""

    def __init__(self, num_groups: int, rank: int, group_width: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.num_groups, self.rank, self.group_width = num_groups, rank, group_width
        self.weight = nn.Parameter(torch.empty(num_groups, group_width, rank, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.zeros(num_groups * group_width, dtype=dtype, device=device))
                     if bias else None)

    @torch.no_grad()
    def load_factor(self, up: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take ``up [groups, width, rank]`` and the dense projection's bias (None: it had none)."""
        self.weight.copy_(up)
        if bias is not None:
            self.bias.copy_(bias)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        grouped = latent.unflatten(-1, (self.num_groups, self.rank))
        out = torch.einsum("...gr,gor->...go", grouped, self.weight).flatten(-2)
        return out if self.bias is None else out + self.bias


class LowRankProjection(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` k/v projection, factorized per group of KV heads."""

    def __init__(self, in_features: int, num_groups: int, rank: int, group_width: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.down = nn.Linear(in_features, num_groups * rank, bias=False, dtype=dtype, device=device)
        self.up = GroupedUpProjection(num_groups, rank, group_width, bias, dtype=dtype, device=device)
        # Applied to the latent before reconstruction; the seam where latent quantization is simulated.
        self.latent_hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_factors(cls, dense: nn.Linear, down: torch.Tensor, up: torch.Tensor,
                     device: torch.device | str | None = None) -> "LowRankProjection":
        """The replacement of ``dense`` with factors ``down [groups, rank, in]``, ``up [groups, width, rank]``
        (dense's bias moves to the up-projection)."""
        num_groups, group_width, rank = up.shape
        projection = cls(dense.in_features, num_groups, rank, group_width, bias=dense.bias is not None,
                         dtype=dense.weight.dtype, device=device)
        projection.down.weight.data.copy_(down.reshape(-1, dense.in_features))
        projection.up.load_factor(up, dense.bias)
        return projection

    @property
    def rank(self) -> int:
        return self.up.rank

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """What the cache stores for ``x`` (through ``latent_hook``)."""
        latent = self.down(x)
        return latent if self.latent_hook is None else self.latent_hook(latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.latent(x))


class SharedValueProjection(nn.Module):
    """``v_proj`` of the shared layout: the values' up-projection of ``k_proj``'s latent (hook included, so K and V
    see the same stored latent)."""

    def __init__(self, keys: LowRankProjection, up: GroupedUpProjection):
        super().__init__()
        self.up = up
        self.keys = (keys,)  # not a submodule: the one down-projection is saved and moved as k_proj's

    @classmethod
    def from_factors(cls, keys: LowRankProjection, dense: nn.Linear, up: torch.Tensor,
                     device: torch.device | str | None = None) -> "SharedValueProjection":
        """The replacement of ``dense`` (v_proj) with the values' factor ``up [groups, width, rank]`` over ``keys``'
        latent (dense's bias moves to the up-projection)."""
        num_groups, group_width, rank = up.shape
        projection = cls(keys, GroupedUpProjection(num_groups, rank, group_width, dense.bias is not None,
                                                   dtype=dense.weight.dtype, device=device))
        projection.up.load_factor(up, dense.bias)
        return projection

    @property
    def rank(self) -> int:
        return self.up.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.keys[0].latent(x))


def _quantize_groups(latent: torch.Tensor, num_groups: int, latent_format: LatentFormat) -> torch.Tensor:
    grouped = latent.unflatten(-1, (num_groups, -1))
    return fake_quant_latent(grouped, latent_format).flatten(-2).to(latent.dtype)


def set_latent_format(model: nn.Module, latent_format: LatentFormat) -> None:
    """Fake-quantize every K and V latent per token and group as the paged cache stores it in ``latent_format``
    (``auto``: unquantized)."""
    latent_format = LatentFormat.parse(latent_format)
    for module in model.modules():
        if isinstance(module, LowRankProjection):
            module.latent_hook = None if latent_format == LatentFormat.AUTO else partial(
                _quantize_groups, num_groups=module.up.num_groups, latent_format=latent_format)