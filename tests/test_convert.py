"""The converter on tiny real checkpoints: exactness at full rank, error vs ratio, the checkpoint format, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import convert_tiny, logits, relative_error
from tiny_models import ARCHITECTURES
from vllm_palu.config import PaluConfig
from vllm_palu.errors import PaluError
from vllm_palu.offline.checkpoint import load_dense_model, load_palu_model


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
@pytest.mark.parametrize("group_size", ["1", "all"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_full_rank_reproduces_original_logits(tiny_checkpoints, calib_file, tmp_path, arch, group_size,
                                              latent_layout):
    source = tiny_checkpoints[arch]
    output = convert_tiny(source, tmp_path / "palu", calib_file, kv_ratio=1.0, group_size=group_size,
                          latent_layout=latent_layout)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    dense, palu = load_dense_model(source), load_palu_model(output)
    assert relative_error(logits(palu, ids), logits(dense, ids)) < 1e-4
    config = PaluConfig.of(json.loads((output / "config.json").read_text()))
    assert config.kv_ratio == 1.0
    assert max(config.reconstruction_error["k"] + config.reconstruction_error["v"]) < 1e-6


def test_lossy_conversion_changes_logits(tiny_llama, calib_file, tmp_path):
    """Canary for the test above: a reduced rank must not reproduce the logits."""
    output = convert_tiny(tiny_llama, tmp_path / "palu", calib_file, kv_ratio=0.25)
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    assert relative_error(logits(load_palu_model(output), ids), logits(load_dense_model(tiny_llama), ids)) > 1e-3


def test_reconstruction_error_falls_as_ratio_rises(tiny_llama, calib_file, tmp_path):
    means = []
    for ratio in (0.25, 0.5, 0.75, 1.0):
        output = convert_tiny(tiny_llama, tmp_path / f"palu-{ratio}", calib_file, kv_ratio=ratio, group_size="1")
        config = PaluConfig.of(json.loads((output / "config.json").read_text()))
        errors = config.reconstruction_error["k"] + config.reconstruction_error["v"]
        means.append(sum(errors) / len(errors))
    assert means == sorted(means, reverse=True) and means[0] > means[-1] + 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_ranks_match_weight_shapes(tiny_checkpoints, calib_file, tmp_path, arch):
    output = convert_tiny(tiny_checkpoints[arch], tmp_path / "palu", calib_file, kv_ratio=0.5, k_fraction=0.25,
                          group_size="1")
    config_json = json.loads((output / "config.json").read_text())
    config = PaluConfig.of(config_json)
    assert config_json["architectures"] == [f"Palu{ARCHITECTURES[arch][1]}"]
    assert config.num_groups == 2 and config.group_width == 32
    assert config.k_ranks == [8, 8] and config.v_ranks == [24, 24]
    with safe_open(str(output / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        for layer in range(2):
            prefix = f"model.layers.{layer}.self_attn"
            for kind, rank in (("k", config.k_ranks[layer]), ("v", config.v_ranks[layer])):
                assert weights.get_slice(f"{prefix}.{kind}_proj.down.weight").get_shape() == [2 * rank, 128]
                assert weights.get_slice(f"{prefix}.{kind}_proj.up.weight").get_shape() == [2, 32, rank]
                assert (f"{prefix}.{kind}_proj.up.bias" in names) == (arch == "qwen2")
            assert f"{prefix}.k_proj.weight" not in names and f"{prefix}.q_proj.weight" in names


def test_untouched_weights_are_bit_identical(tiny_llama, calib_file, tmp_path):
    output = convert_tiny(tiny_llama, tmp_path / "palu", calib_file)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as dense, \
            safe_open(str(output / "model.safetensors"), framework="pt") as palu:
        shared = [k for k in dense.keys() if ".k_proj." not in k and ".v_proj." not in k]
        assert shared and all(torch.equal(dense.get_tensor(k), palu.get_tensor(k)) for k in shared)


def test_self_generated_calibration_is_deterministic(tiny_llama, tmp_path):
    configs = []
    for run in range(2):
        output = convert_tiny(tiny_llama, tmp_path / f"palu-{run}", calib=None, seed=7)
        configs.append(json.loads((output / "config.json").read_text())["palu"])
    assert configs[0]["calibration"]["source"] == "self-generated"
    assert configs[0]["reconstruction_error"] == configs[1]["reconstruction_error"]


def test_cli_end_to_end(tiny_llama, calib_file, tmp_path):
    output = tmp_path / "palu-cli"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_palu.convert", "--model", str(tiny_llama), "--output", str(output),
         "--kv-ratio", "0.5", "--group-size", "1", "--calib", str(calib_file), "--calib-samples", "4",
         "--calib-seq-len", "32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Palu latents" in result.stdout and f"wrote {output}" in result.stdout
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "PALU_SUMMARY.md"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["palu-cli"]  # no staging directory left behind
    config = json.loads((output / "config.json").read_text())
    assert config["palu"]["calibration"] == {"source": str(calib_file), "samples": 4, "seq_len": 32, "seed": 0,
                                             "tokens": 128}


def test_format_version_1_checkpoints_still_load(tiny_llama, calib_file, tmp_path):
    """Version 1 named the weight dtype ``latent_dtype``: such a checkpoint reads as the same PaluConfig (from the
    config.json dict and from the transformers config vLLM hands the plugin) and loads the same model."""
    from transformers import AutoConfig

    output = convert_tiny(tiny_llama, tmp_path / "palu", calib_file, kv_ratio=0.5)
    config_path = output / "config.json"
    current = json.loads(config_path.read_text())
    assert current["palu"]["format_version"] == 3 and "latent_dtype" not in current["palu"]
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    expected = logits(load_palu_model(output), ids)
    old = dict(current["palu"], format_version=1, latent_dtype=current["palu"]["weight_dtype"])
    del old["weight_dtype"]
    config_path.write_text(json.dumps({**current, "palu": old}, indent=2))
    for source in (json.loads(config_path.read_text()), AutoConfig.from_pretrained(output)):
        assert PaluConfig.of(source) == PaluConfig.of(current)
    assert torch.equal(logits(load_palu_model(output), ids), expected)


@pytest.mark.parametrize("change, message", [
    ({"format_version": 4}, "unsupported palu format_version 4 (this build reads 1, 2, 3)"),
    ({"latent_layout": "tied"}, "unknown latent layout 'tied'; choose from split, shared"),
    ({"latent_layout": "shared", "v_ranks": [16]}, "k_ranks and v_ranks must be equal"),
    ({"k_ranks": [40]}, "k rank 40 outside [1, 32]"),
    ({"weight_dtype": "int8"}, "unsupported weight_dtype 'int8'"),
    ({"colour": "blue"}, "malformed palu config section")])
def test_unreadable_palu_sections(change, message):
    section = {"base_architecture": "LlamaForCausalLM", "num_kv_heads": 2, "head_dim": 32, "group_size": 1,
               "k_ranks": [8], "v_ranks": [8], "format_version": 3}
    PaluConfig.of({"palu": section})  # the section itself is readable
    with pytest.raises(PaluError, match=re.escape(message)):
        PaluConfig.of({"palu": {**section, **change}})


def test_shared_layout_checkpoint(tiny_checkpoints, calib_file, tmp_path):
    """One latent per group from [key_weight * W_k; W_v]: k_proj holds the down-projection, v_proj only an
    up-projection; each layer's K + V budget becomes the shared rank, so at kv-ratio 0.5 the cache holds as many
    values as the split layout's, and the K/V weighting moves error from the keys to the values."""
    source = tiny_checkpoints["qwen2"]  # k/v biases: on the up-projections
    errors = {}
    for weight in (1.0, 0.25):
        output = convert_tiny(source, tmp_path / f"shared-{weight}", calib_file, kv_ratio=0.5, group_size="1",
                              latent_layout="shared", key_weight=weight)
        config = PaluConfig.of(json.loads((output / "config.json").read_text()))
        assert config.latent_layout == "shared" and config.k_ranks == config.v_ranks == [32, 32]
        assert config.kv_ratio == 0.5 and config.method["key_weight"] == weight
        with safe_open(str(output / "model.safetensors"), framework="pt") as weights:
            prefix = "model.layers.0.self_attn"
            assert weights.get_slice(f"{prefix}.k_proj.down.weight").get_shape() == [2 * 32, 128]
            for kind in "kv":
                assert weights.get_slice(f"{prefix}.{kind}_proj.up.weight").get_shape() == [2, 32, 32]
                assert f"{prefix}.{kind}_proj.up.bias" in weights.keys()
            assert f"{prefix}.v_proj.down.weight" not in weights.keys()
        errors[weight] = config.reconstruction_error
    assert errors[0.25]["k"][0] > errors[1.0]["k"][0] and errors[0.25]["v"][0] < errors[1.0]["v"][0]


