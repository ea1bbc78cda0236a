"""Launchers of the Triton kernels: shapes, strides, tile sizes, grids and the split-KV choice. Same signatures and
shape contract as :mod:`vllm_palu.attention.reference` (the fp32 oracle); the kernels are in
:mod:`vllm_palu.attention.kernels`. Imports no vLLM; runs on CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_palu.attention.latent_quant import page_views, quantize_rows, rank_v_of_row
from vllm_palu.attention.kernels import paged_latent_attention_kernel, reduce_splits_kernel, write_latents_kernel

LOG2E = 1.4426950408889634


def _pow2(value: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(value))


def rank_chunks(rank: int) -> tuple[int, int]:
    """Cover ``rank`` with power-of-two tiles (Triton's shapes): one, or two when that pads less (48 -> 32 + 16,
    80 -> 64 + 16, 176 -> 128 + 64). Returns (first, second); second is 0 for a single chunk."""
    single = _pow2(rank)
    first = max(16, single // 2)
    if first >= rank:
        return single, 0
    second = _pow2(rank - first)
    return (first, second) if first + second < single else (single, 0)


TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LATENT_CODES = {"auto": 0, "fp8": 1, "int4": 2}  # the kernel's LATENT constexpr
_converted_tables: dict[tuple, torch.Tensor] = {}
last_kernel = None  # the last compiled attention kernel launched (registers, SASS: scripts/kernel_anatomy.py)


def rotary_table(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's cos/sin table in the kernels' key dtype, converted once per table (not per tile in the kernel:
    bf16 -> fp16 costs two conversions per element there)."""
    if cos_sin_cache.dtype == dtype:
        return cos_sin_cache
    key = (cos_sin_cache.data_ptr(), tuple(cos_sin_cache.shape), cos_sin_cache.dtype, dtype)
    if key not in _converted_tables:
        if len(_converted_tables) > 64:  # tables are per model, not per call: this only guards a leak
            _converted_tables.clear()
        _converted_tables[key] = cos_sin_cache.to(dtype)
    return _converted_tables[key]


def write_latents(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k_latent: torch.Tensor,
                  v_latent: torch.Tensor, latent_dtype: str = "auto") -> None:
    """kv_cache ``[blocks, G, block_size, row]`` (last dim contiguous), latents ``[T, G, rank]``; fp8/int4 latents
    are quantized into uint8 rows first (:mod:`vllm_palu.attention.latent_quant`), then scattered as bytes."""
    if latent_dtype != "auto":
        rows = quantize_rows(k_latent, v_latent, latent_dtype)
        payload, scales = page_views(kv_cache, latent_dtype)
        split = payload.shape[-1]
        for region, part in ((payload, rows[..., :split]), (scales, rows[..., split:])):
            half = part.shape[-1] // 2  # the scatter kernel copies a row as two parts
            write_latents(region, slot_mapping, part[..., :half], part[..., half:])
        return
    tokens, groups, rank_k = k_latent.shape
    rank_v = v_latent.shape[-1]
    assert kv_cache.shape[1] == groups and kv_cache.shape[-1] == rank_k + rank_v and kv_cache.stride(-1) == 1
    assert k_latent.stride(-1) == 1 and v_latent.stride(-1) == 1 and slot_mapping.shape[0] >= tokens
    if tokens == 0:
        return
    write_latents_kernel[(tokens, groups)](
        k_latent, v_latent, kv_cache, slot_mapping,
        k_latent.stride(0), k_latent.stride(1), v_latent.stride(0), v_latent.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        BLOCK_SIZE=kv_cache.shape[2], RANK_K=rank_k, RANK_V=rank_v, PAD_K=_pow2(rank_k, 1),
        PAD_V=_pow2(rank_v, 1))


