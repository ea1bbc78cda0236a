"""The converter's latent rotation: orthogonal, exact at full precision, recorded in the palu config; and the
reference model's fake-quantized latents."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import convert_tiny, logits, relative_error
from vllm_palu.offline.checkpoint import load_palu_model
from vllm_palu.offline.rotation import rotate_factors, rotation_matrix


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("rank", [8, 16, 24, 48, 64, 40])
def test_rotation_is_orthogonal_and_mixes(kind, rank):
    matrix = rotation_matrix(kind, rank)
    assert torch.allclose(matrix @ matrix.T, torch.eye(rank, dtype=torch.float64), atol=1e-12)
    # Every latent dimension is spread over all of them (no identity blocks).
    assert int((matrix.abs() > 1e-9).sum()) > rank * rank * 0.9
    assert torch.equal(matrix, rotation_matrix(kind, rank))  # deterministic


def test_power_of_two_hadamard_is_walsh_hadamard():
    matrix = rotation_matrix("hadamard", 16)
    assert torch.allclose(matrix.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))


def test_rotated_factors_compute_the_same_map():
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 24, 32, generator=generator).double(), torch.randn(2, 40, 24, generator=generator).double()
    new_down, new_up = rotate_factors(down, up, "hadamard")
    assert torch.allclose(new_up @ new_down, up @ down, atol=1e-10)
    assert not torch.allclose(new_down, down)


@pytest.fixture(scope="module")
def rotated_pair(tiny_llama, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    plain = convert_tiny(tiny_llama, root / "plain", calib_file, kv_ratio=0.75, group_size="all")  # default: none
    rotated = convert_tiny(tiny_llama, root / "rotated", calib_file, kv_ratio=0.75, group_size="all",
                           latent_rotation="hadamard")
    return plain, rotated


def test_rotation_leaves_fp32_logits_unchanged_and_is_recorded(rotated_pair):
    plain, rotated = rotated_pair
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    plain_model, rotated_model = load_palu_model(plain), load_palu_model(rotated)
    assert relative_error(logits(rotated_model, ids), logits(plain_model, ids)) < 1e-5
    # The latents themselves differ (canary): the rotation really was folded in.
    first = rotated_model.model.layers[0].self_attn.k_proj.down.weight
    assert not torch.allclose(first, plain_model.model.layers[0].self_attn.k_proj.down.weight, atol=1e-3)
    assert json.loads((rotated / "config.json").read_text())["palu"]["rotation"] == "hadamard"
    assert json.loads((plain / "config.json").read_text())["palu"]["rotation"] == "none"


def test_reference_latent_quantization_changes_logits_by_precision(rotated_pair):
    plain, _ = rotated_pair
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    exact = logits(load_palu_model(plain), ids)
    errors = {latent_format: relative_error(logits(load_palu_model(plain, latent_format=latent_format), ids), exact)
              for latent_format in ("fp8", "int4")}
    assert 0 < errors["fp8"] < errors["int4"] < 0.5
