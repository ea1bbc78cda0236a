"""Triton kernels of the prefill path (launchers: :func:`vllm_palu.attention.ops.prefill_attention` and
:mod:`vllm_palu.attention.flash_prefill`).

A prefill chunk of q tokens attends over its whole context, so rebuilding keys inside the attention loop would
rebuild every key tile once per query tile (q / 32 times for Llama-3-8B). Here the context is rebuilt once
instead, in two parts per request:

- the **new tokens** (positions ``seq_len - q_len ..``), their keys packed by token like the queries: attended
  causally;
- the **cached prefix** before them, in windows of ``window_tokens`` positions per request (the workspace stays
  bounded for any context length): visible to every new token, attended without a mask;

or, where every request's whole context fits its window slot, in **one part**: prefix and new tokens in the slot,
attended causally (one rebuild and one attention launch, no state carried between parts).

1. ``rebuild_context_kernel``: one program per (tile, request, KV head) reads a latent tile from the paged cache,
   rebuilds and rotates that KV head's keys and writes them, with its group's dequantized V latents (in the shared
   layout, the one latent the keys were rebuilt from), into the workspace, each zero-padded to the workspace's
   width: ``keys [rows, kv_heads, KEY_WIDTH]``, ``values [rows, kv_heads, V_WIDTH]``, FlashAttention's layout.
2. ``prefill_attention_kernel`` (where vLLM's FlashAttention is not used): FlashAttention over one part, one program
   per (query tile, request, KV head), the query tile packing BLOCK_Q tokens x the KV head's query heads (GQA),
   values in V-latent space. Prefix windows first, the new tokens last; the softmax state is carried between the
   launches in fp32 scratch.

Requests, windows and parts are run-time arguments: one compiled kernel each per layer shape. Imports no vLLM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_palu.attention.kernels import _load_tile, _rebuild


# What a launch's part of the context is (the ``part`` argument of both kernels).
PREFIX_WINDOW = 0  # a window of the cached prefix, in the request's window slot: no mask
NEW_TOKENS = 1  # the new tokens, packed like the queries: causal
WHOLE_CONTEXT = 2  # prefix and new tokens together in the request's window slot (it fits): causal, the only part


@triton.jit
def _part_range(seq_len, q_start, q_len, local_request, first_token, window_start, window_tokens, part):
    """Context positions [start, end) of one request in the part being processed, and the workspace row of
    position ``start``: the new tokens (``NEW_TOKENS``) packed by token index, or a window of ``window_tokens``
    positions at ``window_start`` in the request's slot, of the prefix (``PREFIX_WINDOW``) or of the whole
    context (``WHOLE_CONTEXT``)."""
    prefix = seq_len - q_len
    if part == 1:  # NEW_TOKENS
        start = prefix
        end = seq_len
        row = (q_start - first_token).to(tl.int64)
    else:
        start = window_start
        end = tl.minimum(window_start + window_tokens, tl.where(part == 2, seq_len, prefix))
        row = local_request.to(tl.int64) * window_tokens
    return start, end, row


@triton.jit(do_not_specialize=["first_request", "first_token", "window_start", "window_tokens", "part"])
def rebuild_context_kernel(
    cache_ptr, v_cache_ptr, scale_ptr, k_up_ptr, k_bias_ptr, cos_sin_ptr, block_table_ptr, seq_lens_ptr,
    query_start_ptr, keys_ptr, values_ptr,
    first_request, first_token, window_start, window_tokens, part,
    stride_cb, stride_cg, stride_cn, stride_vb, stride_vg,
    stride_sb, stride_sg, stride_sn,
    stride_bt, stride_cs,
    stride_kr, stride_kh, stride_vr, stride_vh,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, KEY_WIDTH: tl.constexpr,
    K_FILL: tl.constexpr, RANK_K: tl.constexpr,
    RANK_V: tl.constexpr, V_WIDTH: tl.constexpr, V_FILL: tl.constexpr, RK0: tl.constexpr, RK1: tl.constexpr,
    RV0: tl.constexpr, RV1: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr, K0_LIMIT: tl.constexpr,
    K1_OFFSET: tl.constexpr, V0_LIMIT: tl.constexpr, V1_OFFSET: tl.constexpr, LATENT: tl.constexpr,
    V_OFFSET: tl.constexpr, V_SCALE: tl.constexpr, OPERAND_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, FILL_ROWS: tl.constexpr,
):
    """Rotated keys of one KV head and its group's V latents, for one tile of a request's part (``_part_range``),
    into the workspace rows of that part. ``V_FILL`` / ``K_FILL``: the power-of-two tiles of zero columns after
    RANK_V / HEAD_DIM (0: the width is the rank / the head dim; FlashAttention wants one width for K and V, which a
    V rank over the head dim sets for both). Shared layout (``V_OFFSET`` 0): the V latents written are the shared
    latent, taken
    from the K tile loaded for the keys (``_load_tile``)."""
    tile = tl.program_id(0)
    local_request = tl.program_id(1)
    kv_head = tl.program_id(2)
    request = first_request + local_request
    seq_len = tl.load(seq_lens_ptr + request)
    q_start = tl.load(query_start_ptr + request)
    q_len = tl.load(query_start_ptr + request + 1) - q_start
    start, end, row = _part_range(seq_len, q_start, q_len, local_request, first_token, window_start, window_tokens,
                                  part)
    cols = tl.arange(0, BLOCK_N)
    positions = start + tile * BLOCK_N + cols
    # A window part's rows go on past its end with zeros, up to FlashAttention's widest key tile (FILL_ROWS): its
    # last tile of a context reads there, and a 0 weight times uninitialized workspace (NaN) would poison the
    # output. An empty part is not read (seqused_k 0); new tokens are packed, each request's followed by the next's.
    fill_end = tl.minimum(window_start + window_tokens, end + FILL_ROWS)
    fill_end = tl.where((part == 1) | (end <= start), end, fill_end)
    if start + tile * BLOCK_N >= fill_end:
        return
    in_range = positions < end  # what is read from the cache (zeros past it: zero keys and V latents)
    stored = positions < fill_end
    group = kv_head // GROUP_SIZE
    pages = tl.load(block_table_ptr + request.to(tl.int64) * stride_bt + positions // BLOCK_SIZE, mask=in_range,
                    other=0).to(tl.int64)
    slots = positions % BLOCK_SIZE
    token_ptrs = cache_ptr + group.to(tl.int64) * stride_cg + pages * stride_cb + slots * stride_cn
    scale_rows = scale_ptr + group.to(tl.int64) * stride_sg + pages * stride_sb + slots * stride_sn
    rk0 = tl.arange(0, RK0)
    rk1 = K1_OFFSET + tl.arange(0, RK1)
    rv0 = tl.arange(0, RV0)
    rv1 = V1_OFFSET + tl.arange(0, RV1)
    v_codes_0 = in_range  # a 16-bit or shared layout's V comes with the rows (_load_tile)
    v_codes_1 = in_range
    if LATENT != 0 and V_OFFSET != 0:  # key-major V payloads, gathered: this pass is cheap
        v_bytes = (v_cache_ptr + group.to(tl.int64) * stride_vg + pages * stride_vb + slots)[None, :]
        v_codes_0 = tl.load(v_bytes + rv0[:, None] * BLOCK_SIZE, mask=in_range[None, :] & (rv0[:, None] < V0_LIMIT),
                            other=0)
        v_codes_1 = v_codes_0
        if SPLIT_V:
            v_codes_1 = tl.load(v_bytes + rv1[:, None] * BLOCK_SIZE,
                                mask=in_range[None, :] & (rv1[:, None] < RANK_V), other=0)
    latent_0, latent_1, v_0, v_1, v_scale, v_min, _ = _load_tile(
        token_ptrs, scale_rows, in_range, rk0, rk1, rv0, rv1, RANK_K, RANK_V, K0_LIMIT, V0_LIMIT, SPLIT_K, SPLIT_V,
        LATENT, V_OFFSET, V_SCALE, OPERAND_DTYPE, False, v_codes_0, v_codes_1)
    rows = row + tile * BLOCK_N + cols

    # Keys: rebuilt with fp32 accumulation (this pass is cheap), rotated in fp32, stored in the workspace dtype.
    dims = tl.arange(0, HALF)
    up_base = k_up_ptr + kv_head.to(tl.int64) * HEAD_DIM * RANK_K
    up_lo_0 = tl.load(up_base + dims[None, :] * RANK_K + rk0[:, None], mask=rk0[:, None] < K0_LIMIT, other=0.0)
    up_hi_0 = tl.load(up_base + (HALF + dims[None, :]) * RANK_K + rk0[:, None], mask=rk0[:, None] < K0_LIMIT,
                      other=0.0)
    up_lo_1 = tl.load(up_base + dims[None, :] * RANK_K + rk1[:, None], mask=rk1[:, None] < RANK_K, other=0.0)
    up_hi_1 = tl.load(up_base + (HALF + dims[None, :]) * RANK_K + rk1[:, None], mask=rk1[:, None] < RANK_K,
                      other=0.0)
    key_lo = _rebuild(latent_0, latent_1, up_lo_0.to(OPERAND_DTYPE), up_lo_1.to(OPERAND_DTYPE), SPLIT_K,
                      tl.float32, tl.float32, DOT_PRECISION)
    key_hi = _rebuild(latent_0, latent_1, up_hi_0.to(OPERAND_DTYPE), up_hi_1.to(OPERAND_DTYPE), SPLIT_K,
                      tl.float32, tl.float32, DOT_PRECISION)
    if HAS_BIAS:
        key_lo += tl.load(k_bias_ptr + kv_head * HEAD_DIM + dims).to(tl.float32)[None, :]
        key_hi += tl.load(k_bias_ptr + kv_head * HEAD_DIM + HALF + dims).to(tl.float32)[None, :]
    rope = cos_sin_ptr + positions.to(tl.int64)[:, None] * stride_cs + dims[None, :]
    cos = tl.load(rope, mask=in_range[:, None], other=0.0).to(tl.float32)
    sin = tl.load(rope + HALF, mask=in_range[:, None], other=0.0).to(tl.float32)
    key_rows = keys_ptr + rows[:, None] * stride_kr + kv_head * stride_kh + dims[None, :]
    key_dtype = keys_ptr.dtype.element_ty
    tl.store(key_rows, (key_lo * cos - key_hi * sin).to(key_dtype), mask=stored[:, None])
    tl.store(key_rows + HALF, (key_hi * cos + key_lo * sin).to(key_dtype), mask=stored[:, None])
    if K_FILL > 0:
        key_fill = HEAD_DIM + tl.arange(0, K_FILL)
        tl.store(keys_ptr + rows[:, None] * stride_kr + kv_head * stride_kh + key_fill[None, :],
                 tl.zeros([BLOCK_N, K_FILL], key_dtype), mask=stored[:, None] & (key_fill[None, :] < KEY_WIDTH))

    # The group's V latents in this KV head's slot (transposed tiles [rank chunk, BLOCK_N]), zeros after RANK_V.
    value_rows = values_ptr + rows[None, :] * stride_vr + kv_head * stride_vh
    value_dtype = values_ptr.dtype.element_ty
    value_0 = v_0.to(tl.float32)
    value_1 = v_1.to(tl.float32)
    if LATENT != 0:  # quantized: code * scale (+ min for int4)
        value_0 = value_0 * v_scale[None, :]
        value_1 = value_1 * v_scale[None, :]
        if LATENT == 2:
            value_0 += v_min[None, :]
            value_1 += v_min[None, :]
    tl.store(value_rows + rv0[:, None], value_0.to(value_dtype), mask=stored[None, :] & (rv0[:, None] < V0_LIMIT))
    if SPLIT_V:
        tl.store(value_rows + rv1[:, None], value_1.to(value_dtype),
                 mask=stored[None, :] & (rv1[:, None] < RANK_V))
    if V_FILL > 0:
        fill = RANK_V + tl.arange(0, V_FILL)
        tl.store(value_rows + fill[:, None], tl.zeros([V_FILL, BLOCK_N], value_dtype),
                 mask=stored[None, :] & (fill[:, None] < V_WIDTH))


@triton.jit(do_not_specialize=["first_request", "first_token", "window_start", "window_tokens", "part",
                               "first_part", "last_part"])
def prefill_attention_kernel(
    q_ptr, keys_ptr, values_ptr, seq_lens_ptr, query_start_ptr, out_ptr, state_ptr, scale,
    first_request, first_token, window_start, window_tokens, part, first_part, last_part,
    stride_qt, stride_qh,
    stride_kr, stride_kh, stride_vr, stride_vh,
    stride_ot, stride_oh,
    HEADS_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, RANK_V: tl.constexpr, PAD_V: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, prefill request, KV head) over one part of the context (``_part_range``).
    Unless it is the only part, the softmax state of every query row is carried between launches in ``state
    [prefill tokens, heads, PAD_V + 2]`` (unnormalized sums, then m and l): each part's own state is merged into it
    after the part's loop, and the last part writes the normalized output."""
    tile = tl.program_id(0)
    local_request = tl.program_id(1)
    kv_head = tl.program_id(2)
    request = first_request + local_request
    q_start = tl.load(query_start_ptr + request)
    q_len = tl.load(query_start_ptr + request + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + request)
    start, end, row = _part_range(seq_len, q_start, q_len, local_request, first_token, window_start, window_tokens,
                                  part)

    # Query rows (the M side): BLOCK_Q tokens x HEADS_PER_KV heads of this KV head.
    rows = tl.arange(0, BLOCK_M)
    row_token = tile * BLOCK_Q + rows // HEADS_PER_KV
    row_head = kv_head * HEADS_PER_KV + rows % HEADS_PER_KV
    row_valid = (rows < BLOCK_Q * HEADS_PER_KV) & (row_token < q_len)
    row_pos = seq_len - q_len + row_token
    dims = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + (q_start + row_token).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=row_valid[:, None], other=0.0)

    # The keys this tile's rows can see; tiles wholly below every row's causal limit need no mask.
    part_end = tl.minimum(end, seq_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len))
    unmasked_end = tl.maximum(start, tl.minimum(part_end, seq_len - q_len + tile * BLOCK_Q + 1))
    unmasked_end = start + (unmasked_end - start) // BLOCK_N * BLOCK_N

    cols = tl.arange(0, BLOCK_N)
    rv = tl.arange(0, PAD_V)
    base = row - start  # workspace row of context position p: base + p
    key_cols = keys_ptr + kv_head * stride_kh + dims[:, None]
    value_cols = values_ptr + kv_head * stride_vh + rv[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, PAD_V], tl.float32)
    for key_start in range(start, part_end, BLOCK_N):
        positions = key_start + cols
        in_range = positions < part_end
        keys_t = tl.load(key_cols + (base + positions)[None, :] * stride_kr, mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, keys_t, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if key_start >= unmasked_end:
            visible = in_range[None, :] & (positions[None, :] <= row_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        values = tl.load(value_cols + (base + positions)[:, None] * stride_vr,
                         mask=in_range[:, None] & (rv[None, :] < RANK_V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=DOT_PRECISION)
        m_i = m_new

    # The parts before this one, folded in after the loop (state kept out of the loop: no registers held across it).
    num_heads = HEADS_PER_KV * tl.num_programs(2)
    state_rows = state_ptr + ((q_start + row_token - first_token).to(tl.int64) * num_heads + row_head) * (PAD_V + 2)
    out_mask = row_valid[:, None] & (rv[None, :] < RANK_V)
    if not first_part:
        m_prev = tl.load(state_rows + PAD_V, mask=row_valid, other=float("-inf"))
        l_prev = tl.load(state_rows + PAD_V + 1, mask=row_valid, other=0.0)
        acc_prev = tl.load(state_rows[:, None] + rv[None, :], mask=out_mask, other=0.0)
        m_new = tl.maximum(m_i, m_prev)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weight_prev = tl.exp2(m_prev - m_safe)
        weight_this = tl.exp2(m_i - m_safe)
        acc = acc * weight_this[:, None] + acc_prev * weight_prev[:, None]
        l_i = l_i * weight_this + l_prev * weight_prev
        m_i = m_new
    if last_part:
        inverse = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        out_rows = out_ptr + (q_start + row_token).to(tl.int64)[:, None] * stride_ot + row_head[:, None] * stride_oh
        tl.store(out_rows + rv[None, :], (acc * inverse[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(state_rows[:, None] + rv[None, :], acc, mask=out_mask)
        tl.store(state_rows + PAD_V, m_i, mask=row_valid)
        tl.store(state_rows + PAD_V + 1, l_i, mask=row_valid)
