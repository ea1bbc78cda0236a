"""SkipCat's block skipping on the K/V down-projection (``--block-skip``): an exact change of latent basis.

A group's factors ``up @ down`` (``down [r, in]``) equal ``(up @ A1) @ (A1^-1 down)`` for any invertible r x r block
``A1 = down[:, P1]`` of r input channels P1. The new down-projection is the identity on P1, so the cached latent is
``u = x_P1 + A' x_P2`` with ``A' = A1^-1 down[:, P2]``: r of its ``r x in`` multiply-adds become a copy. The
up-projections absorb ``A1``.

P1 must make ``A1`` well conditioned, or bf16 rounding of ``A'`` and of the latent blows up (SkipCat: without
pivoting, BF16 perplexity in the tens of thousands). Column pivoting greedily picks channels of largest residual
norm; maximum-volume swaps (Goreinov et al.'s maxvol, which gives strong rank-revealing QR's bound) then exchange a
chosen channel for an unchosen one while that grows ``|det A1|`` by more than ``MAX_ENTRY``, so on return every entry
of ``A'`` is at most ``MAX_ENTRY`` in magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_palu.offline.decompositions import Factorization

MAX_ENTRY = 1.05  # bound on |A'| after the swaps (maxvol's usual tolerance)
MAX_SWAPS_PER_RANK = 8  # swaps stop at this many per latent dimension even if the bound is not reached


@dataclass
class SkippedBlock:
    factors: Factorization  # down [G, r, in] with down[g][:, channels[g]] = I, up [G, width, r]
    channels: torch.Tensor  # [G, r] the input channels P1 of each group, in latent order
    condition: float  # largest 2-norm condition number of A1 over the groups
    max_entry: float  # largest |A'| over the groups


def pivoted_channels(down: torch.Tensor) -> torch.Tensor:
    """``r`` columns of ``down [r, in]`` (float64) chosen by column-pivoted Gram-Schmidt."""
    residual = down.clone()
    rank = down.shape[0]
    chosen = []
    for _ in range(rank):
        norms = residual.square().sum(0)
        if chosen:
            norms[torch.tensor(chosen)] = -1.0
        column = int(norms.argmax())
        chosen.append(column)
        direction = residual[:, column] / residual[:, column].norm()
        residual -= torch.outer(direction, direction @ residual)
    return torch.tensor(chosen)


def max_volume(down: torch.Tensor, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap channels until ``|A1^-1 down| <= MAX_ENTRY``; returns (channels, ``A1^-1 down``)."""
    channels = channels.clone()
    basis = torch.linalg.solve(down[:, channels], down)  # [r, in], identity on the channels
    for _ in range(MAX_SWAPS_PER_RANK * down.shape[0]):
        flat = int(basis.abs().argmax())
        row, column = divmod(flat, basis.shape[1])
        pivot = basis[row, column]
        if float(pivot.abs()) <= MAX_ENTRY:
            break
        # Channel ``column`` replaces channels[row]: Sherman-Morrison update of A1^-1 down.
        incoming = basis[:, column].clone()
        incoming[row] -= 1.0
        basis -= torch.outer(incoming, basis[row] / pivot)
        channels[row] = column
    basis = torch.linalg.solve(down[:, channels], down)  # exact again after the rank-one updates
    return channels, basis


def skip_block(factors: Factorization) -> SkippedBlock:
    """The same map as ``factors`` (float64, per group) with each group's latent re-based on ``r`` channels."""
    downs, ups, chosen, conditions, entries = [], [], [], [], []
    for down, up in zip(factors.down, factors.up):
        channels, basis = max_volume(down, pivoted_channels(down))
        block = down[:, channels]
        identity = torch.eye(len(channels), dtype=basis.dtype)
        basis[:, channels] = identity  # exactly, not to rounding
        downs.append(basis)
        ups.append(up @ block)
        chosen.append(channels)
        conditions.append(float(torch.linalg.cond(block)))
        others = torch.ones(basis.shape[1], dtype=torch.bool)
        others[channels] = False
        entries.append(float(basis[:, others].abs().max()) if bool(others.any()) else 0.0)
    return SkippedBlock(Factorization(torch.stack(downs), torch.stack(ups)), torch.stack(chosen),
                        max(conditions), max(entries))
