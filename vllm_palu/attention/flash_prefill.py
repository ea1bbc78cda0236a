"""Prefill attention on vLLM's own FlashAttention, over the rebuilt context (CUDA builds of vLLM).

Dense vLLM runs prompt chunks on FlashAttention (FA3 on Hopper); a PALU prefill differs only in where the keys come
from. The context is rebuilt once into a workspace in FlashAttention's layout (:func:`ops.rebuild_context`: rotated
keys and V latents per KV head, both zero-padded to one FlashAttention head dim, the head dim or, for V latents
wider than it, the next one FlashAttention compiles, with the queries padded alike; in the shared latent layout the
V latent is the one latent the keys are rebuilt from, as the plan tells the rebuild kernel), then FlashAttention
runs over it. Where every request's whole context fits its share of the workspace (chunked prefill of the usual
sizes), once: the contexts paged through a block table over the workspace, ``seqused_k`` their lengths,
``causal=True`` (bottom-right aligned: exactly a chunk's causality over its prefix and itself), as vLLM's own
FlashAttention backend calls it. Otherwise in parts:

- the new tokens, packed like the queries: ``causal=True`` (FlashAttention's causal mask is bottom-right aligned,
  which is the chunk's own causality);
- each window of the cached prefix before them, paged through a block table over the workspace
  (``seqused_k`` = the window's share of each prefix): no mask, every new token sees all of it;

merged by log-sum-exp with vLLM's ``merge_attn_states``, as vLLM's MLA backend merges a chunked context. The output
keeps the first ``rank_v`` columns (V-latent space). Everything is launched from host-side sizes: no device reads.

Pinned to vllm 0.33: ``vllm.vllm_flash_attn.flash_attn_varlen_func``, ``fa_utils.get_flash_attn_version``,
``vllm.v1.attention.ops.merge_attn_states`` (contract tests in tests/test_plugin.py).
"""

from __future__ import annotations

import torch

from vllm_palu.attention import ops

# Workspace page of the prefix windows: FA2's paged-KV granularity (FA3 takes any multiple of 16).
PAGE = 256
HEAD_DIMS = (64, 96, 128, 192, 256)  # head dims every FlashAttention version vLLM ships compiles


def flash_head_dim(head_dim: int, rank_v: int) -> int | None:
    """FlashAttention's head dim for a layer: the smallest it compiles that holds both the keys and the V latents
    (it wants one for K and V; both are zero-padded to it), None if none does."""
    return next((width for width in HEAD_DIMS if width >= max(head_dim, rank_v)), None)


