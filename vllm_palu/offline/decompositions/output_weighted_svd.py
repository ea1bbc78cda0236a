"""Output-aware whitened SVD: the truncation that is optimal for ``||M^{1/2} (W - UD) X^T||_F``.

Whitened SVD treats every output dimension of k_proj / v_proj alike; what the model feels is the error after
attention: ``q . k`` for keys, ``W_o v`` for values (``output_gram.py`` gives the weight M per group). With
``M = L L^T`` and ``X^T X = S S^T`` (Cholesky), ``svd(L^T W S) = U Sigma V^T`` and
``up = L^{-T} U_r sqrt(Sigma_r)``, ``down = sqrt(Sigma_r) V_r^T S^{-1}``. Exact at full rank for any M; without an
M it is the whitened SVD. M is regularized by a small multiple of its mean diagonal (directions no query or
o_proj column reads would otherwise be free, and L^{-T} would blow up).
"""

from __future__ import annotations

import torch

from vllm_palu.offline.decompositions.base import Factorization
from vllm_palu.offline.decompositions.whitened_svd import WhitenedSVD

RIDGE = 1e-3  # times the mean diagonal of M


class OutputWeightedSVD(WhitenedSVD):
    name = "output_weighted_svd"
    uses_output_gram = True

    def factorize(self, weight: torch.Tensor, prepared: torch.Tensor, rank: int,
                  output_gram: torch.Tensor | None = None) -> Factorization:
        if output_gram is None:
            return super().factorize(weight, prepared, rank)
        width = weight.shape[1]
        mean_diag = output_gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        ridge = RIDGE * mean_diag[:, None, None] * torch.eye(width, dtype=weight.dtype, device=weight.device)
        lower = torch.linalg.cholesky(0.5 * (output_gram + output_gram.transpose(1, 2)) + ridge)
        inner = super().factorize(lower.transpose(1, 2) @ weight, prepared, rank)  # factors of L^T W
        # up = L^{-T} (inner up): solve L^T Y = inner.up.
        up = torch.linalg.solve_triangular(lower.transpose(1, 2), inner.up, upper=True)
        return Factorization(down=inner.down, up=up)
