"""Quantized latent cache rows (fp8 e4m3, int4), split and shared: round trips, exact byte layout, agreement with fake
quantization."""

from __future__ import annotations

import re

import pytest
import torch

from vllm_palu.attention.latent_quant import (check_ranks, dequantize_rows, fake_quant_latent, page_views,
                                              pages_to_rows, quantize_rows, rank_v_of_row, row_bytes, rows_to_pages,
                                              scale_bytes)


def latents(tokens=64, groups=3, rank_k=24, rank_v=40, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    # Decaying per-dimension magnitudes, as SVD latents have, plus an offset so int4's minimum matters.
    k = torch.randn(tokens, groups, rank_k, generator=generator) * torch.linspace(4, 0.1, rank_k) + 0.3
    v = torch.randn(tokens, groups, rank_v, generator=generator) * torch.linspace(2, 0.05, rank_v) - 0.2
    return k.to(dtype), v.to(dtype)


def test_row_bytes_count_scales():
    assert row_bytes(64, 128, "auto") == 384 and row_bytes(64, 128, "auto", dtype_bytes=4) == 768
    assert row_bytes(64, 128, "fp8") == 64 + 128 + 4
    assert row_bytes(64, 128, "int4") == 96 + 8
    assert rank_v_of_row(row_bytes(24, 40, "fp8"), 24, "fp8") == 40
    assert rank_v_of_row(row_bytes(24, 40, "int4"), 24, "int4") == 40


@pytest.mark.parametrize("rank_k, rank_v, latent_format, problem", [
    (7, 8, "fp8", "rank_k + rank_v even"), (6, 9, "int4", "need even ranks"), (8, 8, "int3", "unknown latent")])
def test_unsupported_ranks(rank_k, rank_v, latent_format, problem):
    assert problem in check_ranks(rank_k, rank_v, latent_format)
    with pytest.raises(ValueError, match=re.escape(problem)):
        row_bytes(rank_k, rank_v, latent_format)
    assert check_ranks(8, 8, "int4") is None and check_ranks(7, 9, "fp8") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_round_trip_error_within_one_step(latent_format, dtype):
    k, v = latents(dtype=dtype)
    rows = quantize_rows(k, v, latent_format)
    assert rows.dtype == torch.uint8 and rows.shape == (64, 3, row_bytes(24, 40, latent_format))
    k_hat, v_hat = dequantize_rows(rows, 24, 40, latent_format)
    for x, x_hat in ((k.float(), k_hat), (v.float(), v_hat)):
        if latent_format == "int4":  # half a step of (max - min)/15, plus the fp16 rounding of the minimum and scale
            step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
            assert bool(((x_hat - x).abs() <= 0.5 * step * 1.01 + 1e-3 * x.abs().amax(-1, keepdim=True)).all())
        else:  # e4m3 has 3 mantissa bits: relative error <= 2^-4, absolute floor at the smallest subnormal
            scale = x.abs().amax(-1, keepdim=True) / 448
            assert bool(((x_hat - x).abs() <= x.abs() * 2 ** -4 * 1.01 + scale * 2 ** -9).all())
        assert float((x_hat - x).abs().max()) > 0  # canary: it did quantize


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_rows_dequantize_to_the_fake_quantized_latents_exactly(latent_format):
    k, v = latents(seed=3, dtype=torch.bfloat16)
    k_hat, v_hat = dequantize_rows(quantize_rows(k, v, latent_format), 24, 40, latent_format)
    assert torch.equal(k_hat, fake_quant_latent(k, latent_format)) and torch.equal(v_hat, fake_quant_latent(v, latent_format))


def test_fp8_is_e4m3_with_an_fp16_scale():
    k, v = latents(seed=1)
    rows = quantize_rows(k, v, "fp8")
    k_hat, _ = dequantize_rows(rows, 24, 40, "fp8")
    scale = (k.abs().amax(-1, keepdim=True) / 448).half().float()
    assert torch.equal(rows[..., 24 + 40:24 + 40 + 2].contiguous().view(torch.float16).float(), scale)
    assert torch.equal(rows[..., :24].contiguous().view(torch.float8_e4m3fn).float(),
                       (k / scale).to(torch.float8_e4m3fn).float())
    assert torch.equal(k_hat, (k / scale).to(torch.float8_e4m3fn).float() * scale)


def test_int4_packing_layout_by_hand():
    """rank 4 K latent [0, 1, 2, 3] * 2 (min 0, scale 0.4: codes 0, 5, 10, 15) and rank 2 V latent [-1, 1]
    (min -1, scale 2/15: codes 0, 15)."""
    k = torch.tensor([[[0.0, 2.0, 4.0, 6.0]]])
    v = torch.tensor([[[-1.0, 1.0]]])
    row = quantize_rows(k, v, "int4")[0, 0]
    assert row.shape == (3 + 8,)
    # byte j = code[j] | code[j + r/2] << 4: K (0 | 10 << 4), (5 | 15 << 4); V (0 | 15 << 4)
    assert row[:3].tolist() == [0 | 10 << 4, 5 | 15 << 4, 0 | 15 << 4]
    halves = row[3:].clone().view(torch.float16).float().tolist()
    assert halves == pytest.approx([torch.tensor(0.4).half().item(), 0.0,
                                    torch.tensor(2 / 15).half().item(), -1.0])
    k_hat, v_hat = dequantize_rows(row, 4, 2, "int4")
    assert k_hat.tolist() == pytest.approx([0.0, 2.0, 4.0, 6.0], abs=2e-3)
    assert v_hat.tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)