class FlashPrefill:
    """``FlashPrefill.for_plan(plan)(plan, query, kv_cache, ..., batch)``: the signature of
    :func:`ops.prefill_attention`, which it replaces where vLLM's FlashAttention can run the layer."""

    def __init__(self, fa_version: int, width: int):
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        self.fa_version = fa_version
        self.width = width  # FlashAttention's head dim: queries, keys and V latents zero-padded to it
        self.attend = flash_attn_varlen_func
        self.merge = merge_attn_states

    @classmethod
    def for_plan(cls, plan: ops.LayerPlan) -> FlashPrefill | None:
        """None where FlashAttention cannot take the layer: no CUDA FlashAttention in this vLLM, an fp32 model, or
        a head dim and V rank wider than any head dim it compiles. One width serves K and V (it wants one): a V rank
        over the head dim (split over groups of 2 at Llama-3-8B: 176 over 128) pads both to the next (192)."""
        width = flash_head_dim(plan.head_dim, plan.rank_v)
        if plan.k_up.device.type != "cuda" or plan.k_up.dtype == torch.float32 or width is None:
            return None
        try:
            from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        except ImportError:
            return None
        version = get_flash_attn_version(head_size=width)
        return None if version is None else cls(version, width)

    @staticmethod
    def _table(workspace: ops.PrefillWorkspace, batch: ops.PrefillBatch, device) -> torch.Tensor:
        """Block table of the workspace's window slots: request i's window is pages i * pages .. of PAGE rows (the
        same for every layer of the step: made once)."""
        pages, requests = workspace.window // PAGE, batch.num_requests
        table = batch.step.get(("flash table", pages))
        if table is None:
            table = batch.step[("flash table", pages)] = torch.arange(
                requests * pages, dtype=torch.int32, device=device).view(requests, pages)
        return table

    @staticmethod
    def _sequences(batch: ops.PrefillBatch, query_start_loc: torch.Tensor,
                   seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashAttention's view of the prefill requests, the same for every layer of the step (made once): the
        queries' cu_seqlens from the first prefill token, the contexts' lengths and the cached prefixes'."""
        sequences = batch.step.get("flash sequences")
        if sequences is None:
            first, count = batch.first_request, batch.num_requests
            starts = query_start_loc[first:first + count + 1]
            contexts = seq_lens[first:first + count]
            sequences = batch.step["flash sequences"] = (  # device ops: no host read
                starts - starts[:1], contexts, contexts - (starts[1:] - starts[:-1]))
        return sequences

    def __call__(self, plan: ops.LayerPlan, query: torch.Tensor, kv_cache: torch.Tensor,
                 query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor,
                 batch: ops.PrefillBatch) -> None:
        query = ops.kernel_query(plan, query)
        width = self.width
        workspace = ops.prefill_workspace(plan, query, batch, width, PAGE, key_width=width)
        cu_queries, contexts, prefixes = self._sequences(batch, query_start_loc, seq_lens)
        queries = query[batch.first_token:]
        if width > plan.head_dim:  # zero columns: scores unchanged (the softmax scale is passed, not derived)
            queries = torch.nn.functional.pad(queries, (0, width - plan.head_dim))
        merged = queries.new_empty(queries.shape[0], plan.num_heads, width)
        if workspace.whole_context:
            ops.rebuild_context(plan, kv_cache, query_start_loc, seq_lens, block_table, batch, workspace, 0,
                                query.dtype)
            self.attend(q=queries, k=workspace.prefix_keys.view(-1, PAGE, plan.kv_heads, width),
                        v=workspace.prefix_values.view(-1, PAGE, plan.kv_heads, width),
                        cu_seqlens_q=cu_queries, max_seqlen_q=batch.max_query_len,
                        seqused_k=contexts, max_seqlen_k=workspace.window,
                        block_table=self._table(workspace, batch, query.device), softmax_scale=plan.softmax_scale,
                        causal=True, out=merged, fa_version=self.fa_version)
            out[batch.first_token:batch.first_token + merged.shape[0]].copy_(merged[..., :plan.rank_v])
            return
        ops.rebuild_context(plan, kv_cache, query_start_loc, seq_lens, block_table, batch, workspace, None,
                            query.dtype)
        _, merged_lse = self.attend(
            q=queries, k=workspace.new_keys, v=workspace.new_values, cu_seqlens_q=cu_queries,
            max_seqlen_q=batch.max_query_len, cu_seqlens_k=cu_queries, max_seqlen_k=batch.max_query_len,
            softmax_scale=plan.softmax_scale, causal=True, return_softmax_lse=True, out=merged,
            fa_version=self.fa_version)
        if workspace.windows:
            window = workspace.window
            table = self._table(workspace, batch, query.device)
            shape = (-1, PAGE, plan.kv_heads, width)
            part, other, other_lse = torch.empty_like(merged), torch.empty_like(merged), torch.empty_like(merged_lse)
            for index in range(workspace.windows):
                ops.rebuild_context(plan, kv_cache, query_start_loc, seq_lens, block_table, batch, workspace, index,
                                    query.dtype)
                used = (prefixes - index * window).clamp(0, window).to(torch.int32)
                _, part_lse = self.attend(
                    q=queries, k=workspace.prefix_keys.view(shape), v=workspace.prefix_values.view(shape),
                    cu_seqlens_q=cu_queries, max_seqlen_q=batch.max_query_len, seqused_k=used, max_seqlen_k=window,
                    block_table=table, softmax_scale=plan.softmax_scale, causal=False, return_softmax_lse=True,
                    out=part, fa_version=self.fa_version)
                # Into the other buffers, then swap: no kernel reads what it writes.
                self.merge(other, part, part_lse, merged, merged_lse, output_lse=other_lse)
                merged, other, merged_lse, other_lse = other, merged, other_lse, merged_lse
        out[batch.first_token:batch.first_token + merged.shape[0]].copy_(merged[..., :plan.rank_v])
