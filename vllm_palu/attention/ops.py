"""Launchers of the Triton kernels: shapes, strides, tile sizes, grids and the split-KV choice. Same signatures and
shape contract as :mod:`vllm_palu.attention.reference` (the fp32 oracle); the kernels are in
:mod:`vllm_palu.attention.kernels`. Imports no vLLM; runs on CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from vllm_palu.attention.latent_quant import SCALE_BYTES, page_views, rank_v_of_row, row_bytes
from vllm_palu.attention.kernels import (paged_latent_attention_kernel, reduce_splits_kernel, write_latents_kernel,
                                        write_quantized_latents_kernel)
from vllm_palu.attention.prefill_kernels import prefill_attention_kernel, rebuild_context_kernel

LOG2E = 1.4426950408889634


def _pow2(value: int, minimum: int = 16) -> int:
    """Smallest power of two >= value (at least ``minimum``); plain int arithmetic, it runs on every launch."""
    return max(minimum, 1 << max(value - 1, 0).bit_length())


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
# Facts derived once per rotary table, keyed by the table object (vLLM keeps one per model) and its version
# counter (in-place edits): a freed table's entries go with it, so a new table at the same address is never
# mistaken for it.
_converted_tables = WeakIdKeyDictionary()  # table -> {(version, dtype): converted table}
_shiftable_tables = WeakIdKeyDictionary()  # table -> {(version, block_n): bool}
last_kernel = None  # the last compiled attention kernel launched (registers, SASS: scripts/kernel_anatomy.py)


def rotary_table(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's cos/sin table in the kernels' key dtype, converted once per table (not per tile in the kernel:
    bf16 -> fp16 costs two conversions per element there)."""
    if cos_sin_cache.dtype == dtype:
        return cos_sin_cache
    known = _converted_tables.setdefault(cos_sin_cache, {})
    key = (cos_sin_cache._version, dtype)
    if key not in known:
        known.clear()
        known[key] = cos_sin_cache.to(dtype)
    return known[key]


