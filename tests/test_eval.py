"""Perplexity and the simulated dense KV-quantization baselines."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from helpers import convert_tiny
from vllm_palu.offline.checkpoint import load_dense_model
from vllm_palu.offline.kv_quant import bytes_vs_bf16, fake_quant, set_kv_quant
from vllm_palu.offline.perplexity import perplexity, tokenize_file


def test_perplexity_matches_transformers_loss(tiny_llama, calib_file):
    model = load_dense_model(tiny_llama)
    ids = tokenize_file(AutoTokenizer.from_pretrained(tiny_llama), calib_file, max_tokens=128)
    result = perplexity(model, ids, seq_len=64)
    with torch.no_grad():
        losses = [float(model(ids[i * 64:(i + 1) * 64][None], labels=ids[i * 64:(i + 1) * 64][None]).loss)
                  for i in range(2)]
    assert result.windows == 2 and result.scored_tokens == 126
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)


@pytest.mark.parametrize("mode, max_error", [("int8", 0.01), ("fp8", 0.07), ("int4", 0.15), ("int2", 0.7)])
def test_fake_quant_error_per_vector(mode, max_error):
    x = torch.randn(64, 8, 64, generator=torch.Generator().manual_seed(0))
    error = float(((fake_quant(x, mode) - x).norm(dim=-1) / x.norm(dim=-1)).max())
    assert 0 < error < max_error


def test_quantized_values_lie_on_the_grid():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    assert all(len(torch.unique(row)) <= 16 for row in fake_quant(x, "int4"))


def test_bytes_include_scales():
    assert bytes_vs_bf16("int8", 64) == pytest.approx(0.53125)
    assert bytes_vs_bf16("int4", 64) == pytest.approx(0.28125)
    assert bytes_vs_bf16("fp8", 64) == pytest.approx(0.515625)


def test_kv_quant_changes_attention(tiny_llama):
    model = load_dense_model(tiny_llama)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        set_kv_quant(model, "int8")
        int8 = model(ids).logits
        set_kv_quant(model, "int2")
        int2 = model(ids).logits
        set_kv_quant(model, "none")
        again = model(ids).logits
    assert torch.allclose(again, reference, atol=1e-5)
    error8, error2 = float((int8 - reference).norm()), float((int2 - reference).norm())
    assert 0 < error8 < error2


def test_ppl_cli(tiny_llama, calib_file, tmp_path):
    palu = convert_tiny(tiny_llama, tmp_path / "palu", calib_file, kv_ratio=0.5)
    out = tmp_path / "ppl.json"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_palu.eval", "ppl", "--model", str(tiny_llama), "--model", str(palu),
         "--data", str(calib_file), "--seq-len", "64", "--max-tokens", "256", "--kv-quant", "none,int4",
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    # head_dim 32: int4 = (32*4 + 32 scale bits) / (32*16); the tiny checkpoint is fp32, so are its latents.
    assert [(r["kv_quant"], r["latent_format"], r["kv_bytes_vs_bf16"]) for r in rows] == [
        ("none", None, 1.0), ("int4", None, 0.3125), (None, "auto", 1.0)]
    assert all(r["windows"] == 4 and r["ppl"] > 1 for r in rows)
    assert "| kv int4 |" in result.stdout and f"| {palu} | reference | latents auto |" in result.stdout


def test_ppl_cli_text_too_short(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    result = subprocess.run([sys.executable, "-m", "vllm_palu.eval", "ppl", "--model", str(tiny_llama),
                             "--data", str(short), "--seq-len", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "evaluation text too short" in result.stderr.strip().splitlines()[-1]


def test_ppl_cli_latent_format(tiny_llama, calib_file, tmp_path):
    """Palu models evaluated with fp8 / int4 latents; bytes vs bf16 count the inline fp16 scales."""
    palu = convert_tiny(tiny_llama, tmp_path / "palu", calib_file, kv_ratio=0.5)  # 1 group, 64 latents/layer
    out = tmp_path / "ppl.json"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_palu.eval", "ppl", "--model", str(palu), "--data", str(calib_file),
         "--seq-len", "64", "--max-tokens", "256", "--latent-format", "auto,fp8,int4", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["latent_format"]: r for r in json.loads(out.read_text())}
    # per layer and token: dense bf16 2 heads x (32 + 32) x 2 = 256 bytes; fp8 64 + 4; int4 32 + 8; auto: fp32
    assert {mode: r["kv_bytes_vs_bf16"] for mode, r in rows.items()} == {"auto": 1.0, "fp8": 0.2656,
                                                                         "int4": 0.1562}
    assert rows["auto"]["ppl"] != rows["fp8"]["ppl"] != rows["int4"]["ppl"]


def test_ppl_cli_unknown_latent_format(tiny_llama, calib_file, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vllm_palu.eval", "ppl", "--model", str(tiny_llama), "--data",
                             str(calib_file), "--latent-format", "int3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown latent format 'int3'; choose from auto, fp8, int4" in result.stderr.strip().splitlines()[-1]
