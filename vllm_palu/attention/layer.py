"""The attention layer of a Palu model inside vLLM: it owns the key up-projection and the rotary tables the
backend needs, and declares a KV-cache spec whose page holds one row per group and token: ``rank_k + rank_v``
values (split layout) or ``r`` (shared), or with fp8 / int4 latents a uint8 row whose size counts the scales (so
vLLM's token capacity grows with the compression; latent_quant describes the page layout)."""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention.attention import Attention, unified_attention_with_output
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, get_kv_quant_mode

from vllm_palu.attention.backend import PaluAttentionBackend
from vllm_palu.attention.latent_quant import row_bytes
from vllm_palu.config import LatentLayout, latent_format_for


class PaluAttentionLayer(Attention):
    """``forward(query [T, H*head_dim] rotated, k_latent [T, G*rank_k], v_latent [T, G*rank_v])``
    -> ``[T, H*rank_v]``: each head's attention output in its group's V-latent space. Shared layout: ``k_latent``
    and ``v_latent`` are the same latent (``rank_k == rank_v``), cached once."""

    def __init__(self, num_heads: int, head_dim: int, num_groups: int, group_size: int, rank_k: int, rank_v: int,
                 latent_layout: str, rotary_emb: nn.Module, key_bias: bool, cache_config, prefix: str) -> None:
        # num_kv_heads = latent groups: vLLM allocates one cache slot per group, of width rank_k + rank_v.
        super().__init__(num_heads, head_dim, head_dim ** -0.5, num_kv_heads=num_groups, cache_config=cache_config,
                         prefix=prefix, attn_backend=PaluAttentionBackend, head_size_v=rank_v)
        self.num_groups, self.group_size, self.rank_k, self.rank_v = num_groups, group_size, rank_k, rank_v
        self.latent_layout = LatentLayout.parse(latent_layout)
        self.latent_format = latent_format_for(self.kv_cache_dtype)  # set by Attention from --kv-cache-dtype
        self.rotary_emb = rotary_emb
        group_width = group_size * head_dim
        self.k_up = nn.Parameter(torch.empty(num_groups, group_width, rank_k), requires_grad=False)
        self.k_up_bias = (nn.Parameter(torch.empty(num_groups * group_width), requires_grad=False)
                          if key_bias else None)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # vLLM calls this once the weights are loaded (dummy weights too), before warm-up and CUDA-graph capture:
        # the backend plans its kernels for this layer here, once.
        super().process_weights_after_loading(act_dtype)
        self.impl.prepare(self)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        # state_content_bytes sizes the page where a row is not head_size + head_size_v values of the cache dtype:
        # quantized rows (uint8 of row_bytes, scales included) and shared latents (r values, not 2r).
        dtype = self.kv_cache_torch_dtype
        row = row_bytes(self.rank_k, self.rank_v, self.latent_format, dtype.itemsize, self.latent_layout)
        plain = self.latent_format == "auto" and self.latent_layout == LatentLayout.SPLIT
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
                                 head_size=self.rank_k, head_size_v=self.rank_v, dtype=dtype,
                                 kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype),
                                 state_content_bytes=None if plain else row)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                output_shape: torch.Size | None = None, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        tokens = query.shape[0]
        output = torch.empty(tokens, self.num_heads * self.rank_v, dtype=output_dtype or query.dtype,
                             device=query.device)
        args = (query.view(tokens, self.num_heads, self.head_size), key.view(tokens, self.num_groups, self.rank_k),
                value.view(tokens, self.num_groups, self.rank_v), output.view(tokens, self.num_heads, self.rank_v))
        # The same registered op as vLLM's Attention: torch.compile treats it as an opaque splitting op.
        if self.use_direct_call:
            unified_attention_with_output(*args, self.layer_name)
        else:
            torch.ops.vllm.unified_attention_with_output(*args, _encode_layer_name(self.layer_name))
        return output
