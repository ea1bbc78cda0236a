"""Simulated quantization of a dense K/V cache: the baselines Palu is compared with at equal bytes.

Cached K (after RoPE) and V are quantized per token and KV head (one ``head_dim`` vector), asymmetric min/max for
the integer formats and an absmax scale for fp8 e4m3; scales and zero points are fp16 and counted in the bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_palu.errors import PaluError

INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
KV_QUANT_MODES = ("none", *INT_BITS, "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fake_quant_int(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest over the last dim, fp16 scale and minimum."""
    levels = 2 ** bits - 1
    low = x.amin(dim=-1, keepdim=True).half().float()
    scale = ((x.amax(dim=-1, keepdim=True) - low) / levels).clamp_min(1e-8).half().float()
    codes = ((x.float() - low) / scale).round().clamp(0, levels)
    return (codes * scale + low).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one fp16 absmax scale per vector over the last dim."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12).half().float()
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fake_quant(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "none":
        return x
    if mode == "fp8":
        return fake_quant_fp8(x)
    if mode in INT_BITS:
        return fake_quant_int(x, INT_BITS[mode])
    raise PaluError(f"unknown KV quantization {mode!r}; choose from {', '.join(KV_QUANT_MODES)}")


def bytes_vs_bf16(mode: str, head_dim: int) -> float:
    """KV bytes of a quantized vector (scales included) relative to bf16."""
    if mode == "none":
        return 1.0
    if mode == "fp8":
        return (head_dim * 8 + 16) / (head_dim * 16)
    return (head_dim * INT_BITS[mode] + 32) / (head_dim * 16)


def set_kv_quant(model: nn.Module, mode: str) -> None:
    """Route the model's attention through SDPA on fake-quantized K/V (``mode='none'``: plain SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    if mode not in KV_QUANT_MODES:
        raise PaluError(f"unknown KV quantization {mode!r}; choose from {', '.join(KV_QUANT_MODES)}")
    if mode == "none":
        model.set_attn_implementation("sdpa")
        return

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, fake_quant(key, mode), fake_quant(value, mode),
                                      attention_mask, **kwargs)

    name = f"palu_kv_{mode}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