def rotary_is_shiftable(table: torch.Tensor, block_n: int) -> bool:
    """Whether rows of the cos/sin table are rotations that compose, R(start + j) = R(start) R(j), for every tile
    start (a multiple of ``block_n``) and offset j < block_n: true of cos/sin(position x frequency) with any
    frequencies (plain, linear, NTK, Llama-3 scaling), false where the table carries a magnitude (YaRN's mscale:
    cos^2 + sin^2 != 1) or changes frequencies along positions. The tolerances admit a bf16 table of 128K
    positions (angles rounded in fp32, entries in bf16: composition error up to ~0.01). Decided once per table
    (one device sync; never while a CUDA graph is being captured: there the answer is no, always correct)."""
    known = _shiftable_tables.setdefault(table, {})
    key = (table._version, block_n)
    if key not in known:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        positions, width = table.shape
        usable = (positions // block_n) * block_n
        if usable < 2 * block_n:
            return False
        half = width // 2
        offset_cos, offset_sin = table[:block_n, :half].float(), table[:block_n, half:].float()
        worst = torch.zeros((), device=table.device)  # largest error / its tolerance, over every row
        chunk = max(block_n, 4096 // block_n * block_n)  # bounded temporaries (a 128K-row table in fp32: 64 MB)
        for start in range(0, usable, chunk):
            rows = table[start:min(start + chunk, usable)].float().view(-1, block_n, width)
            cos, sin = rows[..., :half], rows[..., half:]
            start_cos, start_sin = cos[:, :1], sin[:, :1]
            worst = torch.stack([
                worst, (cos * cos + sin * sin - 1).abs().max() / 1e-2,
                (start_cos * offset_cos - start_sin * offset_sin - cos).abs().max() / 3e-2,
                (start_sin * offset_cos + start_cos * offset_sin - sin).abs().max() / 3e-2]).max()
        known[key] = bool(worst <= 1)
    return known[key]


def write_latents(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k_latent: torch.Tensor,
                  v_latent: torch.Tensor, latent_dtype: str = "auto") -> None:
    """kv_cache ``[blocks, G, block_size, row]`` (last dim contiguous), latents ``[T, G, rank]``; fp8/int4 latents
    are quantized and scattered into the page layout by one kernel (:mod:`vllm_palu.attention.latent_quant`)."""
    tokens, groups, rank_k = k_latent.shape
    rank_v = v_latent.shape[-1]
    if latent_dtype != "auto":
        _write_quantized(kv_cache, slot_mapping, k_latent, v_latent, latent_dtype)
        return
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


def _write_quantized(kv_cache, slot_mapping, k_latent, v_latent, latent_dtype) -> None:
    """fp8 / int4 latents quantized and scattered into the page layout by one kernel (the contract and its
    PyTorch oracle: :mod:`vllm_palu.attention.latent_quant`)."""
    tokens, groups, rank_k = k_latent.shape
    rank_v = v_latent.shape[-1]
    payload_bytes = row_bytes(rank_k, rank_v, latent_dtype) - SCALE_BYTES[latent_dtype]  # ValueError: bad ranks
    payload, scales = page_views(kv_cache, latent_dtype)
    scales = scales.view(torch.float16)
    assert k_latent.stride(-1) == 1 and v_latent.stride(-1) == 1 and slot_mapping.shape[0] >= tokens
    assert payload.shape[-1] == payload_bytes
    if tokens == 0:
        return
    int4 = latent_dtype == "int4"
    write_quantized_latents_kernel[(tokens, groups)](
        k_latent, v_latent, payload, scales, slot_mapping,
        k_latent.stride(0), k_latent.stride(1), v_latent.stride(0), v_latent.stride(1),
        payload.stride(0), payload.stride(1), payload.stride(2), scales.stride(0), scales.stride(1),
        scales.stride(2), BLOCK_SIZE=kv_cache.shape[2], RANK_K=rank_k, RANK_V=rank_v,
        PAD_K=_pow2(rank_k, 2), PAD_V=_pow2(rank_v, 2), INT4=int4)


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
    wanted = math.ceil(programs_per_sm * _multiprocessors(device) / max(programs, 1))
    most = max(1, max_seq_len // (4 * block_n))  # keep >= 4 tiles per split
    return int(min(_pow2(wanted, 1), _pow2(most, 1) // 2 or 1, 64))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rank_tiles(rank_k: int, rank_v: int, latent_dtype: str, split_ranks: bool = True) -> dict:
    """The kernels' rank constexprs: tiles covering the K and V latents (one chunk, or two with less padding; int4
    pages hold both halves of a rank in one byte tile: two chunks of rank / 2). Computed once per shape: this
    runs on every launch."""
    return dict(_rank_tile_items(rank_k, rank_v, latent_dtype, split_ranks))


@functools.lru_cache(maxsize=256)
def _rank_tile_items(rank_k: int, rank_v: int, latent_dtype: str, split_ranks: bool) -> tuple:
    if latent_dtype == "int4":
        rk0 = rk1 = _pow2(rank_k // 2)
        rv0 = rv1 = _pow2(rank_v // 2)
        k_limit, v_limit = rank_k // 2, rank_v // 2
    else:
        rk0, rk1 = rank_chunks(rank_k) if split_ranks else (_pow2(rank_k), 0)
        rv0, rv1 = rank_chunks(rank_v) if split_ranks else (_pow2(rank_v), 0)
        k_limit, v_limit = rank_k, rank_v
    return tuple(dict(RANK_K=rank_k, RANK_V=rank_v, RK0=rk0, RK1=max(rk1, 16), RV0=rv0, RV1=max(rv1, 16),
                      SPLIT_K=rk1 > 0, SPLIT_V=rv1 > 0, LATENT=LATENT_CODES[latent_dtype], K0_LIMIT=k_limit,
                      K1_OFFSET=k_limit if latent_dtype == "int4" else rk0, V0_LIMIT=v_limit,
                      V1_OFFSET=v_limit if latent_dtype == "int4" else rv0).items())


def _cache_views(kv_cache: torch.Tensor, latent_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent rows, fp16 scale rows); the scale view is the cache itself (unused) for 16-bit latents."""
    if latent_dtype == "auto":
        return kv_cache, kv_cache
    payload, scales = page_views(kv_cache, latent_dtype)
    return payload, scales.view(torch.float16)


def _query_tiles(query_start_loc: torch.Tensor, block_q: int) -> torch.Tensor:
    """Start tile of every request when each request's tokens are cut into tiles of ``block_q`` (relative to the
    first request; one spare tile per request absorbs the rounding, its programs exit at once)."""
    relative = query_start_loc - query_start_loc[:1]
    arange = torch.arange(query_start_loc.shape[0], device=query_start_loc.device)
    return (relative // block_q + arange).to(torch.int32)


def paged_latent_attention(query: torch.Tensor, kv_cache: torch.Tensor, k_up: torch.Tensor,
                           k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                           scale: float, *, max_query_len: int | None = None, max_seq_len: int | None = None,
                           num_decodes: int = 0, num_decode_tokens: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           tuning: dict | None = None, latent_dtype: str = "auto") -> torch.Tensor:
    """Triton version of :func:`vllm_palu.attention.reference.paged_latent_attention`; output in query dtype.

    Batches with a prompt chunk go through the prefill path (:func:`prefill_latent_attention`): when the first
    ``num_decodes`` requests have at most one new token each (vLLM's reordered batches; ``num_decode_tokens`` in
    all, default one each), those take the fused kernel and the rest the prefill path; without it every request
    takes the prefill path. ``latent_dtype`` "fp8" / "int4": the cache holds quantized pages
    (:mod:`vllm_palu.attention.latent_quant`). ``tuning`` (benchmarks, scripts/kernel_variants.py): block_n,
    num_warps, num_stages, maxnreg, programs_per_sm, split_ranks, key_dtype, acc_dtype, convert_table, rope_shift,
    decode_kernel, min_rows (decode query tile rows), prefill ("workspace" or "fused") and the prefill_* keys of
    :func:`prefill_latent_attention`; defaults are the measured best."""
    num_tokens, num_heads, _ = query.shape
    rank_k = k_up.shape[-1]
    row = kv_cache.shape[-1]
    rank_v = row - rank_k if latent_dtype == "auto" else rank_v_of_row(row, rank_k, latent_dtype)
    if out is None:
        out = query.new_empty(num_tokens, num_heads, rank_v)
    if num_tokens == 0:
        return out
    max_query_len = int(query_start_loc.diff().max()) if max_query_len is None else max_query_len
    max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    tuning = dict(tuning or {})
    prefill_tuning = {key: tuning.pop(key) for key in list(tuning) if key.startswith("prefill")}
    args = (kv_cache, k_up, k_bias, cos_sin_cache, is_neox_style)
    if max_query_len == 1 or prefill_tuning.pop("prefill", "workspace") == "fused":
        return _fused_attention(query, *args, query_start_loc, seq_lens, block_table, scale, max_query_len,
                                max_seq_len, num_splits, out, tuning, latent_dtype)
    decode_tokens = num_decodes if num_decode_tokens is None else num_decode_tokens
    if num_decodes:
        _fused_attention(query[:decode_tokens], *args, query_start_loc[:num_decodes + 1], seq_lens[:num_decodes],
                         block_table[:num_decodes], scale, 1, max_seq_len, num_splits, out[:decode_tokens], tuning,
                         latent_dtype)
    return prefill_latent_attention(query, *args, query_start_loc, seq_lens, block_table, scale,
                                    first_request=num_decodes, first_token=decode_tokens, max_seq_len=max_seq_len,
                                    out=out, latent_dtype=latent_dtype, **prefill_tuning)


def _fused_attention(query, kv_cache, k_up, k_bias, cos_sin_cache, is_neox_style, query_start_loc, seq_lens,
                     block_table, scale, max_query_len, max_seq_len, num_splits, out, tuning, latent_dtype):
    """``paged_latent_attention_kernel``: keys rebuilt per KV tile inside the attention loop (decode; prefill when
    tuning asks for "fused")."""
    num_tokens, num_heads, head_dim = query.shape
    num_groups, group_width, rank_k = k_up.shape
    group_size = group_width // head_dim
    kv_heads = num_groups * group_size
    num_reqs = seq_lens.shape[0]
    if cos_sin_cache.shape[-1] != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported by the Triton PALU kernels")
    assert kv_cache.stride(-1) == 1 and num_heads % kv_heads == 0
    query, k_up_heads, k_bias = _rotary_layout(query, k_up, k_bias, is_neox_style)

    heads_per_kv = num_heads // kv_heads
    decode = max_query_len == 1
    # 16-bit models rebuild, rotate and score keys in fp16: packed math and half the registers of fp32 tiles.
    key_dtype = tuning.pop("key_dtype", torch.float32 if query.dtype == torch.float32 else torch.float16)
    acc_dtype = tuning.pop("acc_dtype", torch.float32 if key_dtype == torch.bfloat16 else key_dtype)
    if tuning.pop("convert_table", True):
        cos_sin_cache = rotary_table(cos_sin_cache, key_dtype)
    # Defaults measured on the H200 (docs/KERNEL_NOTES.md "Version 3.4"). Decode with 16-bit latents: one-warp
    # programs with double-buffered latents (3 stages), keys rotated by their offset in the tile (a loop-invariant
    # table) and the query back by the tile's start, so no cos/sin tile is staged per KV tile; 16-key tiles for GQA
    # with latent rows of 128+ (Llama-3-8B kv 0.5: 347 -> 322 us), 32 keys otherwise. Quantized latents, whose
    # dequantization needs the registers: two-warp programs of 64 keys, one buffer, the per-tile table.
    if not decode:
        block_n, tile = 64, {"num_warps": 4, "num_stages": 3}
    elif latent_dtype == "auto":
        wide = heads_per_kv > 1 and kv_cache.shape[-1] >= 128  # latent row: rank_k + rank_v
        block_n = 16 if wide and rotary_is_shiftable(cos_sin_cache, 16) else 32
        tile = {"num_warps": 1, "num_stages": 3}
    else:
        block_n, tile = 64, {"num_warps": 2, "num_stages": 2}
    tuning = {**tile, **tuning}
    block_n = tuning.pop("block_n", block_n if query.device.type == "cuda" else 32)
    programs_per_sm = tuning.pop("programs_per_sm", 8)
    ranks = _rank_tiles(rank_k, out.shape[-1], latent_dtype, tuning.pop("split_ranks", True))
    decode = tuning.pop("decode_kernel", decode) and decode
    rope_shift = (tuning.pop("rope_shift", latent_dtype == "auto") and decode
                  and rotary_is_shiftable(cos_sin_cache, block_n))
    # Decode: the query tile is one token's heads of a KV head; fused prefill: 64+ rows of several tokens.
    # Decode rows: the KV head's query heads, padded to a power of two only (not to 16: Triton pads tiny dots
    # itself, and the softmax and accumulators shrink; Llama-3-8B 476 -> 421 µs, Llama-2-7B kv 0.25 1113 -> 962).
    block_m = _pow2(heads_per_kv, tuning.pop("min_rows", 1)) if decode else max(64, _pow2(heads_per_kv))
    block_q = max(1, block_m // heads_per_kv)
    # Prefill tiles find their request in cu_qblocks (query-tile starts); decode programs are requests and skip it.
    cu_qblocks = query_start_loc if decode else _query_tiles(query_start_loc, block_q)
    programs = num_reqs if decode else num_tokens // block_q + num_reqs  # prefill: programs past the end exit
    if num_splits is None:
        num_splits = choose_num_splits(programs * kv_heads, max_seq_len, block_n, query.device, programs_per_sm)
    use_splits = num_splits > 1
    rank_v = out.shape[-1]
    pad_v = _pow2(rank_v)
    if use_splits:
        partial = torch.empty(num_tokens, num_heads, num_splits, pad_v, dtype=torch.float32, device=query.device)
        stats = torch.empty(num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=query.device)
    else:
        partial = stats = out  # unused
    kv_cache, scales = _cache_views(kv_cache, latent_dtype)
    strides = (query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
               scales.stride(0), scales.stride(1), scales.stride(2),
               block_table.stride(0), cos_sin_cache.stride(0), out.stride(0), out.stride(1),
               partial.stride(0), partial.stride(1), partial.stride(2) if use_splits else 0)
    shapes = dict(HEADS_PER_KV=heads_per_kv, GROUP_SIZE=group_size, HEAD_DIM=head_dim, HALF=head_dim // 2,
                  KEY_DTYPE=TRITON_DTYPES[key_dtype], ACC_DTYPE=TRITON_DTYPES[acc_dtype], BLOCK_N=block_n,
                  BLOCK_SIZE=kv_cache.shape[2], NUM_SPLITS=num_splits, HAS_BIAS=k_bias is not None,
                  USE_SPLITS=use_splits, ROPE_SHIFT=rope_shift, **ranks, **tuning)
    bias = k_bias if k_bias is not None else k_up_heads  # unused when HAS_BIAS is false
    global last_kernel
    last_kernel = paged_latent_attention_kernel[(programs, kv_heads, num_splits)](
        query, kv_cache, scales, k_up_heads, bias, cos_sin_cache, block_table, seq_lens, query_start_loc, cu_qblocks,
        out, partial, stats, num_reqs, num_heads, scale * LOG2E, *strides, BLOCK_Q=block_q, BLOCK_M=block_m,
        DECODE=decode, **shapes)
    if use_splits:
        _reduce_splits(partial, stats, out)
    return out


def _reduce_splits(partial: torch.Tensor, stats: torch.Tensor, out: torch.Tensor) -> None:
    num_tokens, num_heads, num_splits, pad_v = partial.shape
    reduce_splits_kernel[(num_tokens, num_heads)](
        partial, stats, out, partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0), out.stride(1),
        num_heads, RANK_V=out.shape[-1], PAD_V=pad_v, NUM_SPLITS=num_splits)


def _rotary_layout(query, k_up, k_bias, is_neox_style):
    """Query, per-KV-head key up-projection ``[kv_heads, head_dim, rank_k]`` and key bias in the kernels' NeoX
    layout (GPT-J's pairs permuted into halves, the same way on both sides of q.k)."""
    head_dim = query.shape[-1]
    rank_k = k_up.shape[-1]
    k_up_heads = k_up.reshape(-1, head_dim, rank_k)
    permutation = rotary_permutation(head_dim, is_neox_style, query.device)
    if permutation is not None:
        query = query[..., permutation]
        k_up_heads = k_up_heads[:, permutation]
        k_bias = None if k_bias is None else k_bias.view(k_up_heads.shape[0], head_dim)[:, permutation]
    query = query if query.stride(-1) == 1 else query.contiguous()
    return query, k_up_heads.contiguous(), k_bias


def prefill_latent_attention(query: torch.Tensor, kv_cache: torch.Tensor, k_up: torch.Tensor,
                             k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
                             query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                             scale: float, *, out: torch.Tensor, first_request: int = 0, first_token: int = 0,
                             max_seq_len: int | None = None, latent_dtype: str = "auto",
                             prefill_block_m: int | None = None, prefill_block_n: int | None = None,
                             prefill_warps: int | None = None, prefill_stages: int = 3,
                             prefill_workspace_tokens: int = 65536) -> torch.Tensor:
    """Requests ``first_request:`` (their tokens are ``query[first_token:]``): rebuild each request's context keys
    once into a workspace (:mod:`vllm_palu.attention.prefill_kernels`), then FlashAttention over it.

    The workspace holds ``prefill_workspace_tokens`` context positions in all (a window per request: Llama-3-8B,
    3 KiB a position, 192 MiB); longer contexts go window by window, merged like KV splits."""
    num_heads, head_dim = query.shape[1:]
    num_groups, group_width, rank_k = k_up.shape
    group_size = group_width // head_dim
    kv_heads = num_groups * group_size
    heads_per_kv = num_heads // kv_heads
    rank_v = out.shape[-1]
    if cos_sin_cache.shape[-1] != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported by the Triton PALU kernels")
    query_start_loc, seq_lens, block_table = (query_start_loc[first_request:], seq_lens[first_request:],
                                              block_table[first_request:])
    num_reqs = seq_lens.shape[0]
    num_tokens = query.shape[0] - first_token
    max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    query, k_up_heads, k_bias = _rotary_layout(query, k_up, k_bias, is_neox_style)

    on_gpu = query.device.type == "cuda"
    # Defaults measured on the H200 with scripts/prefill_variants.py (docs/KERNEL_NOTES.md).
    block_n = prefill_block_n or (64 if on_gpu else 16)
    block_m = max(prefill_block_m or (256 if on_gpu else 16), _pow2(heads_per_kv))
    block_q = block_m // heads_per_kv
    window = max(block_n, prefill_workspace_tokens // num_reqs // block_n * block_n)
    window = min(window, triton.cdiv(max_seq_len, block_n) * block_n)
    num_windows = triton.cdiv(max_seq_len, window)
    keys = query.new_empty(num_reqs * window, kv_heads, head_dim)
    values = query.new_empty(num_reqs * window, num_groups, rank_v)
    payload, scales = _cache_views(kv_cache, latent_dtype)
    ranks = _rank_tiles(rank_k, rank_v, latent_dtype)
    cu_qblocks = _query_tiles(query_start_loc, block_q)
    programs = num_tokens // block_q + num_reqs
    use_splits = num_windows > 1
    pad_v = _pow2(rank_v)
    splits = _pow2(num_windows, 1)
    if use_splits:  # windows past a request's context leave m = -inf, l = 0 behind: weight 0 in the reduction
        partial = torch.zeros(out.shape[0], num_heads, splits, pad_v, dtype=torch.float32, device=query.device)
        stats = torch.zeros(out.shape[0], num_heads, splits, 2, dtype=torch.float32, device=query.device)
        stats[..., 0] = float("-inf")
    else:
        partial = stats = out  # unused
    bias = k_bias if k_bias is not None else k_up_heads  # unused when HAS_BIAS is false
    for index in range(num_windows):
        start = index * window
        rebuild_context_kernel[(window // block_n, num_reqs, kv_heads)](
            payload, scales, k_up_heads, bias, cos_sin_cache, block_table, seq_lens, keys, values,
            start, window, payload.stride(0), payload.stride(1), payload.stride(2),
            scales.stride(0), scales.stride(1), scales.stride(2), block_table.stride(0), cos_sin_cache.stride(0),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            GROUP_SIZE=group_size, HEAD_DIM=head_dim, HALF=head_dim // 2, **ranks,
            OPERAND_DTYPE=TRITON_DTYPES[query.dtype], HAS_BIAS=k_bias is not None, BLOCK_N=block_n,
            BLOCK_SIZE=payload.shape[2], num_warps=4)
        prefill_attention_kernel[(programs, kv_heads)](
            query, keys, values, seq_lens, query_start_loc, cu_qblocks, out, partial, stats,
            num_reqs, num_heads, scale * LOG2E, start, window, index,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            out.stride(0), out.stride(1), partial.stride(0), partial.stride(1),
            partial.stride(2) if use_splits else 0,
            HEADS_PER_KV=heads_per_kv, GROUP_SIZE=group_size, HEAD_DIM=head_dim, RANK_V=rank_v, PAD_V=pad_v,
            BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=splits, USE_SPLITS=use_splits,
            num_warps=prefill_warps or (8 if on_gpu else 4), num_stages=prefill_stages)
    if use_splits:
        _reduce_splits(partial[first_token:], stats[first_token:], out[first_token:])
    return out