def rotary_permutation(head_dim: int, is_neox_style: bool, device) -> torch.Tensor | None:
    """GPT-J rotates pairs (2i, 2i+1); reordering dims to [evens | odds] turns them into NeoX halves. Applied to
    both queries and key up-projection rows, it leaves every q.k unchanged."""
    if is_neox_style:
        return None
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(device)


def choose_num_splits(programs: int, max_seq_len: int, block_n: int, device: torch.device,
                      programs_per_sm: int = 8) -> int:
    """Split the KV walk until the grid gives every multiprocessor several programs (latency hiding), keeping at
    least 4 KV tiles per split."""
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = math.ceil(programs_per_sm * multiprocessors / max(programs, 1))
    most = max(1, max_seq_len // (4 * block_n))  # keep >= 4 tiles per split
    return int(min(triton.next_power_of_2(wanted), triton.next_power_of_2(most) // 2 or 1, 64))


def paged_latent_attention(query: torch.Tensor, kv_cache: torch.Tensor, k_up: torch.Tensor,
                           k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                           scale: float, *, max_query_len: int | None = None, max_seq_len: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           tuning: dict | None = None, latent_dtype: str = "auto") -> torch.Tensor:
    """Triton version of :func:`vllm_palu.attention.reference.paged_latent_attention`; output in query dtype.

    ``latent_dtype`` "fp8" / "int4": the cache holds quantized pages (:mod:`vllm_palu.attention.latent_quant`).
    ``tuning`` (benchmarks, scripts/kernel_variants.py): block_n, num_warps, num_stages, programs_per_sm,
    split_ranks, key_dtype, acc_dtype, convert_table, decode_kernel; defaults are the measured best."""
    num_tokens, num_heads, head_dim = query.shape
    num_groups, group_width, rank_k = k_up.shape
    group_size = group_width // head_dim
    kv_heads = num_groups * group_size
    row = kv_cache.shape[-1]
    rank_v = row - rank_k if latent_dtype == "auto" else rank_v_of_row(row, rank_k, latent_dtype)
    num_reqs = seq_lens.shape[0]
    if cos_sin_cache.shape[-1] != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported by the Triton PALU kernels")
    assert kv_cache.stride(-1) == 1 and num_heads % kv_heads == 0
    if out is None:
        out = query.new_empty(num_tokens, num_heads, rank_v)
    if num_tokens == 0:
        return out

    k_up_heads = k_up.reshape(kv_heads, head_dim, rank_k)
    permutation = rotary_permutation(head_dim, is_neox_style, query.device)
    if permutation is not None:
        query = query[..., permutation]
        k_up_heads = k_up_heads[:, permutation]
        k_bias = None if k_bias is None else k_bias.view(kv_heads, head_dim)[:, permutation]
    k_up_heads = k_up_heads.contiguous()
    query = query if query.stride(-1) == 1 else query.contiguous()

    heads_per_kv = num_heads // kv_heads
    max_query_len = int(query_start_loc.diff().max()) if max_query_len is None else max_query_len
    max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    decode = max_query_len == 1
    # Defaults measured on the H200 with scripts/kernel_variants.py (docs/KERNEL_NOTES.md).
    tuning = {"num_warps": 2 if decode else 4, "num_stages": 3, **(tuning or {})}
    block_n = tuning.pop("block_n", 64 if query.device.type == "cuda" else 32)
    programs_per_sm = tuning.pop("programs_per_sm", 8)
    split_ranks = tuning.pop("split_ranks", True)
    decode = tuning.pop("decode_kernel", decode) and decode
    if latent_dtype == "int4":  # one byte tile per latent holds both halves of the rank: two chunks of rank / 2
        rk0 = rk1 = _pow2(rank_k // 2)
        rv0 = rv1 = _pow2(rank_v // 2)
        k_limit, v_limit = rank_k // 2, rank_v // 2
    else:
        rk0, rk1 = rank_chunks(rank_k) if split_ranks else (_pow2(rank_k), 0)
        rv0, rv1 = rank_chunks(rank_v) if split_ranks else (_pow2(rank_v), 0)
        k_limit, v_limit = rank_k, rank_v
    # 16-bit models rebuild, rotate and score keys in fp16: packed math and half the registers of fp32 tiles.
    key_dtype = tuning.pop("key_dtype", torch.float32 if query.dtype == torch.float32 else torch.float16)
    acc_dtype = tuning.pop("acc_dtype", torch.float32 if key_dtype == torch.bfloat16 else key_dtype)
    if tuning.pop("convert_table", True):
        cos_sin_cache = rotary_table(cos_sin_cache, key_dtype)
    # Decode: the query tile is one token's heads of a KV head; prefill: 64+ rows of several tokens.
    block_m = _pow2(heads_per_kv) if decode else max(64, _pow2(heads_per_kv))
    block_q = max(1, block_m // heads_per_kv)
    # Prefill tiles find their request in cu_qblocks (query-tile starts); decode programs are requests and skip it.
    cu_qblocks = query_start_loc if decode else (
        query_start_loc // block_q + torch.arange(num_reqs + 1, device=query.device)).to(torch.int32)
    programs = num_reqs if decode else num_tokens // block_q + num_reqs  # prefill: programs past the end exit
    if num_splits is None:
        num_splits = choose_num_splits(programs * kv_heads, max_seq_len, block_n, query.device, programs_per_sm)
    use_splits = num_splits > 1
    pad_v = _pow2(rank_v)
    if use_splits:
        partial = torch.empty(num_tokens, num_heads, num_splits, pad_v, dtype=torch.float32, device=query.device)
        stats = torch.empty(num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=query.device)
    else:
        partial = stats = out  # unused
    if latent_dtype == "auto":
        scales = kv_cache  # unused
    else:
        kv_cache, scales = page_views(kv_cache, latent_dtype)
        scales = scales.view(torch.float16)
    strides = (query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
               scales.stride(0), scales.stride(1), scales.stride(2),
               block_table.stride(0), cos_sin_cache.stride(0), out.stride(0), out.stride(1),
               partial.stride(0), partial.stride(1), partial.stride(2) if use_splits else 0)
    shapes = dict(HEADS_PER_KV=heads_per_kv, GROUP_SIZE=group_size, HEAD_DIM=head_dim, HALF=head_dim // 2,
                  RANK_K=rank_k, RANK_V=rank_v, RK0=rk0, RK1=max(rk1, 16), RV0=rv0, RV1=max(rv1, 16),
                  SPLIT_K=rk1 > 0, SPLIT_V=rv1 > 0, LATENT=LATENT_CODES[latent_dtype], K0_LIMIT=k_limit,
                  K1_OFFSET=k_limit if latent_dtype == "int4" else rk0, V0_LIMIT=v_limit,
                  V1_OFFSET=v_limit if latent_dtype == "int4" else rv0, KEY_DTYPE=TRITON_DTYPES[key_dtype],
                  ACC_DTYPE=TRITON_DTYPES[acc_dtype], BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2],
                  NUM_SPLITS=num_splits, HAS_BIAS=k_bias is not None, USE_SPLITS=use_splits, **tuning)
    bias = k_bias if k_bias is not None else k_up_heads  # unused when HAS_BIAS is false
    global last_kernel
    last_kernel = paged_latent_attention_kernel[(programs, kv_heads, num_splits)](
        query, kv_cache, scales, k_up_heads, bias, cos_sin_cache, block_table, seq_lens, query_start_loc, cu_qblocks, out,
        partial, stats, num_reqs, num_heads, scale * LOG2E, *strides, BLOCK_Q=block_q, BLOCK_M=block_m,
        DECODE=decode, **shapes)
    if use_splits:
        reduce_splits_kernel[(num_tokens, num_heads)](
            partial, stats, out, partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0),
            out.stride(1), num_heads, RANK_V=rank_v, PAD_V=pad_v, NUM_SPLITS=num_splits)
    return out