def test_fp8_layout_by_hand():
    k = torch.tensor([[[448.0, -224.0]]])  # absmax 448 -> scale 1: the payload bytes are e4m3 of the values
    v = torch.tensor([[[0.0, 1.0]]])  # scale 1/448 in fp16
    row = quantize_rows(k, v, "fp8")[0, 0]
    e4m3 = torch.tensor([448.0, -224.0, 0.0, 448.0]).to(torch.float8_e4m3fn).view(torch.uint8)
    assert row[:4].tolist() == e4m3.tolist()
    assert row[4:].clone().view(torch.float16).float().tolist() == [1.0, torch.tensor(1 / 448).half().item()]


def test_constant_and_zero_vectors_stay_finite():
    k = torch.zeros(2, 1, 8)
    v = torch.full((2, 1, 8), 3.0)
    for latent_format in ("fp8", "int4"):
        k_hat, v_hat = dequantize_rows(quantize_rows(k, v, latent_format), 8, 8, latent_format)
        assert torch.equal(k_hat, k) and torch.allclose(v_hat, v, rtol=1e-3)


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_paged_attention_on_quantized_rows_equals_attention_on_dequantized_latents(latent_format):
    """The PyTorch serving path: write_latents quantizes into a uint8 cache, paged_latent_attention dequantizes;
    same result as the unquantized path over a float cache holding the fake-quantized latents."""
    from vllm_palu.attention.reference import paged_latent_attention, write_latents

    groups, rank_k, rank_v, heads, head_dim, block = 2, 8, 24, 4, 16, 4
    k, v = latents(tokens=10, groups=groups, rank_k=rank_k, rank_v=rank_v, seed=5)
    slots = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 12, -1])  # blocks 1..3, then a padding token
    quantized_cache = torch.zeros(4, groups, block, row_bytes(rank_k, rank_v, latent_format), dtype=torch.uint8)
    float_cache = torch.zeros(4, groups, block, rank_k + rank_v)
    write_latents(quantized_cache, slots, k, v, latent_format=latent_format)
    write_latents(float_cache, slots, fake_quant_latent(k, latent_format), fake_quant_latent(v, latent_format))
    generator = torch.Generator().manual_seed(9)
    k_up = torch.randn(groups, 2 * head_dim, rank_k, generator=generator)
    query = torch.randn(3, heads, head_dim, generator=generator)
    positions = torch.arange(64, dtype=torch.float32)[:, None] * torch.linspace(0.5, 0.01, head_dim // 2)
    cos_sin = torch.cat((positions.cos(), positions.sin()), dim=-1)
    # One request of 9 cached tokens (slots 4..12 = blocks 1, 2, 3), the last 3 are the queries.
    args = (torch.tensor([0, 3]), torch.tensor([9]), torch.tensor([[1, 2, 3]]), head_dim ** -0.5)
    served = paged_latent_attention(query, quantized_cache, k_up, None, cos_sin, True, *args, latent_format=latent_format)
    expected = paged_latent_attention(query, float_cache, k_up, None, cos_sin, True, *args)
    assert served.shape == (3, heads, rank_v) and torch.allclose(served, expected, atol=1e-6)
    exact_cache = torch.zeros_like(float_cache)
    write_latents(exact_cache, slots, k, v)
    unquantized = paged_latent_attention(query, exact_cache, k_up, None, cos_sin, True, *args)
    assert not torch.allclose(served, unquantized, atol=1e-3)  # canary: quantization is visible


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_page_layout_puts_k_payload_rows_then_key_major_v_payloads_then_scale_rows(latent_format):
    """A page holds its K payload rows ``[G, block_size, Pk]``, then its V payloads key-major ``[G, Pv,
    block_size]`` (byte j of every token's V side by side, for P.V's wide loads), then its scale rows."""
    k, v = torch.randn(3, 2, 16, 24), torch.randn(3, 2, 16, 40)  # [blocks, groups, block_size, rank]
    rows = quantize_rows(k.flatten(0, 1), v.flatten(0, 1), latent_format).view(3, 2, 16, -1)
    pages = rows_to_pages(rows, 24, latent_format)
    k_bytes, v_bytes = (24, 40) if latent_format == "fp8" else (12, 20)
    payload = k_bytes + v_bytes
    flat = pages.view(3, -1)
    k_end, v_end = 2 * 16 * k_bytes, 2 * 16 * payload
    assert torch.equal(flat[:, :k_end], rows[..., :k_bytes].reshape(3, -1))
    assert torch.equal(flat[:, k_end:v_end], rows[..., k_bytes:payload].transpose(-1, -2).reshape(3, -1))
    assert torch.equal(flat[:, v_end:], rows[..., payload:].reshape(3, -1))
    assert torch.equal(pages_to_rows(pages, 24, latent_format), rows)
    k_view, v_view, scale_view = page_views(pages, 24, latent_format)
    assert (k_view.shape, v_view.shape, scale_view.shape) == ((3, 2, 16, k_bytes), (3, 2, v_bytes, 16),
                                                               (3, 2, 16, rows.shape[-1] - payload))
    assert torch.equal(v_view[1, 0, :, 7], rows[1, 0, 7, k_bytes:payload])  # token 7's V bytes, 16 apart
    with pytest.raises(ValueError, match="contiguous uint8"):
        page_views(pages.transpose(1, 2), 24, latent_format)


# The shared layout: one latent per row, both the K and the V latent (rank_k == rank_v == r).


def test_shared_row_bytes_hold_one_latent_and_one_scale_set():
    assert row_bytes(64, 64, "auto", latent_layout="shared") == 128
    assert row_bytes(64, 64, "auto", 4, "shared") == 256  # positional, as PaluConfig calls it
    assert row_bytes(64, 64, "fp8", latent_layout="shared") == 64 + 2
    assert row_bytes(64, 64, "int4", latent_layout="shared") == 32 + 4
    assert scale_bytes("fp8", "shared") == 2 and scale_bytes("int4", "shared") == 4 and scale_bytes("int4") == 8
    for latent_format in ("fp8", "int4"):
        assert rank_v_of_row(row_bytes(24, 24, latent_format, 1, "shared"), 24, latent_format, "shared") == 24
        with pytest.raises(ValueError, match="shared rows of rank 24"):  # a split row is not a shared one
            rank_v_of_row(row_bytes(24, 24, latent_format), 24, latent_format, "shared")
    assert rank_v_of_row(24, 24, "auto", "shared") == 24 and rank_v_of_row(64, 24, "auto") == 40


@pytest.mark.parametrize("rank_k, rank_v, latent_format, latent_layout, problem", [
    (8, 16, "auto", "shared", "rank_k and rank_v must be equal"), (7, 7, "fp8", "shared", "even rank"),
    (9, 9, "int4", "shared", "even rank"), (8, 8, "auto", "joint", "unknown latent layout")])
def test_unsupported_shared_ranks(rank_k, rank_v, latent_format, latent_layout, problem):
    assert problem in check_ranks(rank_k, rank_v, latent_format, latent_layout)
    with pytest.raises(ValueError, match=re.escape(problem)):
        row_bytes(rank_k, rank_v, latent_format, 2, latent_layout)
    assert check_ranks(7, 7, "auto", "shared") is None and check_ranks(8, 8, "int4", "shared") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_shared_rows_round_trip_to_the_fake_quantized_latent_exactly(latent_format, dtype):
    z, _ = latents(rank_k=24, seed=4, dtype=dtype)
    rows = quantize_rows(z, None, latent_format, "shared")
    assert rows.dtype == torch.uint8 and rows.shape == (64, 3, row_bytes(24, 24, latent_format, 1, "shared"))
    assert torch.equal(rows, quantize_rows(z, z, latent_format, "shared"))  # the V argument is not read
    k_hat, v_hat = dequantize_rows(rows, 24, 24, latent_format, "shared")
    assert torch.equal(k_hat, fake_quant_latent(z, latent_format)) and torch.equal(v_hat, k_hat)
    assert float((k_hat - z.float()).abs().max()) > 0  # canary: it did quantize
    # The shared row is the split row's K half: same payload bytes, same K scale set.
    split = quantize_rows(z, z, latent_format)
    payload = 24 if latent_format == "fp8" else 12
    assert torch.equal(rows[..., :payload], split[..., :payload])
    assert torch.equal(rows[..., payload:], split[..., 2 * payload:2 * payload + rows.shape[-1] - payload])


def test_shared_layouts_by_hand():
    """int4: [0, 2, 4, 6] (min 0, scale 0.4: codes 0, 5, 10, 15) -> 2 code bytes, scale, min; fp8: [448, -224]
    (scale 1) -> 2 e4m3 bytes, scale."""
    row = quantize_rows(torch.tensor([[[0.0, 2.0, 4.0, 6.0]]]), None, "int4", "shared")[0, 0]
    assert row.shape == (2 + 4,) and row[:2].tolist() == [0 | 10 << 4, 5 | 15 << 4]
    assert row[2:].clone().view(torch.float16).float().tolist() == [torch.tensor(0.4).half().item(), 0.0]
    row = quantize_rows(torch.tensor([[[448.0, -224.0]]]), None, "fp8", "shared")[0, 0]
    assert row[:2].tolist() == torch.tensor([448.0, -224.0]).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    assert row[2:].clone().view(torch.float16).float().tolist() == [1.0]


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_shared_page_layout_puts_payload_rows_first_then_scale_rows(latent_format):
    z = torch.randn(3, 2, 16, 24)  # [blocks, groups, block_size, r]
    rows = quantize_rows(z.flatten(0, 1), None, latent_format, "shared").view(3, 2, 16, -1)
    pages = rows_to_pages(rows, 24, latent_format, "shared")
    payload_bytes = 24 if latent_format == "fp8" else 12
    flat = pages.view(3, -1)
    assert torch.equal(flat[:, :2 * 16 * payload_bytes], rows[..., :payload_bytes].reshape(3, -1))
    assert torch.equal(flat[:, 2 * 16 * payload_bytes:], rows[..., payload_bytes:].reshape(3, -1))
    assert torch.equal(pages_to_rows(pages, 24, latent_format, "shared"), rows)
    k_view, v_view, scale_view = page_views(pages, 24, latent_format, "shared")
    assert v_view is None and scale_view.shape[-1] == scale_bytes(latent_format, "shared")


def _attention_inputs(groups=2, heads=4, head_dim=16):
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(3, heads, head_dim, generator=generator)
    positions = torch.arange(64, dtype=torch.float32)[:, None] * torch.linspace(0.5, 0.01, head_dim // 2)
    cos_sin = torch.cat((positions.cos(), positions.sin()), dim=-1)
    # One request of 9 cached tokens (slots 4..12 = blocks 1, 2, 3), the last 3 are the queries.
    metadata = (torch.tensor([0, 3]), torch.tensor([9]), torch.tensor([[1, 2, 3]]), head_dim ** -0.5)
    return query, cos_sin, metadata, generator


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_paged_attention_on_quantized_shared_rows_equals_attention_on_dequantized_latents(latent_format):
    """The PyTorch serving path with shared latents: write_latents quantizes the one latent into a uint8 cache,
    paged_latent_attention reads it as both K and V latent; same result as a float shared cache of the
    fake-quantized latent, and as split rows holding that latent twice (V really is the K latent)."""
    from vllm_palu.attention.reference import paged_latent_attention, write_latents

    groups, rank, heads, head_dim, block = 2, 24, 4, 16, 4
    z, other = latents(tokens=10, groups=groups, rank_k=rank, rank_v=rank, seed=5)
    slots = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 12, -1])  # blocks 1..3, then a padding token
    query, cos_sin, metadata, generator = _attention_inputs(groups, heads, head_dim)
    k_up = torch.randn(groups, 2 * head_dim, rank, generator=generator)
    quantized_cache = torch.zeros(4, groups, block, row_bytes(rank, rank, latent_format, 1, "shared"),
                                  dtype=torch.uint8)
    write_latents(quantized_cache, slots, z, other, latent_format, "shared")  # `other` is not read
    served = paged_latent_attention(query, quantized_cache, k_up, None, cos_sin, True, *metadata,
                                    latent_format=latent_format, latent_layout="shared")
    z_hat = fake_quant_latent(z, latent_format)
    float_cache = torch.zeros(4, groups, block, rank)
    write_latents(float_cache, slots, z_hat, None, latent_layout="shared")
    expected = paged_latent_attention(query, float_cache, k_up, None, cos_sin, True, *metadata,
                                      latent_layout="shared")
    assert served.shape == (3, heads, rank) and torch.allclose(served, expected, atol=1e-6)
    twice_cache = torch.zeros(4, groups, block, 2 * rank)
    write_latents(twice_cache, slots, z_hat, z_hat)
    twice = paged_latent_attention(query, twice_cache, k_up, None, cos_sin, True, *metadata)
    assert torch.allclose(served, twice, atol=1e-6)
    write_latents(twice_cache, slots, z_hat, fake_quant_latent(other, latent_format))
    split = paged_latent_attention(query, twice_cache, k_up, None, cos_sin, True, *metadata)
    assert not torch.allclose(served, split, atol=1e-2)  # canary: V comes from the shared latent, not elsewhere
    exact_cache = torch.zeros_like(float_cache)
    write_latents(exact_cache, slots, z, None, latent_layout="shared")
    unquantized = paged_latent_attention(query, exact_cache, k_up, None, cos_sin, True, *metadata,
                                         latent_layout="shared")
    assert not torch.allclose(served, unquantized, atol=1e-3)  # canary: quantization is visible
