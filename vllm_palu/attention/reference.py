"""Paged latent attention in plain PyTorch: the CPU serving path and the fp32 oracle for the GPU kernels.

Shape contract (one layer, one tensor-parallel rank):

    kv_cache      [num_blocks, num_groups, block_size, row]   any strides; per (token, group) row:
                  latent_format "auto": latent_layout "split": row = rank_k + rank_v values in the cache dtype, K
                  latent then V latent; "shared": row = r values, one latent that is both (rank_k == rank_v == r);
                  "fp8" / "int4": uint8 rows and pages laid out as vllm_palu.attention.latent_quant specifies
    slot_mapping  [T] int      block_id * block_size + offset; < 0 = padding, not written
    query         [T, num_heads, head_dim]        already rotated (RoPE at the query's position)
    k_up          [num_groups, group_size * head_dim, rank_k]   per-group key up-projection (pre-RoPE keys)
    k_bias        [num_groups * group_size * head_dim] or None  (Qwen2)
    cos_sin_cache [max_position, rotary_dim]      cos | sin halves, rope scaling already applied
    query_start_loc [B + 1], seq_lens [B] (context incl. the new tokens), block_table [B, max_blocks]
    -> output     [T, num_heads, rank_v]          attention output in V-latent space (the caller up-projects;
                                                  shared: the r-dim space of the one latent)

Key j of a request sits at position j; query token i of a request with q_len new tokens at seq_len - q_len + i.
Quantized latents are dequantized to fp32 as they are read. Imports neither vLLM nor Triton.
"""

from __future__ import annotations

import torch

from vllm_palu.attention.latent_quant import (dequantize_rows, is_shared, page_views, pages_to_rows, quantize_rows,
                                              rank_v_of_row, row_parts)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               is_neox_style: bool = True) -> torch.Tensor:
    """Rotate ``x [N, heads, head_dim]`` at ``positions [N]`` (vLLM's RotaryEmbedding math, in x's dtype)."""
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).to(x.dtype).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox_style:
        x1, x2 = rotated.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rotated[..., ::2], rotated[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, passed), dim=-1)


def write_latents(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k_latent: torch.Tensor,
                  v_latent: torch.Tensor | None, latent_format: str = "auto", latent_layout: str = "split") -> None:
    """Scatter new tokens' latents ``k_latent [T, G, rank_k]``, ``v_latent [T, G, rank_v]`` into their slots,
    quantized per token and group when ``latent_format`` is fp8 or int4. Shared: ``k_latent`` is the one latent
    (``v_latent``, the same latent, is not read)."""
    shared = is_shared(latent_layout)
    rank_k = k_latent.shape[-1]
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    if latent_format != "auto":
        rows = quantize_rows(k_latent[valid], None if shared else v_latent[valid], latent_format, latent_layout)
        k_payload, v_payload, scales = page_views(kv_cache, rank_k, latent_format, latent_layout)
        k_rows, v_rows, scale_rows = row_parts(rows, rank_k, latent_format, latent_layout)
        k_payload[blocks, :, offsets, :] = k_rows
        if v_payload is not None:  # key-major: [blocks, G, Pv, block_size]
            v_payload[blocks, :, :, offsets] = v_rows
        scales[blocks, :, offsets, :] = scale_rows
        return
    kv_cache[blocks, :, offsets, :rank_k] = k_latent[valid].to(kv_cache.dtype)
    if not shared:
        kv_cache[blocks, :, offsets, rank_k:] = v_latent[valid].to(kv_cache.dtype)


def gather_latents(kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One request's cache rows in token order: ``[num_groups, seq_len, row]``."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    pages = kv_cache[block_table_row[:num_blocks].long()]  # [blocks, G, block_size, C]
    return pages.permute(1, 0, 2, 3).flatten(1, 2)[:, :seq_len]


def reconstruct_keys(k_latent: torch.Tensor, k_up: torch.Tensor, k_bias: torch.Tensor | None,
                     head_dim: int) -> torch.Tensor:
    """Pre-RoPE keys ``[S, num_groups * group_size, head_dim]`` from latents ``[G, S, rank_k]``."""
    keys = torch.einsum("gsr,gor->sgo", k_latent, k_up)  # [S, G, group_size * head_dim]
    if k_bias is not None:
        keys = keys + k_bias.view(keys.shape[1], -1)
    return keys.reshape(keys.shape[0], -1, head_dim)


def paged_latent_attention(query: torch.Tensor, kv_cache: torch.Tensor, k_up: torch.Tensor,
                           k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                           scale: float, *, latent_format: str = "auto",
                           latent_layout: str = "split") -> torch.Tensor:
    """Causal attention of every query token over its request's latent cache, in fp32 (shapes: module doc)."""
    num_tokens, num_heads, head_dim = query.shape
    num_groups, _, rank_k = k_up.shape
    rank_v = rank_v_of_row(kv_cache.shape[-1], rank_k, latent_format, latent_layout)
    output = query.new_zeros(num_tokens, num_heads, rank_v, dtype=torch.float32)
    # Quantized pages as rows in token order (the page layout keeps V key-major).
    cache_rows = kv_cache if latent_format == "auto" else pages_to_rows(kv_cache, rank_k, latent_format,
                                                                        latent_layout)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for request, seq_len in enumerate(lens):
        start, end = starts[request], starts[request + 1]
        if end == start:
            continue
        if latent_format == "auto":
            rows = gather_latents(kv_cache, block_table[request], seq_len).float()
            k_latent, v_latent = (rows, rows) if is_shared(latent_layout) else rows.split([rank_k, rank_v], dim=-1)
        else:
            rows = gather_latents(cache_rows, block_table[request], seq_len)
            k_latent, v_latent = dequantize_rows(rows, rank_k, rank_v, latent_format, latent_layout)
        keys = reconstruct_keys(k_latent, k_up.float(), None if k_bias is None else k_bias.float(), head_dim)
        positions = torch.arange(seq_len, device=query.device)
        keys = apply_rope(keys, positions, cos_sin_cache.float(), is_neox_style)  # [S, kv_heads, head_dim]
        heads_per_kv = num_heads // keys.shape[1]
        keys = keys.repeat_interleave(heads_per_kv, dim=1)  # [S, H, head_dim]
        values = v_latent.repeat_interleave(num_heads // num_groups, dim=0)  # [H, S, rank_v]
        q = query[start:end].float()  # [q_len, H, head_dim]
        scores = torch.einsum("qhd,shd->hqs", q, keys) * scale
        query_positions = positions[seq_len - (end - start):]
        scores.masked_fill_(positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        output[start:end] = torch.einsum("hqs,hsr->qhr", scores.softmax(dim=-1), values)
    return output
