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


def output_gram(seed: int) -> torch.Tensor:
    """A PSD output weight per group, far from the identity (a few output directions matter much more)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(GROUPS, WIDTH, WIDTH, generator=generator, dtype=torch.float64)
    a = a * torch.logspace(0, 1, WIDTH, dtype=torch.float64)[:, None]
    return a @ a.transpose(1, 2)


def test_full_rank_is_exact_with_an_output_gram(method):
    weight, gram = problem(5)
    factors = method.factorize(weight, method.prepare(gram), WIDTH, output_gram(5))
    assert torch.allclose(factors.up @ factors.down, weight, atol=1e-8)


def test_output_weighting_lowers_the_weighted_error():
    """Optimal for ||M^1/2 (W - UD) X^T||: below the whitened SVD on that error, above it on the unweighted one."""
    weight, gram = problem(6)
    m = output_gram(6)
    weighted, whitened = DECOMPOSITIONS["output_weighted_svd"](), WhitenedSVD()

    def weighted_error(factors):
        residual = weight - factors.up @ factors.down
        return float(torch.einsum("gpo,goi,ij,gpj->", m, residual, gram, residual))

    for rank in (4, 8):
        ours = weighted.factorize(weight, weighted.prepare(gram), rank, m)
        base = whitened.factorize(weight, whitened.prepare(gram), rank)
        assert weighted_error(ours) < weighted_error(base)
        assert relative_error(weight, ours, gram) > relative_error(weight, base, gram)


def test_output_grams_of_an_attention_layer(tiny_llama):
    """Key weights: diagonal, equal within each rotate-half pair; value weights: sum of the o_proj blocks."""
    from vllm_palu.offline.checkpoint import load_dense_model
    from vllm_palu.offline.decompositions.output_gram import output_grams

    attention = load_dense_model(tiny_llama).model.layers[0].self_attn
    x = torch.randn(50, attention.q_proj.in_features, dtype=torch.float64)
    grams = output_grams(attention, x.T @ x, num_groups=2)
    assert grams["k"].shape == grams["v"].shape == (2, 32, 32)
    key = grams["k"][0]
    assert torch.equal(key, torch.diag(key.diagonal())) and torch.allclose(key.diagonal()[:16], key.diagonal()[16:])
    w_o = attention.o_proj.weight.detach().double()
    blocks = [w_o[:, j * 32:(j + 1) * 32] for j in (0, 1)]  # query heads 0 and 1 read KV head 0
    assert torch.allclose(grams["v"][0], sum(b.T @ b for b in blocks))
