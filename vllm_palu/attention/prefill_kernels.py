"""Triton kernels of the prefill path (launcher: :func:`vllm_palu.attention.ops.prefill_attention`).

A prefill chunk of q tokens attends over its whole context, so rebuilding keys inside the attention loop would
rebuild every key tile once per query tile (q / 32 times for Llama-3-8B). Here the context is rebuilt once
instead:

1. ``rebuild_context_kernel``: one program per (context tile, request, KV head) reads a latent tile from
   the paged cache, rebuilds and rotates that KV head's keys and writes them, with the dequantized V latents, into
   a workspace window of ``window_tokens`` positions per request.
2. ``prefill_attention_kernel``: FlashAttention over the workspace, one program per (query tile, request, KV
   head), the query tile packing BLOCK_Q tokens x the KV head's query heads (GQA), values in V-latent space.

Contexts longer than the window run window by window: each window's launch folds its keys into a running
softmax state kept in fp32 scratch rows (m, l and the unnormalized sums), and the last window writes the output,
so the workspace stays bounded (vLLM's MLA backend does the same for its prefill context). Requests and windows
are run-time arguments: one compiled kernel per layer shape. Imports no vLLM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_palu.attention.kernels import _load_tile, _rebuild_half


@triton.jit
def _tile_rows(kv_tile, cols, end, block_table_row, cache_group, scale_group, stride_cb, stride_cn, stride_sb,
               stride_sn, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Positions of a KV tile, which of them exist, and each one's latent row and scale row (through the block
    table; the scale rows are only read for quantized latents)."""
    positions = kv_tile * BLOCK_N + cols
    in_range = positions < end
    pages = tl.load(block_table_row + positions // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slots = positions % BLOCK_SIZE
    return (positions, in_range, cache_group + pages * stride_cb + slots * stride_cn,
            scale_group + pages * stride_sb + slots * stride_sn)


@triton.jit(do_not_specialize=["first_request", "window_start", "window_tokens"])
def rebuild_context_kernel(
    cache_ptr, scale_ptr, k_up_ptr, k_bias_ptr, cos_sin_ptr, block_table_ptr, seq_lens_ptr, keys_ptr, values_ptr,
    first_request, window_start, window_tokens,
    stride_cb, stride_cg, stride_cn,
    stride_sb, stride_sg, stride_sn,
    stride_bt, stride_cs,
    stride_kr, stride_kh, stride_vr, stride_vg,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, RANK_K: tl.constexpr,
    RANK_V: tl.constexpr, RK0: tl.constexpr, RK1: tl.constexpr, RV0: tl.constexpr, RV1: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr, K0_LIMIT: tl.constexpr, K1_OFFSET: tl.constexpr,
    V0_LIMIT: tl.constexpr, V1_OFFSET: tl.constexpr, LATENT: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Workspace row ``r * window_tokens + (position - window_start)`` (r: the request's index among the prefill
    requests, which start at ``first_request``) gets the rotated keys of every KV head ``[kv_heads, HEAD_DIM]`` and
    the V latents of every group ``[groups, RANK_V]`` (dequantized)."""
    tile = tl.program_id(0)
    local_request = tl.program_id(1)
    kv_head = tl.program_id(2)
    request = first_request + local_request
    seq_len = tl.load(seq_lens_ptr + request)
    window_end = tl.minimum(seq_len, window_start + window_tokens)
    kv_tile = window_start // BLOCK_N + tile  # window_start is a multiple of BLOCK_N
    if kv_tile * BLOCK_N >= window_end:
        return
    group = kv_head // GROUP_SIZE
    cols = tl.arange(0, BLOCK_N)
    positions, in_range, token_ptrs, scale_rows = _tile_rows(
        kv_tile, cols, window_end, block_table_ptr + request.to(tl.int64) * stride_bt,
        cache_ptr + group.to(tl.int64) * stride_cg, scale_ptr + group.to(tl.int64) * stride_sg,
        stride_cb, stride_cn, stride_sb, stride_sn, BLOCK_N, BLOCK_SIZE)
    rk0 = tl.arange(0, RK0)
    rk1 = K1_OFFSET + tl.arange(0, RK1)
    rv0 = tl.arange(0, RV0)
    rv1 = V1_OFFSET + tl.arange(0, RV1)
    latent_0, latent_1, v_0, v_1, v_scale, v_min = _load_tile(
        token_ptrs, scale_rows, in_range, rk0, rk1, rv0, rv1, RANK_K, RANK_V, K0_LIMIT, V0_LIMIT, SPLIT_K, SPLIT_V,
        LATENT, OPERAND_DTYPE)
    rows = (local_request.to(tl.int64) * window_tokens + positions - window_start)

    # Keys: rebuilt with fp32 accumulation (this pass is cheap), rotated in fp32, stored in the workspace dtype.
    dims = tl.arange(0, HALF)
    up_base = k_up_ptr + kv_head.to(tl.int64) * HEAD_DIM * RANK_K
    up_lo_0 = tl.load(up_base + dims[None, :] * RANK_K + rk0[:, None], mask=rk0[:, None] < K0_LIMIT, other=0.0)
    up_hi_0 = tl.load(up_base + (HALF + dims[None, :]) * RANK_K + rk0[:, None], mask=rk0[:, None] < K0_LIMIT,
                      other=0.0)
    up_lo_1 = tl.load(up_base + dims[None, :] * RANK_K + rk1[:, None], mask=rk1[:, None] < RANK_K, other=0.0)
    up_hi_1 = tl.load(up_base + (HALF + dims[None, :]) * RANK_K + rk1[:, None], mask=rk1[:, None] < RANK_K,
                      other=0.0)
    key_lo = _rebuild_half(latent_0, latent_1, up_lo_0.to(OPERAND_DTYPE), up_lo_1.to(OPERAND_DTYPE), SPLIT_K,
                           tl.float32, tl.float32, DOT_PRECISION)
    key_hi = _rebuild_half(latent_0, latent_1, up_hi_0.to(OPERAND_DTYPE), up_hi_1.to(OPERAND_DTYPE), SPLIT_K,
                           tl.float32, tl.float32, DOT_PRECISION)
    if HAS_BIAS:
        key_lo += tl.load(k_bias_ptr + kv_head * HEAD_DIM + dims).to(tl.float32)[None, :]
        key_hi += tl.load(k_bias_ptr + kv_head * HEAD_DIM + HALF + dims).to(tl.float32)[None, :]
    rope = cos_sin_ptr + positions.to(tl.int64)[:, None] * stride_cs + dims[None, :]
    cos = tl.load(rope, mask=in_range[:, None], other=0.0).to(tl.float32)
    sin = tl.load(rope + HALF, mask=in_range[:, None], other=0.0).to(tl.float32)
    key_rows = keys_ptr + rows[:, None] * stride_kr + kv_head * stride_kh + dims[None, :]
    key_dtype = keys_ptr.dtype.element_ty
    tl.store(key_rows, (key_lo * cos - key_hi * sin).to(key_dtype), mask=in_range[:, None])
    tl.store(key_rows + HALF, (key_hi * cos + key_lo * sin).to(key_dtype), mask=in_range[:, None])

    # V latents (transposed tiles [rank chunk, BLOCK_N]), written once per group.
    if kv_head % GROUP_SIZE == 0:
        value_rows = values_ptr + rows[None, :] * stride_vr + group * stride_vg
        value_dtype = values_ptr.dtype.element_ty
        value_0 = v_0.to(tl.float32)
        value_1 = v_1.to(tl.float32)
        if LATENT != 0:  # quantized: code * scale (+ min for int4)
            value_0 = value_0 * v_scale[None, :]
            value_1 = value_1 * v_scale[None, :]
            if LATENT == 2:
                value_0 += v_min[None, :]
                value_1 += v_min[None, :]
        tl.store(value_rows + rv0[:, None], value_0.to(value_dtype),
                 mask=in_range[None, :] & (rv0[:, None] < V0_LIMIT))
        if SPLIT_V:
            tl.store(value_rows + rv1[:, None], value_1.to(value_dtype),
                     mask=in_range[None, :] & (rv1[:, None] < RANK_V))


@triton.jit(do_not_specialize=["first_request", "first_token", "window_start", "window_tokens", "first_window",
                               "last_window"])
def prefill_attention_kernel(
    q_ptr, keys_ptr, values_ptr, seq_lens_ptr, query_start_ptr, out_ptr, state_ptr, scale,
    first_request, first_token, window_start, window_tokens, first_window, last_window,
    stride_qt, stride_qh,
    stride_kr, stride_kh, stride_vr, stride_vg,
    stride_ot, stride_oh,
    HEADS_PER_KV: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, RANK_V: tl.constexpr,
    PAD_V: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, prefill request, KV head) over one workspace window. With several windows
    (``first_window`` / ``last_window`` false), the softmax state of every query row is carried between launches in
    ``state [prefill tokens, heads, PAD_V + 2]`` (unnormalized sums, then m and l): each window's own state is
    merged into it after the window's loop, and the last window writes the normalized output."""
    tile = tl.program_id(0)
    local_request = tl.program_id(1)
    kv_head = tl.program_id(2)
    request = first_request + local_request
    q_start = tl.load(query_start_ptr + request)
    q_len = tl.load(query_start_ptr + request + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + request)

    # Query rows (the M side): BLOCK_Q tokens x HEADS_PER_KV heads of this KV head.
    rows = tl.arange(0, BLOCK_M)
    row_token = tile * BLOCK_Q + rows // HEADS_PER_KV
    row_head = kv_head * HEADS_PER_KV + rows % HEADS_PER_KV
    row_valid = (rows < BLOCK_Q * HEADS_PER_KV) & (row_token < q_len)
    row_pos = seq_len - q_len + row_token
    dims = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + (q_start + row_token).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=row_valid[:, None], other=0.0)

    kv_end = tl.minimum(seq_len, seq_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len))
    window_end = tl.minimum(kv_end, window_start + window_tokens)
    # Tiles wholly below every row's causal limit need no mask; only the last ones do.
    unmasked_end = tl.maximum(window_start, tl.minimum(window_end, seq_len - q_len + tile * BLOCK_Q + 1))
    unmasked_end = window_start + (unmasked_end - window_start) // BLOCK_N * BLOCK_N

    cols = tl.arange(0, BLOCK_N)
    rv = tl.arange(0, PAD_V)
    base = local_request.to(tl.int64) * window_tokens - window_start
    key_cols = keys_ptr + kv_head * stride_kh + dims[:, None]
    value_cols = values_ptr + (kv_head // GROUP_SIZE) * stride_vg + rv[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, PAD_V], tl.float32)
    for start in range(window_start, window_end, BLOCK_N):
        positions = start + cols
        in_range = positions < window_end
        keys_t = tl.load(key_cols + (base + positions)[None, :] * stride_kr, mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, keys_t, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if start >= unmasked_end:
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

    # The windows before this one, folded in after the loop (state kept out of the loop: no registers held across it).
    num_heads = HEADS_PER_KV * tl.num_programs(2)
    state_rows = state_ptr + ((q_start + row_token - first_token).to(tl.int64) * num_heads + row_head) * (PAD_V + 2)
    out_mask = row_valid[:, None] & (rv[None, :] < RANK_V)
    if not first_window:
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
    if last_window:
        inverse = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        out_rows = out_ptr + (q_start + row_token).to(tl.int64)[:, None] * stride_ot + row_head[:, None] * stride_oh
        tl.store(out_rows + rv[None, :], (acc * inverse[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(state_rows[:, None] + rv[None, :], acc, mask=out_mask)
        tl.store(state_rows + PAD_V, m_i, mask=row_valid)
        tl.store(state_rows + PAD_V + 1, l_i, mask=row_valid)
