"""Bad serving configurations: `vllm serve` refuses to start, with a clear message, and never serves."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import convert_tiny
from server import failed_start

ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--block-size", "32")


@pytest.fixture(scope="module")
def joint_palu(tiny_llama, calib_file, tmp_path_factory):
    return convert_tiny(tiny_llama, tmp_path_factory.mktemp("startup") / "palu-joint", calib_file, kv_ratio=0.5)


@pytest.fixture(scope="module")
def odd_rank_palu(tiny_llama, calib_file, tmp_path_factory):
    """Ranks 19 / 45 (--rank-multiple 1): fp8 can store them (sum even), int4 cannot pack them."""
    return convert_tiny(tiny_llama, tmp_path_factory.mktemp("startup") / "palu-odd", calib_file, kv_ratio=0.5,
                        k_fraction=0.3, rank_multiple=1)


def test_dense_model_with_palu_backend(tiny_llama):
    code, output = failed_start(tiny_llama, "--attention-backend", "PALU", *ARGS)
    assert code != 0 and "the PALU attention backend serves Palu checkpoints only" in output


@pytest.mark.parametrize("flags, message", [
    (("--attention-backend", "FLEX_ATTENTION"), "a Palu checkpoint caches latents and needs the PALU backend"),
    (("--kv-cache-dtype", "fp8_e5m2"), "--kv-cache-dtype fp8_e5m2 is not supported with Palu latents; "
                                        "supported: auto, float16, bfloat16, fp8, fp8_e4m3"),
    (("--kv-cache-dtype", "int8_per_token_head"), "--kv-cache-dtype int8_per_token_head is not supported"),
    (("--tensor-parallel-size", "2"), "tensor parallel size 2 does not divide the checkpoint's 1 latent group(s)"),
])
def test_palu_model_with_unsupported_settings(joint_palu, flags, message):
    code, output = failed_start(joint_palu, *flags, *ARGS)
    assert code != 0 and message in output


def test_int4_latents_with_odd_ranks(odd_rank_palu):
    config = json.loads((odd_rank_palu / "config.json").read_text())["palu"]
    assert (config["k_ranks"][0], config["v_ranks"][0]) == (19, 45)
    code, output = failed_start(odd_rank_palu, "--kv-cache-dtype", "int4_per_token_head", *ARGS)
    assert code != 0 and ("--kv-cache-dtype int4_per_token_head: this checkpoint's layer 0: int4 latents pack two "
                          "codes a byte and need even ranks, got rank_k 19, rank_v 45") in output


def test_palu_section_disagreeing_with_weights(joint_palu, tmp_path):
    broken = shutil.copytree(joint_palu, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["palu"]["k_ranks"][1] += 8
    (broken / "config.json").write_text(json.dumps(config))
    code, output = failed_start(broken, *ARGS)
    assert code != 0 and "does not match its palu config: layer 1: self_attn.k_proj.down.weight has shape" in output


def test_split_checkpoint_labelled_shared(joint_palu, tmp_path):
    """A shared latent is one latent for K and V: a section claiming the shared layout with different K and V
    ranks is refused before any weight is read."""
    broken = shutil.copytree(joint_palu, tmp_path / "relabelled")
    config = json.loads((broken / "config.json").read_text())
    config["palu"]["latent_layout"] = "shared"
    (broken / "config.json").write_text(json.dumps(config))
    code, output = failed_start(broken, *ARGS)
    assert code != 0 and "a shared latent is both the K and the V latent: k_ranks and v_ranks must be equal" in output
