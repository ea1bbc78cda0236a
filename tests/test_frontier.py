"""``python -m vllm_palu.eval frontier`` on a tiny model: rows, outputs, the cache, quantized latent points."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_palu.errors import PaluError
from vllm_palu.offline import frontier
from vllm_palu.offline.frontier import FrontierOptions, run_frontier


def options(tiny_llama, calib_file, tmp_path, **overrides) -> FrontierOptions:
    settings = dict(model=str(tiny_llama), data=str(calib_file), calib=str(calib_file), output=tmp_path / "out",
                    cache_dir=tmp_path / "cache", allocations=["uniform", "flrc"], kv_ratios=[0.5, 0.25],
                    kv_quants=["none", "int4"], seq_len=64, max_tokens=256, calib_samples=4, calib_seq_len=32)
    settings.update(overrides)
    return FrontierOptions(**settings)


def test_frontier_rows_outputs_and_cache(tiny_llama, calib_file, tmp_path, monkeypatch):
    rows = run_frontier(options(tiny_llama, calib_file, tmp_path))
    assert [(r["kind"], r["allocation"], r["kv_ratio"], r["kv_quant"]) for r in rows] == [
        ("dense", None, None, "none"), ("dense", None, None, "int4"),
        ("palu", "uniform", 0.5, None), ("palu", "flrc", 0.5, None),
        ("palu", "uniform", 0.25, None), ("palu", "flrc", 0.25, None)]
    for row in rows:
        assert row["ppl"] > 1 and row["scored_tokens"] == 4 * 63
    palu = {(r["allocation"], r["kv_ratio"]): r for r in rows if r["kind"] == "palu"}
    assert palu[("flrc", 0.25)]["kv_bytes_vs_bf16"] == pytest.approx(0.5, abs=0.07)  # fp32 latents: 2x bf16
    out = tmp_path / "out"
    assert json.loads((out / "frontier.json").read_text()) == rows
    assert "| original |" in (out / "frontier.md").read_text()
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    # A second run recomputes nothing: conversions and perplexities come from the cache.
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached point")

    monkeypatch.setattr(frontier, "_evaluate", fail)
    monkeypatch.setattr("vllm_palu.offline.converter.convert", fail)
    assert [r["ppl"] for r in run_frontier(options(tiny_llama, calib_file, tmp_path))] == [r["ppl"] for r in rows]


def test_quantized_latent_points_count_their_scales(tiny_llama, calib_file, tmp_path):
    rows = run_frontier(options(tiny_llama, calib_file, tmp_path, allocations=["uniform"], kv_ratios=[0.5],
                                kv_quants=["none"], latent_formats=["auto", "fp8", "int4"]))
    points = {r["latent_format"]: r for r in rows if r["kind"] == "palu"}
    # per layer and token: dense bf16 2 heads x (32 + 32) x 2 = 256 bytes; one group of 64 latents:
    # fp8 64 + 4 scale bytes, int4 32 + 8
    assert (points["fp8"]["kv_bytes_vs_bf16"], points["int4"]["kv_bytes_vs_bf16"]) == (0.2656, 0.1562)
    assert points["auto"]["ppl"] != points["fp8"]["ppl"] != points["int4"]["ppl"]
    assert points["int4"]["label"] == "Palu uniform + int4 latents"


@pytest.mark.parametrize("override, message", [({"allocations": ["magic"]}, "unknown allocation 'magic'"),
                                               ({"latent_formats": ["int3"]}, "unknown latent format 'int3'"),
                                               ({"kv_quants": ["int5"]}, "unknown KV quantization 'int5'"),
                                               ({"kv_ratios": [1.5]}, "kv-ratio 1.5 outside")])
def test_bad_frontier_options(tiny_llama, calib_file, tmp_path, override, message):
    with pytest.raises(PaluError, match=message):
        run_frontier(options(tiny_llama, calib_file, tmp_path, **override))


def test_frontier_cli(tiny_llama, calib_file, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vllm_palu.eval", "frontier", "--model", str(tiny_llama),
                             "--data", str(calib_file), "--calib", str(calib_file), "--output", str(tmp_path),
                             "--rank-alloc", "fisher", "--kv-ratio", "0.5", "--kv-quant", "none", "--seq-len", "64",
                             "--max-tokens", "128", "--calib-samples", "4", "--calib-seq-len", "32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Palu fisher" in result.stdout and (tmp_path / "frontier.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "vllm_palu.eval", "frontier", "--model", str(tiny_llama),
                          "--data", str(calib_file), "--kv-ratio", "half"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --kv-ratio must be a comma list of numbers, got 'half'"]


def test_latent_layouts_are_points_of_the_sweep(tiny_llama, calib_file, tmp_path):
    """Split and shared checkpoints at the same kv-ratio: the same KV bytes, their own perplexity, and the
    shared latent's key rebuild works on the whole latent (2 r g d FLOPs per token and layer)."""
    rows = run_frontier(options(tiny_llama, calib_file, tmp_path, allocations=["uniform"], kv_ratios=[0.5],
                                kv_quants=["none"], latent_layouts=["split", "shared"], key_weight=0.5))
    split, shared = (r for r in rows if r["kind"] == "palu")
    assert (split["latent_layout"], shared["latent_layout"]) == ("split", "shared")
    assert split["kv_bytes_vs_bf16"] == shared["kv_bytes_vs_bf16"] and split["ppl"] != shared["ppl"]
    assert shared["label"] == "Palu uniform shared" and shared["k_ranks"] == shared["v_ranks"] == [64, 64]
    # tiny model: 2 KV heads of 32 dims in one group; split keys rank 24 (k-fraction), shared rank 64
    assert (split["key_rebuild_flops"], shared["key_rebuild_flops"]) == (2 * 24 * 2 * 32, 2 * 64 * 2 * 32)
    assert "-shared-kw0.5" in shared["checkpoint"]
