"""Orthogonal rotations folded into each group's latent space (``--latent-rotation``), for quantized latents.

An SVD latent puts most of its energy in its first dimensions, so one per-token scale wastes the quantization
grid on the small ones. Rotating the latent by an orthogonal R spreads the energy over all dimensions at zero
runtime cost: down' = R @ down (latent' = R latent) and up' = up @ R^T, exact in full precision since R^T R = I.

- ``hadamard``: the normalized Walsh-Hadamard matrix when the rank is a power of two; a rank 2^k * m with odd
  m > 1 (e.g. 48 = 16 * 3) uses H_{2^k} kron Q_m, Q_m a seeded random orthogonal m x m matrix, so that every
  output dimension still mixes every input dimension.
- ``random``: a seeded random orthogonal r x r matrix (QR of a Gaussian), any rank.
Seeds are fixed per rank (not per layer): the result depends only on the rank.

Not the converter's default: on SmolLM2 (docs/RESULTS.md, "Latent rotation") ``hadamard`` changed int4 latents'
perplexity by -0.18 (kv-ratio 0.5), +0.05 (0.375, rank 48 = H16 kron Q3) and -0.10 (0.25), although it cuts the K/V
error int4 adds by 17% at 0.5: too small and not consistent to change every checkpoint for.
"""

from __future__ import annotations

import torch

from vllm_palu.config import LATENT_ROTATIONS as ROTATIONS


def walsh_hadamard(size: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix, ``size`` a power of two (float64, orthogonal and symmetric)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix / size ** 0.5


def random_orthogonal(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()  # Haar-distributed, deterministic signs


def rotation_matrix(kind: str, rank: int) -> torch.Tensor:
    """The ``rank x rank`` orthogonal matrix R (float64) of a rotation kind; identity for ``none``."""
    if kind == "none":
        return torch.eye(rank, dtype=torch.float64)
    if kind == "random":
        return random_orthogonal(rank)
    if kind == "hadamard":
        power = rank & -rank  # largest power of two dividing the rank
        odd = rank // power
        hadamard = walsh_hadamard(power)
        return hadamard if odd == 1 else torch.kron(hadamard, random_orthogonal(odd))
    raise ValueError(f"unknown rotation {kind!r}; choose from {', '.join(ROTATIONS)}")


def rotate_factors(down: torch.Tensor, up: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group factors ``down [G, r, in]``, ``up [G, out, r]`` -> the same map with a rotated latent."""
    rotation = rotation_matrix(kind, down.shape[1]).to(down.dtype)
    return torch.einsum("ij,gjk->gik", rotation, down), torch.einsum("goj,ij->goi", up, rotation)
