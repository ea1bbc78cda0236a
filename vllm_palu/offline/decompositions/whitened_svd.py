"""Whitened SVD (SVD-LLM / Palu): truncation that is optimal for ``||(W - UD) X^T||_F``.

With ``X^T X = S S^T`` (Cholesky), ``svd(W S) = U Sigma V^T`` and the rank-r factors
``up = U_r sqrt(Sigma_r)``, ``down = sqrt(Sigma_r) V_r^T S^{-1}``: the discarded singular values are exactly the
activation-weighted error.
"""

from __future__ import annotations

import torch

from vllm_palu.offline.decompositions.base import Decomposition, Factorization


def whitening_factor(gram: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Lower-triangular S with ``S S^T = gram``, robust to a singular or indefinite ``gram``.

    Too few calibration tokens, dead channels or rounding make ``X^T X`` singular. Then the eigenvalues are clamped
    to ``eps * max eigenvalue``, which keeps S well conditioned and changes the objective only in directions the
    calibration data never excites.
    """
    gram = 0.5 * (gram + gram.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(factor).all()):
        diag = factor.diagonal().abs()
        if float(diag.min()) > eps ** 0.5 * float(diag.max()):
            return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    floor = eps * float(eigenvalues.max().clamp_min(1e-30))
    repaired = (eigenvectors * eigenvalues.clamp_min(floor)) @ eigenvectors.T
    return torch.linalg.cholesky(0.5 * (repaired + repaired.T))


class WhitenedSVD(Decomposition):
    name = "whitened_svd"

    def prepare(self, gram: torch.Tensor) -> torch.Tensor:
        return whitening_factor(gram)

    def factorize(self, weight: torch.Tensor, prepared: torch.Tensor, rank: int) -> Factorization:
        factor = prepared
        u, sigma, vh = torch.linalg.svd(weight @ factor, full_matrices=False)  # batched over groups
        root = sigma[:, :rank].sqrt()
        up = u[:, :, :rank] * root[:, None, :]
        # down = sqrt(Sigma) V^T S^{-1}: solve S^T Z = V instead of inverting S.
        v_r = vh[:, :rank, :].transpose(1, 2)
        z = torch.linalg.solve_triangular(factor.T.expand(weight.shape[0], -1, -1), v_r, upper=True)
        down = root[:, :, None] * z.transpose(1, 2)
        return Factorization(down=down, up=up)
