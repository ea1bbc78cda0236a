"""Every bad converter input gets a one-line error, a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_palu import convert as convert_cli
from vllm_palu.offline import converter


def run_cli(capsys, source: Path, output: Path, *extra: str, calib: Path | None = None) -> tuple[int, str]:
    argv = ["--model", str(source), "--output", str(output), "--calib-samples", "4", "--calib-seq-len", "32",
            "--batch-size", "2", *extra]
    if calib is not None:
        argv += ["--calib", str(calib)]
    code = convert_cli.main(argv)
    # Progress bars may precede it on stderr; the error is the last line, and only that one.
    lines = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) <= 1
    return code, lines[-1] if lines else ""


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_weights(checkpoint: Path, edit) -> None:
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def assert_nothing_written(workdir: Path, expected: set[str]) -> None:
    assert {p.name for p in workdir.iterdir()} == expected, "output or staging directory left behind"


def _missing(tmp, tiny):
    return tmp / "does-not-exist", "checkpoint directory not found"


def _bad_json(tmp, tiny):
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")
    (ckpt / "config.json").write_text("{ not json")
    return ckpt, "is not valid JSON"


def _truncated_weights(tmp, tiny):
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ckpt, "cannot load checkpoint"


def _missing_weight(tmp, tiny):
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")
    edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    return ckpt, "missing weights"


def _unsupported_arch(tmp, tiny):
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, "unsupported architecture ['GPT2LMHeadModel']; supported: LlamaForCausalLM, MistralForCausalLM"


def _nan_weights(tmp, tiny):
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")
    edit_weights(ckpt, lambda t: t["model.layers.0.self_attn.v_proj.weight"].__setitem__((0, 0), float("nan")))
    return ckpt, "weight model.layers.0.self_attn.v_proj.weight contains NaN or Inf"


def _overflowing_activations(tmp, tiny):
    """Finite weights whose layer-0 MLP overflows float32: layer 1's k/v input is NaN."""
    ckpt = copy_checkpoint(tiny, tmp / "ckpt")

    def blow_up(tensors):
        tensors["model.layers.0.mlp.gate_proj.weight"].fill_(1e20)
        tensors["model.layers.0.mlp.up_proj.weight"].fill_(1e20)
    edit_weights(ckpt, blow_up)
    return ckpt, "layer 1: calibration activations contain NaN or Inf"


@pytest.mark.parametrize("make_case", [_missing, _bad_json, _truncated_weights, _missing_weight, _unsupported_arch,
                                       _nan_weights, _overflowing_activations])
def test_bad_checkpoint(capsys, tmp_path, tiny_llama, calib_file, make_case):
    source, message = make_case(tmp_path, tiny_llama)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = run_cli(capsys, source, tmp_path / "out", calib=calib_file)
    assert code == 2 and err.startswith("error: ") and message in err
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("extra, message", [
    (["--kv-ratio", "0"], "--kv-ratio must be in (0, 1], got 0.0"),
    (["--kv-ratio", "1.5"], "--kv-ratio must be in (0, 1], got 1.5"),
    (["--k-fraction", "1"], "--k-fraction must be in (0, 1)"),
    (["--group-size", "3"], "--group-size 3 must divide the model's 2 KV heads"),
    (["--group-size", "two"], "--group-size must be a positive integer, 'all' or 'auto', got 'two'"),
    (["--rank-alloc", "magic"], "unknown --rank-alloc 'magic'"),
    (["--decomposition", "magic"], "unknown --decomposition 'magic'"),
    (["--latent-rotation", "magic"], "unknown --latent-rotation 'magic'; choose from none, hadamard, random"),
    (["--latent-layout", "tied"], "unknown latent layout 'tied'; choose from split, shared"),
    (["--latent-layout", "shared", "--key-weight", "0"], "--key-weight must be positive, got 0.0"),
    (["--block-skip", "--latent-rotation", "hadamard"], "--block-skip re-bases each latent on input channels"),
    (["--refine-steps", "-1"], "--refine-steps must be >= 0, got -1"),
    (["--device", "cuda"], "no CUDA device available"),
    (["--calib-seq-len", "4096"], "calibration text too short"),
])
def test_bad_options(capsys, tmp_path, tiny_llama, calib_file, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, err = run_cli(capsys, tiny_llama, tmp_path / "out", *extra, calib=calib_file)
    assert code == 2 and err.startswith("error: ") and message in err
    assert_nothing_written(tmp_path, set())


def test_missing_calibration_file(capsys, tmp_path, tiny_llama):
    code, err = run_cli(capsys, tiny_llama, tmp_path / "out", calib=tmp_path / "nope.txt")
    assert code == 2 and "calibration file not found" in err


def test_existing_output_needs_force(capsys, tmp_path, tiny_llama, calib_file):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, tiny_llama, output, calib=calib_file)
    assert code == 2 and "already exists (pass --force" in err
    assert (output / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, tiny_llama, output, "--force", calib=calib_file)
    assert code == 0 and (output / "config.json").is_file() and not (output / "keep.txt").exists()
    assert_nothing_written(tmp_path, {"out"})


@pytest.mark.parametrize("output", ["/proc/vllm-palu-out", "/nonexistent-dir/vllm-palu-out"])
def test_unwritable_output(capsys, tiny_llama, calib_file, output):
    code, err = run_cli(capsys, tiny_llama, Path(output), calib=calib_file)
    assert code == 2 and ("not writable" in err or "does not exist" in err), err


@pytest.mark.parametrize("stage", ["decompose_model", "copy_auxiliary_files"])
def test_interrupted_run_leaves_nothing(capsys, monkeypatch, tmp_path, tiny_llama, calib_file, stage):
    """Ctrl-C after the real work of a stage (for copy_auxiliary_files: after the weights were written)."""
    real = getattr(converter, stage)

    def then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(converter, stage, then_interrupt)
    workdir = tmp_path / "work"
    workdir.mkdir()
    code, err = run_cli(capsys, tiny_llama, workdir / "out", calib=calib_file)
    assert code == 130 and "interrupted" in err
    assert_nothing_written(workdir, set())
