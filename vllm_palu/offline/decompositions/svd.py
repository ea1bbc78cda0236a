"""Plain truncated SVD of the weight, ignoring activations: the baseline that shows why whitening matters."""

from __future__ import annotations

import torch

from vllm_palu.offline.decompositions.base import Decomposition, Factorization


class PlainSVD(Decomposition):
    name = "svd"

    def factorize(self, weight: torch.Tensor, prepared: None, rank: int) -> Factorization:
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        root = sigma[:, :rank].sqrt()
        return Factorization(down=root[:, :, None] * vh[:, :rank, :], up=u[:, :, :rank] * root[:, None, :])