def test_block_skip_is_an_exact_change_of_basis(tiny_llama, calib_file, tmp_path):
    """SkipCat's block skipping: each group's down-projection is the identity on r input channels (the latent is
    x_P1 + A' x_P2, |A'| <= 1.05 after the max-volume swaps), and the model computes what it did without it."""
    from vllm_palu.offline.block_skip import MAX_ENTRY

    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    outputs = {}
    for skip in (False, True):
        output = convert_tiny(tiny_llama, tmp_path / f"skip-{skip}", calib_file, kv_ratio=0.5,
                              latent_layout="shared", block_skip=skip)
        outputs[skip] = output
    plain, skipped = load_palu_model(outputs[False]), load_palu_model(outputs[True])
    assert relative_error(logits(skipped, ids), logits(plain, ids)) < 1e-5
    config = PaluConfig.of(json.loads((outputs[True] / "config.json").read_text()))
    assert len(config.method["block_skip_condition"]) == 2 and min(config.method["block_skip_condition"]) >= 1
    columns = skipped.model.layers[1].self_attn.k_proj.down.weight.detach().T  # [in, r]: one group (joint)
    unit = ((columns == 0) | (columns == 1)).all(1) & ((columns == 1).sum(1) == 1)
    assert sorted(columns[unit].argmax(1).tolist()) == list(range(config.k_ranks[1]))  # a permuted identity
    assert float(columns.abs().max()) <= MAX_ENTRY
    assert not torch.equal(plain.model.layers[1].self_attn.k_proj.down.weight, skipped.model.layers[1].self_attn
                           .k_proj.down.weight)


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
def test_refinement_lowers_the_attention_error(tiny_llama, calib_file, tmp_path, latent_layout):
    """--refine-steps fits the factors to the original attention output on the calibration batches: the recorded
    attention error falls clearly below the SVD factors' in every layer, and the checkpoint holds the refined
    factors (whether that pays on real text is measured on SmolLM2: docs/RESULTS.md)."""
    outputs = {steps: convert_tiny(tiny_llama, tmp_path / f"refine-{steps}", calib_file, kv_ratio=0.5,
                                   latent_layout=latent_layout, refine_steps=steps) for steps in (0, 30)}
    config = PaluConfig.of(json.loads((outputs[30] / "config.json").read_text()))
    errors = config.reconstruction_error
    assert config.method["refine_steps"] == 30 and len(errors["attention"]) == 2
    assert all(after < 0.95 * before for before, after in zip(errors["attention_svd"], errors["attention"]))
    assert "attention" not in PaluConfig.of(json.loads((outputs[0] / "config.json").read_text())).reconstruction_error
    models = {steps: load_palu_model(outputs[steps]) for steps in outputs}
    refined, plain = (models[steps].model.layers[0].self_attn.k_proj.down.weight for steps in (30, 0))
    assert not torch.equal(refined, plain)
