"""One test matrix for every decomposition method (``vllm_palu.offline.decompositions``)."""

from __future__ import annotations

import pytest
import torch

from vllm_palu.offline.decompositions import DECOMPOSITIONS, WhitenedSVD, relative_error
from vllm_palu.offline.decompositions.whitened_svd import whitening_factor

GROUPS, WIDTH, FEATURES = 3, 16, 40


def problem(seed: int, tokens: int = 400):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(GROUPS, WIDTH, FEATURES, generator=generator, dtype=torch.float64)
    # Anisotropic activations, as in real models (a few large channels).
    scales = torch.logspace(0, 2, FEATURES, dtype=torch.float64)
    x = torch.randn(tokens, FEATURES, generator=generator, dtype=torch.float64) * scales
    return weight, x.T @ x


@pytest.fixture(params=sorted(DECOMPOSITIONS))
def method(request):
    return DECOMPOSITIONS[request.param]()


def test_full_rank_is_exact(method):
    weight, gram = problem(0)
    factors = method.factorize(weight, method.prepare(gram), WIDTH)
    assert factors.down.shape == (GROUPS, WIDTH, FEATURES) and factors.up.shape == (GROUPS, WIDTH, WIDTH)
    assert torch.allclose(factors.up @ factors.down, weight, atol=1e-9)
    assert relative_error(weight, factors, gram) < 1e-9


def test_error_falls_with_rank(method):
    weight, gram = problem(1)
    prepared = method.prepare(gram)
    errors = [relative_error(weight, method.factorize(weight, prepared, rank), gram) for rank in (2, 4, 8, 12, 16)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 and errors[-1] < 1e-9


def test_shapes_at_reduced_rank(method):
    weight, gram = problem(2)
    factors = method.factorize(weight, method.prepare(gram), 5)
    assert factors.down.shape == (GROUPS, 5, FEATURES) and factors.up.shape == (GROUPS, WIDTH, 5)


def test_singular_gram_is_handled(method):
    """Fewer calibration tokens than features: X^T X is singular; full rank must still be exact."""
    weight, gram = problem(3, tokens=10)
    factors = method.factorize(weight, method.prepare(gram), WIDTH)
    assert torch.isfinite(factors.down).all() and torch.allclose(factors.up @ factors.down, weight, atol=1e-6)


def test_whitening_beats_plain_svd_on_activations():
    weight, gram = problem(4)
    plain = DECOMPOSITIONS["svd"]()
    whitened = WhitenedSVD()
    for rank in (4, 8):
        assert (relative_error(weight, whitened.factorize(weight, whitened.prepare(gram), rank), gram)
                < relative_error(weight, plain.factorize(weight, None, rank), gram))


def test_whitening_factor_fallback_on_indefinite_matrix():
    gram = torch.diag(torch.tensor([4.0, 1.0, -1e-9, 0.0], dtype=torch.float64))
    factor = whitening_factor(gram)
    assert torch.isfinite(factor).all()
    assert torch.allclose(factor @ factor.T, gram.clamp_min(0), atol=1e-5)
