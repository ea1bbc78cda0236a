"""Triton kernels of the PALU backend's decode path and cache writes (launchers, shapes and grids:
:mod:`vllm_palu.attention.ops`; fp32 oracle: :mod:`vllm_palu.attention.reference`; the prefill path:
:mod:`vllm_palu.attention.prefill_kernels`).

``decode_attention_kernel`` handles one (request, KV heads of a latent group, KV split) of a decode batch: it walks
the request's block table, loads latent tiles (dequantizing fp8 / int4 pages in registers), rebuilds each of its
KV heads' keys on tensor cores (``latent @ k_up``), rotates them with the model's cos/sin table at each key's
position, scores the query heads of each KV head, and accumulates ``P @ v_latent`` with an online softmax; with
KV splits, the last split of a request's heads to finish combines them (``_combine_splits``). Keys are rebuilt by
one dot and split into their rotary halves (``lo``, ``hi``, NeoX order) in registers, so rotation needs no shuffles;
GPT-J-style rotary is handled by the plan permuting k_up rows and query columns the same way. Keys are rotated by
their offset in the tile and the query back by the tile's start (``ROPE_SHIFT``), so the rotary table is read one
row per tile instead of one row per key.
``write_latents_kernel`` scatters new tokens' 16-bit latents into their slots; ``write_quantized_latents_kernel``
quantizes them to fp8 / int4 on the way (the contract of :mod:`vllm_palu.attention.latent_quant`, bit for bit). In
the shared latent layout a row holds one latent that is both the K and the V latent: the writes store it once, and
the attention kernels take its V tiles from the K tiles they loaded (``V_OFFSET`` / ``V_SCALE`` 0, constexprs of the
plan). Every step-dependent size (batch, context, split count) is a run-time value, so one compiled kernel per layer
shape serves every batch (and vLLM's warm-up compiles it). Variants tried and their measurements:
docs/KERNEL_NOTES.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_SPLITS: tl.constexpr = tl.constexpr(64)  # KV splits of a decode launch at most (the combine's statistics tile)
COMBINE_SPLITS: tl.constexpr = tl.constexpr(4)  # splits whose partial sums the combine loads together


@triton.jit
def write_latents_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kg, stride_vt, stride_vg,
    stride_cb, stride_cg, stride_cn,
    BLOCK_SIZE: tl.constexpr, RANK_K: tl.constexpr, RANK_V: tl.constexpr,
    PAD_K: tl.constexpr, PAD_V: tl.constexpr, SHARED: tl.constexpr,
):
    """One token's latents of one group into its slot: K then V, or (``SHARED``) the one latent, K's."""
    token = tl.program_id(0)
    group = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    base = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + group * stride_cg + (slot % BLOCK_SIZE) * stride_cn
    rk = tl.arange(0, PAD_K)
    k = tl.load(k_ptr + token * stride_kt + group * stride_kg + rk, mask=rk < RANK_K)
    tl.store(base + rk, k.to(cache_ptr.dtype.element_ty), mask=rk < RANK_K)
    if not SHARED:
        rv = tl.arange(0, PAD_V)
        v = tl.load(v_ptr + token * stride_vt + group * stride_vg + rv, mask=rv < RANK_V)
        tl.store(base + RANK_K + rv, v.to(cache_ptr.dtype.element_ty), mask=rv < RANK_V)


@triton.jit
def _round_half_even(y):
    """Round fp32 values of magnitude < 2^22 to the nearest integer, ties to even: adding and removing 1.5 * 2^23
    leaves no fraction bits, and fp32 addition rounds to nearest even (exact on GPUs and in the interpreter)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(x):
    """fp32 values within [-448, 448] rounded to the e4m3 grid (3 mantissa bits, subnormal below 2^-6), ties to
    even, sign kept (-0 for negatives that round to zero, as PyTorch's conversion), in fp32; the conversion to
    float8 that follows is then exact (the interpreter's own rounding can carry into the exponent wrongly)."""
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inverse_step = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): products stay exact
    rounded = _round_half_even(x * inverse_step) * step
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # x's sign bit (Triton's -y is 0 - y: +0 for y = 0)
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_latent(x_ptr, payload_row, scale_row, RANK: tl.constexpr, PAD: tl.constexpr, INT4: tl.constexpr,
                     STEP: tl.constexpr):
    """Quantize one token's K or V latent (``vllm_palu.attention.latent_quant``'s contract, bit for bit: IEEE
    divisions, scales rounded to fp16 before use, round-half-even codes) and store its payload bytes ``STEP`` apart
    (1: a row; the page's block size: a key-major V payload) and fp16 scale (and minimum) at the given pointers."""
    if INT4:  # byte j holds codes j (low nibble) and j + RANK/2 (high nibble)
        half = tl.arange(0, PAD // 2)
        in_half = half < RANK // 2
        low_x = tl.load(x_ptr + half, mask=in_half, other=0.0).to(tl.float32)
        high_x = tl.load(x_ptr + RANK // 2 + half, mask=in_half, other=0.0).to(tl.float32)
        top = tl.maximum(tl.max(tl.where(in_half, low_x, float("-inf"))),
                         tl.max(tl.where(in_half, high_x, float("-inf"))))
        bottom = tl.minimum(tl.min(tl.where(in_half, low_x, float("inf"))),
                            tl.min(tl.where(in_half, high_x, float("inf"))))
        scale = tl.minimum(tl.maximum(tl.math.div_rn(top - bottom, 15.0), 2.0 ** -24), 65504.0).to(tl.float16)
        minimum = tl.minimum(tl.maximum(bottom, -65504.0), 65504.0).to(tl.float16)
        scale32 = scale.to(tl.float32)
        minimum32 = minimum.to(tl.float32)
        low_code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(low_x - minimum32, scale32)), 0.0), 15.0)
        high_code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(high_x - minimum32, scale32)), 0.0),
                               15.0)
        packed = low_code.to(tl.uint8) | (high_code.to(tl.uint8) << 4)
        tl.store(payload_row + half * STEP, packed, mask=in_half)
        tl.store(scale_row, scale)
        tl.store(scale_row + 1, minimum)
    else:  # fp8 e4m3, symmetric
        index = tl.arange(0, PAD)
        inside = index < RANK
        x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32)
        scale = tl.minimum(tl.maximum(tl.math.div_rn(tl.max(tl.abs(x)), 448.0), 2.0 ** -24), 65504.0)
        scale = scale.to(tl.float16)
        scaled = tl.minimum(tl.maximum(tl.math.div_rn(x, scale.to(tl.float32)), -448.0), 448.0)
        codes = _round_to_e4m3(scaled).to(tl.float8e4nv)
        tl.store(payload_row + index * STEP, codes.to(tl.uint8, bitcast=True), mask=inside)
        tl.store(scale_row, scale)


@triton.jit
def write_quantized_latents_kernel(
    k_ptr, v_ptr, payload_ptr, v_payload_ptr, scale_ptr, slot_ptr,
    stride_kt, stride_kg, stride_vt, stride_vg,
    stride_pb, stride_pg, stride_pn, stride_vpb, stride_vpg, stride_sb, stride_sg, stride_sn,
    BLOCK_SIZE: tl.constexpr, RANK_K: tl.constexpr, RANK_V: tl.constexpr,
    PAD_K: tl.constexpr, PAD_V: tl.constexpr, INT4: tl.constexpr, SHARED: tl.constexpr,
):
    """Quantize a token's K and V latents of one group into its cache slot: K payload bytes in the page's K
    payload rows, V payload bytes in its key-major V payloads (byte j at ``j * BLOCK_SIZE`` past the slot), fp16
    scales (and minima for int4: K scale, K min, V scale, V min) in its scale rows. ``SHARED``: the one latent
    (K's) and its one scale set only. One launch instead of the PyTorch quantization plus two scatters."""
    token = tl.program_id(0)
    group = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    page = slot // BLOCK_SIZE
    position = slot % BLOCK_SIZE
    payload_row = payload_ptr + page * stride_pb + group * stride_pg + position * stride_pn
    scale_row = scale_ptr + page * stride_sb + group * stride_sg + position * stride_sn
    scales_per_latent: tl.constexpr = 2 if INT4 else 1
    _quantize_latent(k_ptr + token * stride_kt + group * stride_kg, payload_row, scale_row, RANK_K, PAD_K, INT4, 1)
    if not SHARED:
        _quantize_latent(v_ptr + token * stride_vt + group * stride_vg,
                         v_payload_ptr + page * stride_vpb + group * stride_vpg + position,
                         scale_row + scales_per_latent, RANK_V, PAD_V, INT4, BLOCK_SIZE)


@triton.jit
def _convert(x, DTYPE: tl.constexpr, PAIRED_CVT: tl.constexpr):
    """``x.to(DTYPE)``. ``PAIRED_CVT`` (CUDA only: inline PTX): fp32 to fp16 two elements an instruction
    (``cvt.rn.f16x2.f32``, round to nearest even like ``.to``, the first element in the low half). triton 3.8
    converts one element an instruction and pairs them with a ``PRMT`` each: 2 instructions more per pair, on the
    fp32 sums of every wgmma key rebuild (groups of 2, a 64-key tile: 958 -> 762 instructions)."""
    if PAIRED_CVT and x.dtype == tl.float32 and DTYPE == tl.float16:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [x], dtype=tl.float16,
                                         is_pure=True, pack=2)
    return x.to(DTYPE)


@triton.jit
def _rebuild(latent_0, latent_1, up_0, up_1, SPLIT_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
             KEY_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PAIRED_CVT: tl.constexpr = False):
    """Keys (or one rotary half of them) of a tile: ``latent @ up`` over the rank chunks (the second chunk may be
    absent). ``DOT_PRECISION``: "ieee" for fp32 operands (fp32 models; Triton's default would be tf32)."""
    key = tl.dot(latent_0, up_0, out_dtype=ACC_DTYPE, input_precision=DOT_PRECISION)
    if SPLIT_K:
        key = tl.dot(latent_1, up_1, key, out_dtype=ACC_DTYPE, input_precision=DOT_PRECISION)
    return _convert(key, KEY_DTYPE, PAIRED_CVT)


@triton.jit
def _load_tile(token_ptrs, scale_rows, in_range, rk0, rk1, rv0, rv1, RANK_K: tl.constexpr, RANK_V: tl.constexpr,
               K0_LIMIT: tl.constexpr, V0_LIMIT: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr,
               LATENT: tl.constexpr, V_OFFSET: tl.constexpr, V_SCALE: tl.constexpr, KEY_DTYPE: tl.constexpr,
               K_CODES: tl.constexpr, v_codes_0, v_codes_1):
    """A KV tile's latents, K as [BLOCK_N, rank chunk] (dequantized, key dtype) and V transposed as
    [rank chunk, BLOCK_N], plus V's per-token scale and minimum (quantized V is dequantized inside P.V) and K's
    per-token scale. ``K_CODES`` (fp8): K stays e4m3 codes, for fp8 tensor-core products scaled afterwards.
    ``v_codes_0`` / ``v_codes_1``: a quantized split layout's V payload bytes [rank chunk, BLOCK_N], which the
    caller loads from the key-major V payloads (``_load_v_pages``, or gathered); unused otherwise.

    LATENT 0: rows of 16-bit values. 1 (fp8): e4m3 bytes; scale rows hold fp16 scales. 2 (int4): rank/2 bytes per
    latent, byte j holding codes j (low nibble) and j + rank/2 (high); scale rows hold fp16 scale, min pairs
    (vllm_palu.attention.latent_quant). K sits at the start of a row and of its scale row; V at ``V_OFFSET`` of a
    16-bit row (quantized V payloads are key-major: ``v_codes_*``) and scale slot ``V_SCALE``. ``V_OFFSET`` 0 means
    the shared layout: V is the K latent, and its tiles are the K tiles already loaded, transposed in registers
    (equal ranks give equal tile shapes), its scales K's: the latent is read from memory once."""
    rows_k = token_ptrs[:, None]
    rows_v = token_ptrs[None, :]
    k_mask_0 = in_range[:, None] & (rk0[None, :] < K0_LIMIT)
    v_mask_0 = in_range[None, :] & (rv0[:, None] < V0_LIMIT)
    v_scale = in_range.to(tl.float32)  # unused unless quantized
    v_min = v_scale
    k_scale = v_scale
    if LATENT == 2:
        k_scale = tl.load(scale_rows, mask=in_range, other=0.0).to(tl.float32)
        k_min = tl.load(scale_rows + 1, mask=in_range, other=0.0).to(tl.float32)
        k_codes = tl.load(rows_k + rk0[None, :], mask=k_mask_0, other=0)  # elements j and j + rank_k / 2
        latent_0 = ((k_codes & 15).to(tl.float32) * k_scale[:, None] + k_min[:, None]).to(KEY_DTYPE)
        latent_1 = ((k_codes >> 4).to(tl.float32) * k_scale[:, None] + k_min[:, None]).to(KEY_DTYPE)
        if V_OFFSET == 0:  # shared: the K codes
            v_codes = tl.trans(k_codes)
        else:
            v_codes = v_codes_0
        if V_SCALE == 0:
            v_scale = k_scale
            v_min = k_min
        else:
            v_scale = tl.load(scale_rows + V_SCALE, mask=in_range, other=0.0).to(tl.float32)
            v_min = tl.load(scale_rows + V_SCALE + 1, mask=in_range, other=0.0).to(tl.float32)
        v_0 = (v_codes & 15).to(KEY_DTYPE)  # codes are exact in fp16; scale and min enter in P.V
        v_1 = (v_codes >> 4).to(KEY_DTYPE)
    else:
        latent_0 = tl.load(rows_k + rk0[None, :], mask=k_mask_0, other=0)
        latent_1 = latent_0
        if SPLIT_K:
            latent_1 = tl.load(rows_k + rk1[None, :], mask=in_range[:, None] & (rk1[None, :] < RANK_K), other=0)
        if V_OFFSET == 0:  # shared: the K chunks (the same masks: RANK_V == RANK_K)
            v_0 = tl.trans(latent_0)
            v_1 = v_0
            if SPLIT_V:
                v_1 = tl.trans(latent_1)
        elif LATENT == 0:
            v_0 = tl.load(rows_v + V_OFFSET + rv0[:, None], mask=v_mask_0, other=0)
            v_1 = v_0
            if SPLIT_V:
                v_1 = tl.load(rows_v + V_OFFSET + rv1[:, None], mask=in_range[None, :] & (rv1[:, None] < RANK_V),
                              other=0)
        else:
            v_0 = v_codes_0
            v_1 = v_codes_1
        if LATENT == 1:
            k_scale = tl.load(scale_rows, mask=in_range, other=0.0).to(tl.float32)
            if V_SCALE == 0:
                v_scale = k_scale
            else:
                v_scale = tl.load(scale_rows + V_SCALE, mask=in_range, other=0.0).to(tl.float32)
            if K_CODES:
                latent_0 = latent_0.to(tl.float8e4nv, bitcast=True)
                latent_1 = latent_1.to(tl.float8e4nv, bitcast=True)
            else:
                latent_0 = (latent_0.to(tl.float8e4nv, bitcast=True).to(tl.float32) * k_scale[:, None]
                            ).to(KEY_DTYPE)
                latent_1 = (latent_1.to(tl.float8e4nv, bitcast=True).to(tl.float32) * k_scale[:, None]
                            ).to(KEY_DTYPE)
            v_0 = v_0.to(tl.float8e4nv, bitcast=True).to(KEY_DTYPE)  # exact in fp16; the scale enters in P.V
            v_1 = v_1.to(tl.float8e4nv, bitcast=True).to(KEY_DTYPE)
        else:
            latent_0 = latent_0.to(KEY_DTYPE)
            latent_1 = latent_1.to(KEY_DTYPE)
    return latent_0, latent_1, v_0, v_1, v_scale, v_min, k_scale


@triton.jit
def _tile_pages(kv_tile, valid, table_row, col_page, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Block-table entry of each position of a KV tile (0 where ``valid`` is false)."""
    if BLOCK_N >= BLOCK_SIZE:
        page_index = kv_tile * (BLOCK_N // BLOCK_SIZE) + col_page
    else:  # several tiles per page
        page_index = col_page + kv_tile * BLOCK_N // BLOCK_SIZE
    return tl.load(table_row + page_index, mask=valid, other=0)


@triton.jit
def _load_v_pages(v_group, pages, in_range, rv0, rv1, stride_vb, slot_base, RANK_V: tl.constexpr,
                  V0_LIMIT: tl.constexpr, SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """A KV tile's quantized V payload bytes as [rank chunk, BLOCK_N], from the key-major V payloads (byte j of a
    page's tokens side by side) page by page: ``[rank, pages, slots]`` tiles, whose slots are consecutive bytes, so
    the loads are wide. (A tile of per-key addresses loads byte by byte: Triton cannot tell that 16 keys share a
    page.) ``pages``: the tile's block-table entry of each key, 0 past the context."""
    SLOTS: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK_SIZE else BLOCK_SIZE
    PAGES: tl.constexpr = BLOCK_N // SLOTS
    page_ids = tl.max(tl.reshape(pages, [PAGES, SLOTS]), axis=1)  # the page of each run of SLOTS keys
    bases = v_group + page_ids.to(tl.int64) * stride_vb + slot_base
    slot_bytes = bases[None, :, None] + tl.arange(0, SLOTS)[None, None, :]
    valid = tl.reshape(in_range, [PAGES, SLOTS])[None, :, :]
    codes_0 = tl.load(slot_bytes + rv0[:, None, None] * BLOCK_SIZE, mask=valid & (rv0[:, None, None] < V0_LIMIT),
                      other=0)
    codes_0 = tl.reshape(codes_0, [rv0.shape[0], BLOCK_N])
    codes_1 = codes_0
    if SPLIT_V:
        codes_1 = tl.load(slot_bytes + rv1[:, None, None] * BLOCK_SIZE, mask=valid & (rv1[:, None, None] < RANK_V),
                          other=0)
        codes_1 = tl.reshape(codes_1, [rv1.shape[0], BLOCK_N])
    return codes_0, codes_1


@triton.jit
def _load_up(k_up_ptr, k_up_scale_ptr, kv_head, rk0, rk1, HEAD_DIM: tl.constexpr, RANK_K: tl.constexpr,
             K0_LIMIT: tl.constexpr, KEY_DTYPE: tl.constexpr, FP8_MMA: tl.constexpr):
    """One KV head's rows of the key up-projection as [rank chunk, HEAD_DIM] operands (both rotary halves), and
    (``FP8_MMA``: the plan's e4m3 copy) its per-channel scales [HEAD_DIM]."""
    up_base = k_up_ptr + kv_head.to(tl.int64) * HEAD_DIM * RANK_K
    dims = tl.arange(0, HEAD_DIM)
    up_0 = tl.load(up_base + dims[None, :] * RANK_K + rk0[:, None], mask=rk0[:, None] < K0_LIMIT, other=0.0)
    up_1 = tl.load(up_base + dims[None, :] * RANK_K + rk1[:, None], mask=rk1[:, None] < RANK_K, other=0.0)
    up_scale = dims.to(tl.float32)  # unused unless FP8_MMA
    if FP8_MMA:
        up_scale = tl.load(k_up_scale_ptr + kv_head.to(tl.int64) * HEAD_DIM + dims)
    else:
        up_0 = up_0.to(KEY_DTYPE)
        up_1 = up_1.to(KEY_DTYPE)
    return up_0, up_1, up_scale


@triton.jit
def _score_head(latent_0, latent_1, up_0, up_1, k_scale, up_scale, bias_lo, bias_hi, cos, sin, q_lo, q_hi, scores,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr, KEY_DTYPE: tl.constexpr,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_MMA: tl.constexpr,
                JOIN_HALVES: tl.constexpr, PAIRED_CVT: tl.constexpr):
    """One KV head's keys of a tile, rebuilt from the latents, rotated and scored against ``q_lo``/``q_hi``
    [HALF, rows] (zero outside the head's rows), added to ``scores`` [BLOCK_N, rows]. Both rotary halves come
    from one dot and are split in registers: under triton 3.8 two dots (one per half) converted the latent tile
    twice and staged one copy through shared memory (488 against 430 SASS instructions per 16-key tile; 3.6 gave
    422 for two dots but shuffles the split, 689). ``JOIN_HALVES``: the rotated halves are joined back for one
    score dot (on wgmma tiles one chain of k-steps, one wait: groups of 2 10 -> 8 waits per tile); otherwise one
    dot per half, which spills less where a program has one query row (Llama-2-7B groups of 4: 312 -> 128 B)."""
    if FP8_MMA:  # e4m3 codes x e4m3 up-projection, fp32 sums, then the token's and the channel's scales
        key = _rebuild(latent_0, latent_1, up_0, up_1, SPLIT_K, tl.float32, tl.float32, DOT_PRECISION)
        key = (key * k_scale[:, None] * up_scale[None, :]).to(KEY_DTYPE)
    else:
        key = _rebuild(latent_0, latent_1, up_0, up_1, SPLIT_K, ACC_DTYPE, KEY_DTYPE, DOT_PRECISION, PAIRED_CVT)
    key_lo, key_hi = tl.split(tl.permute(tl.reshape(key, [key.shape[0], 2, HALF]), (0, 2, 1)))
    if HAS_BIAS:
        key_lo += bias_lo[None, :]
        key_hi += bias_hi[None, :]
    rot_lo = key_lo * cos - key_hi * sin
    rot_hi = key_hi * cos + key_lo * sin
    if JOIN_HALVES:
        rotated = tl.reshape(tl.permute(tl.join(rot_lo, rot_hi), (0, 2, 1)), [rot_lo.shape[0], 2 * HALF])
        q = tl.reshape(tl.permute(tl.join(q_lo, q_hi), (2, 0, 1)), [2 * HALF, q_lo.shape[1]])
        return tl.dot(rotated, q, scores, input_precision=DOT_PRECISION)
    scores = tl.dot(rot_lo, q_lo, scores, input_precision=DOT_PRECISION)
    return tl.dot(rot_hi, q_hi, scores, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(kv_tile, pages, kv_end, m_i, l_i, acc_0, acc_1, q_lo, q_hi, k_up_ptr, k_up_scale_ptr, k_bias_ptr,
                 first_kv_head, row_kv, cols, dims, rk0, rk1, rv0, rv1,
                 row_valid, slot_offset, scale_slot_offset, rope_offset, cos_offsets, sin_offsets, cache_group,
                 v_group, scale_group, cos_sin_ptr, stride_cb, stride_vb, stride_sb, scale,
                 STRIDE_CN: tl.constexpr, STRIDE_SN: tl.constexpr, STRIDE_CS: tl.constexpr,
                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HALF: tl.constexpr, RANK_K: tl.constexpr, RANK_V: tl.constexpr, K0_LIMIT: tl.constexpr,
                 V0_LIMIT: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr, LATENT: tl.constexpr,
                 V_OFFSET: tl.constexpr, V_SCALE: tl.constexpr,
                 KEY_DTYPE: tl.constexpr, REBUILD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, ROPE_SHIFT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8_MMA: tl.constexpr, JOIN_HALVES: tl.constexpr,
                 PAIRED_CVT: tl.constexpr):
    """One KV tile of the decode loop (``pages``: its block-table entries, one per position): load its latents,
    rebuild and rotate the keys of the program's ``HEADS`` KV heads, score each against its own query rows, and
    fold the tile into the online softmax (m_i, l_i) and the V-latent accumulators, shared by all the rows.
    ``MASKED`` false: every position of the tile exists (no bounds masks; the compiler drops the predicates).
    ``ROPE_SHIFT``: keys are rotated by their offset in the tile (``cos_offsets``, ``sin_offsets``:
    loop-invariant) and the query back by the tile's start, since R(start + j) = R(start) R(j) (the plan checks
    that the model's table obeys this); no cos/sin tile is loaded."""
    tile_start = kv_tile * BLOCK_N
    if MASKED:
        in_range = cols < kv_end - tile_start
    else:
        in_range = tl.full([BLOCK_N], 1, tl.int1)
    slot_base = 0 if BLOCK_N >= BLOCK_SIZE else tile_start % BLOCK_SIZE  # several tiles per page
    pages = pages.to(tl.int64)
    token_ptrs = cache_group + pages * stride_cb + (slot_offset + slot_base * STRIDE_CN)
    scale_rows = scale_group + pages * stride_sb + (scale_slot_offset + slot_base * STRIDE_SN)
    v_codes_0 = in_range  # a 16-bit or shared layout's V comes with the rows (_load_tile)
    v_codes_1 = in_range
    if LATENT != 0 and V_OFFSET != 0:
        v_codes_0, v_codes_1 = _load_v_pages(v_group, pages, in_range, rv0, rv1, stride_vb, slot_base, RANK_V,
                                             V0_LIMIT, SPLIT_V, BLOCK_N, BLOCK_SIZE)
    latent_0, latent_1, v_0, v_1, v_scale, v_min, k_scale = _load_tile(
        token_ptrs, scale_rows, in_range, rk0, rk1, rv0, rv1, RANK_K, RANK_V, K0_LIMIT, V0_LIMIT, SPLIT_K, SPLIT_V,
        LATENT, V_OFFSET, V_SCALE, REBUILD_DTYPE, FP8_MMA, v_codes_0, v_codes_1)
    if ROPE_SHIFT:
        start_row = cos_sin_ptr + tile_start.to(tl.int64) * STRIDE_CS + dims[:, None]
        start_cos = tl.load(start_row).to(KEY_DTYPE)
        start_sin = tl.load(start_row + HALF).to(KEY_DTYPE)
        q_tile_lo = q_lo * start_cos + q_hi * start_sin  # R(-start) q, in the key dtype like the keys' rotation
        q_tile_hi = q_hi * start_cos - q_lo * start_sin
        cos = cos_offsets
        sin = sin_offsets
    else:
        rope = cos_sin_ptr + tile_start.to(tl.int64) * STRIDE_CS + rope_offset
        cos = tl.load(rope, mask=in_range[:, None], other=0.0).to(KEY_DTYPE)
        sin = tl.load(rope + HALF, mask=in_range[:, None], other=0.0).to(KEY_DTYPE)
        q_tile_lo = q_lo
        q_tile_hi = q_hi

    scores = tl.zeros([BLOCK_N, q_lo.shape[1]], tl.float32)
    for head in tl.static_range(HEADS):  # each head's keys score its own rows (the other rows' q are 0)
        kv_head = first_kv_head + head
        # Loop-invariant: the compiler loads each head's up-projection (and bias) once, before the KV loop.
        up_0, up_1, up_scale = _load_up(k_up_ptr, k_up_scale_ptr, kv_head, rk0, rk1, HEAD_DIM, RANK_K, K0_LIMIT,
                                        REBUILD_DTYPE, FP8_MMA)
        bias_lo = dims  # unused without a bias
        bias_hi = dims
        if HAS_BIAS:
            bias_lo = tl.load(k_bias_ptr + kv_head * HEAD_DIM + dims).to(KEY_DTYPE)
            bias_hi = tl.load(k_bias_ptr + kv_head * HEAD_DIM + HALF + dims).to(KEY_DTYPE)
        head_q_lo = q_tile_lo
        head_q_hi = q_tile_hi
        if HEADS > 1:
            in_head = (row_kv == head)[None, :]
            head_q_lo = tl.where(in_head, q_tile_lo, tl.zeros_like(q_tile_lo))
            head_q_hi = tl.where(in_head, q_tile_hi, tl.zeros_like(q_tile_hi))
        scores = _score_head(latent_0, latent_1, up_0, up_1, k_scale, up_scale, bias_lo, bias_hi, cos, sin,
                             head_q_lo, head_q_hi, scores, SPLIT_K, HAS_BIAS, HALF, KEY_DTYPE, ACC_DTYPE,
                             DOT_PRECISION, FP8_MMA, JOIN_HALVES, PAIRED_CVT)
    scores = scores * scale  # [BLOCK_N, BLOCK_M]
    if MASKED:
        scores = tl.where(in_range[:, None] & row_valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[None, :])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    if LATENT == 0:
        acc_0 = acc_0 * alpha[None, :] + tl.dot(v_0, p.to(v_0.dtype), input_precision=DOT_PRECISION)
        if SPLIT_V:
            acc_1 = acc_1 * alpha[None, :] + tl.dot(v_1, p.to(v_1.dtype), input_precision=DOT_PRECISION)
    else:  # sum_n p (code scale + min) = codes @ (p scale) + sum_n p min
        p_scaled = (p * v_scale[:, None]).to(v_0.dtype)
        offset = 0.0
        if LATENT == 2:
            offset = tl.sum(p * v_min[:, None], axis=0)[None, :]
        acc_0 = acc_0 * alpha[None, :] + tl.dot(v_0, p_scaled) + offset
        if SPLIT_V:
            acc_1 = acc_1 * alpha[None, :] + tl.dot(v_1, p_scaled) + offset
    return m_new, l_i, acc_0, acc_1


@triton.jit
def _split_range(seq_len, split, num_splits, BLOCK_N: tl.constexpr):
    """KV tiles [first, last) of one split: the context's BLOCK_N tiles cut into num_splits contiguous chunks, and
    how many of the splits hold a tile (the rest, past a short context, hold none). Derived from seq_len on the
    device, so a grid fixed per batch size (CUDA graphs) is right for any context."""
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    first = split * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, num_tiles), tl.cdiv(num_tiles, tiles_per_split)


@triton.jit
def decode_attention_kernel(
    q_ptr, cache_ptr, v_cache_ptr, scale_ptr, k_up_ptr, k_up_scale_ptr, k_bias_ptr, cos_sin_ptr, block_table_ptr,
    seq_lens_ptr, query_start_ptr,
    out_ptr, partial_ptr, stats_ptr, arrivals_ptr, scale,
    stride_qt, stride_qh,
    stride_cb, stride_cg, STRIDE_CN: tl.constexpr, stride_vb, stride_vg,
    stride_sb, stride_sg, STRIDE_SN: tl.constexpr,
    stride_bt, STRIDE_CS: tl.constexpr,
    stride_ot, stride_oh,
    HEADS_PER_KV: tl.constexpr, GROUP_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    RANK_K: tl.constexpr, RANK_V: tl.constexpr, PAD_V: tl.constexpr, RK0: tl.constexpr, RK1: tl.constexpr,
    RV0: tl.constexpr, RV1: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_V: tl.constexpr, KEY_DTYPE: tl.constexpr,
    REBUILD_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, LATENT: tl.constexpr, K0_LIMIT: tl.constexpr, K1_OFFSET: tl.constexpr,
    V0_LIMIT: tl.constexpr, V1_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr, V_SCALE: tl.constexpr,
    ROPE_SHIFT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_MMA: tl.constexpr, TAIL_STAGES: tl.constexpr,
    JOIN_HALVES: tl.constexpr, PAIRED_CVT: tl.constexpr,
):
    """One program per (request, ``HEADS`` KV heads of a latent group, KV split) of a decode batch: each request
    has one new token (already in the cache) and attends over its whole context. A program's query rows are the
    query heads of its KV heads (``HEADS`` x ``HEADS_PER_KV``): it reads their group's latent tiles once and
    accumulates the V latents once for all of them, and holds its heads' key up-projection in shared memory, so
    ``HEADS`` is as many of the group's heads as that fits (the plan's choice). The grid's third dimension is the
    split count; with more than one split, each program writes its unnormalized V-latent sums and softmax
    statistics to the scratch rows of its request (``partial [requests, heads, splits, PAD_V]``, ``stats
    [requests, heads, splits, (m, l)]``) and counts itself in ``arrivals [requests, programs(1)]`` (int32, zero
    between launches); the last of the splits to arrive combines them and resets the count, so a launch (or a
    CUDA-graph replay) needs no reduction kernel after it.

    Keys sit on the M side of every tensor-core op: scores are computed transposed,
    ``[BLOCK_N keys, BLOCK_M rows] = rotated_keys @ q^T``, so the rebuilt key tile feeds the score op from the
    registers it was accumulated in (as FlashAttention feeds P) with no shared-memory round trip for the largest
    tile, and values accumulate as ``acc^T [rank_v, rows] += v^T @ p``. Ranks are covered by one power-of-two
    chunk or, with ``SPLIT_K``/``SPLIT_V``, two (a rank of 48 costs 32 + 16 columns, not 64). Keys are rebuilt,
    rotated and scored in ``KEY_DTYPE`` (fp16 for 16-bit models: packed math, half the registers); scores,
    softmax and the V accumulators are fp32."""
    request = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_start = tl.load(query_start_ptr + request)
    if tl.load(query_start_ptr + request + 1) == q_start:  # a padding request (CUDA-graph batches): no token
        return
    seq_len = tl.load(seq_lens_ptr + request)
    # Splits past a short context run no tile (and store an empty softmax state); returning early here instead
    # costs the KV loop 5 instructions per tile (sm_90 SASS, benchmarks/compile_sm90.py).
    first, last, filled_splits = _split_range(seq_len, split, num_splits, BLOCK_N)
    first_kv_head = head_block * HEADS
    group = first_kv_head // GROUP_SIZE

    # Query rows (the N side): the query heads of the program's KV heads, for the request's one token.
    ROWS: tl.constexpr = HEADS * HEADS_PER_KV
    rows = tl.arange(0, BLOCK_M)
    row_head = head_block * ROWS + rows % ROWS
    row_kv = (rows % ROWS) // HEADS_PER_KV  # the row's KV head among the program's
    row_valid = rows < ROWS
    dims = tl.arange(0, HALF)
    q_cols = q_ptr + q_start.to(tl.int64) * stride_qt + row_head[None, :] * stride_qh
    q_lo = tl.load(q_cols + dims[:, None], mask=row_valid[None, :], other=0.0).to(KEY_DTYPE)  # [HALF, BLOCK_M]
    q_hi = tl.load(q_cols + HALF + dims[:, None], mask=row_valid[None, :], other=0.0).to(KEY_DTYPE)
    cols = tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, RK0)
    rk1 = K1_OFFSET + tl.arange(0, RK1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    rv0 = tl.arange(0, RV0)
    rv1 = V1_OFFSET + tl.arange(0, RV1)
    acc_0 = tl.zeros([RV0, BLOCK_M], tl.float32)
    acc_1 = tl.zeros([RV1, BLOCK_M], tl.float32)
    cache_group = cache_ptr + group.to(tl.int64) * stride_cg
    v_group = v_cache_ptr + group.to(tl.int64) * stride_vg  # quantized split layouts' key-major V payloads
    scale_group = scale_ptr + group.to(tl.int64) * stride_sg
    table_row = block_table_ptr + request.to(tl.int64) * stride_bt
    # Loop-invariant parts of the tile addressing: each column's page within the tile and slot within its page.
    if BLOCK_N >= BLOCK_SIZE:
        col_page = cols // BLOCK_SIZE
        col_slot = cols % BLOCK_SIZE
    else:
        col_page = cols * 0
        col_slot = cols
    slot_offset = col_slot * STRIDE_CN
    scale_slot_offset = col_slot * STRIDE_SN
    rope_offset = cols[:, None] * STRIDE_CS + dims[None, :]
    cos_offsets = rope_offset  # unused without ROPE_SHIFT
    sin_offsets = rope_offset
    if ROPE_SHIFT:
        # Rows 0 .. BLOCK_N - 1 of the table: the rotation of each key by its offset in the tile.
        cos_offsets = tl.load(cos_sin_ptr + rope_offset).to(KEY_DTYPE)
        sin_offsets = tl.load(cos_sin_ptr + rope_offset + HALF).to(KEY_DTYPE)
    # Tiles wholly inside the context run without bounds masks; the last, partial tile of the context runs
    # masked. The full tiles' block-table entries are loaded one tile ahead, so the software pipeliner sees the
    # latent loads as direct loads and double-buffers them.
    full_last = tl.maximum(first, tl.minimum(last, seq_len // BLOCK_N))
    pages = _tile_pages(first, cols < tl.where(first < full_last, BLOCK_N, 0), table_row, col_page, BLOCK_N,
                        BLOCK_SIZE)
    for kv_tile in range(first, full_last):
        next_pages = _tile_pages(kv_tile + 1, cols < tl.where(kv_tile + 1 < full_last, BLOCK_N, 0), table_row,
                                 col_page, BLOCK_N, BLOCK_SIZE)
        m_i, l_i, acc_0, acc_1 = _attend_tile(
            kv_tile, pages, seq_len, m_i, l_i, acc_0, acc_1, q_lo, q_hi, k_up_ptr, k_up_scale_ptr, k_bias_ptr,
            first_kv_head,
            row_kv, cols, dims, rk0, rk1, rv0, rv1, row_valid, slot_offset, scale_slot_offset, rope_offset,
            cos_offsets, sin_offsets, cache_group, v_group, scale_group, cos_sin_ptr, stride_cb, stride_vb,
            stride_sb, scale,
            STRIDE_CN, STRIDE_SN, STRIDE_CS, HEADS, HEAD_DIM, HALF, RANK_K, RANK_V, K0_LIMIT, V0_LIMIT, SPLIT_K,
            SPLIT_V, LATENT, V_OFFSET, V_SCALE, KEY_DTYPE, REBUILD_DTYPE, ACC_DTYPE, BLOCK_N, BLOCK_SIZE, HAS_BIAS,
            False, ROPE_SHIFT, DOT_PRECISION, FP8_MMA, JOIN_HALVES, PAIRED_CVT)
        pages = next_pages
    # ``TAIL_STAGES`` 1 (wgmma tiles): the one masked tile gets no pipeline buffers of its own, which under triton
    # 3.8 set the program's shared memory (groups of 2: 131 -> 110 KB, two programs per multiprocessor).
    for kv_tile in tl.range(full_last, last, num_stages=TAIL_STAGES):
        pages = _tile_pages(kv_tile, cols < seq_len - kv_tile * BLOCK_N, table_row, col_page, BLOCK_N, BLOCK_SIZE)
        m_i, l_i, acc_0, acc_1 = _attend_tile(
            kv_tile, pages, seq_len, m_i, l_i, acc_0, acc_1, q_lo, q_hi, k_up_ptr, k_up_scale_ptr, k_bias_ptr,
            first_kv_head,
            row_kv, cols, dims, rk0, rk1, rv0, rv1, row_valid, slot_offset, scale_slot_offset, rope_offset,
            cos_offsets, sin_offsets, cache_group, v_group, scale_group, cos_sin_ptr, stride_cb, stride_vb,
            stride_sb, scale,
            STRIDE_CN, STRIDE_SN, STRIDE_CS, HEADS, HEAD_DIM, HALF, RANK_K, RANK_V, K0_LIMIT, V0_LIMIT, SPLIT_K,
            SPLIT_V, LATENT, V_OFFSET, V_SCALE, KEY_DTYPE, REBUILD_DTYPE, ACC_DTYPE, BLOCK_N, BLOCK_SIZE, HAS_BIAS,
            True, False, DOT_PRECISION, FP8_MMA, JOIN_HALVES, PAIRED_CVT)

    if num_splits > 1:
        num_heads = ROWS * tl.num_programs(1)
        slots = (request.to(tl.int64) * num_heads + row_head) * num_splits  # [requests, heads, splits]
        slot = slots + split  # this split's
        partial = partial_ptr + slot[None, :] * PAD_V
        tl.store(partial + rv0[:, None], acc_0, mask=row_valid[None, :] & (rv0[:, None] < V0_LIMIT))
        if SPLIT_V:
            tl.store(partial + rv1[:, None], acc_1, mask=row_valid[None, :] & (rv1[:, None] < RANK_V))
        tl.store(stats_ptr + slot * 2, m_i, mask=row_valid)
        tl.store(stats_ptr + slot * 2 + 1, l_i, mask=row_valid)
        # Every thread's stores before the arrival, which releases them at GPU scope (and acquires the other
        # splits'); a scalar atomic is one thread's, its result broadcast to the program.
        tl.debug_barrier()
        arrival = arrivals_ptr + request * tl.num_programs(1) + head_block
        if tl.atomic_add(arrival, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            tl.store(arrival, 0)  # the next launch, or graph replay, counts from zero
            # Only the splits holding tiles: a batch's split count is set for its size, and a short context
            # leaves most of them empty (batch 1 takes ~60), whose serial combine would be the launch's tail.
            m_i, l_i, acc_0, acc_1 = _combine_splits(partial_ptr, stats_ptr, slots, filled_splits, row_valid,
                                                     rv0, rv1, BLOCK_M, RV0, RV1, PAD_V, RANK_V, V0_LIMIT, SPLIT_V)
            _store_out(out_ptr, q_start, stride_ot, stride_oh, row_head, row_valid, l_i, acc_0, acc_1, rv0, rv1,
                       RANK_V, V0_LIMIT, SPLIT_V)
    else:
        _store_out(out_ptr, q_start, stride_ot, stride_oh, row_head, row_valid, l_i, acc_0, acc_1, rv0, rv1, RANK_V,
                   V0_LIMIT, SPLIT_V)


@triton.jit
def _combine_splits(partial_ptr, stats_ptr, slots, num_splits, row_valid, rv0, rv1, BLOCK_M: tl.constexpr,
                    RV0: tl.constexpr, RV1: tl.constexpr, PAD_V: tl.constexpr, RANK_V: tl.constexpr,
                    V0_LIMIT: tl.constexpr, SPLIT_V: tl.constexpr):
    """The softmax state of a program's rows over its first ``num_splits`` splits (at most MAX_SPLITS): m the
    largest m_s, l = sum_s exp(m_s - m) l_s and acc = sum_s exp(m_s - m) acc_s (log2 units; a split past the
    context stored m = -inf, l = 0, acc = 0 and would add nothing). The statistics load as one [MAX_SPLITS, rows]
    tile, so m is known before any partial sum is read, and the partial sums load COMBINE_SPLITS splits at a time
    with no load waiting on another (a loop carrying a running max made one L2 round trip per split, the launch's
    tail at tens of splits). Loads bypass L1 (``.cg``): the other splits wrote these rows from other
    multiprocessors."""
    splits = tl.arange(0, MAX_SPLITS)
    stat_slots = (slots[None, :] + splits[:, None]) * 2  # [MAX_SPLITS, BLOCK_M]
    present = (splits[:, None] < num_splits) & row_valid[None, :]
    m_s = tl.load(stats_ptr + stat_slots, mask=present, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(stats_ptr + stat_slots + 1, mask=present, other=0.0, cache_modifier=".cg")
    m_i = tl.max(m_s, axis=0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # no split with keys: every weight 0
    l_i = tl.sum(tl.exp2(m_s - m_safe[None, :]) * l_s, axis=0)
    acc_0 = tl.zeros([RV0, BLOCK_M], tl.float32)
    acc_1 = tl.zeros([RV1, BLOCK_M], tl.float32)
    for first in range(0, num_splits, COMBINE_SPLITS):
        for offset in tl.static_range(COMBINE_SPLITS):
            slot = slots + (first + offset)
            valid = row_valid & (slot - slots < num_splits)  # a tensor: the interpreter takes no scalar mask
            weight = tl.exp2(tl.load(stats_ptr + slot * 2, mask=valid, other=float("-inf"),
                                     cache_modifier=".cg") - m_safe)
            partial = partial_ptr + slot[None, :] * PAD_V
            acc_0 += weight[None, :] * tl.load(partial + rv0[:, None], mask=valid[None, :] & (rv0[:, None] < V0_LIMIT),
                                               other=0.0, cache_modifier=".cg")
            if SPLIT_V:
                acc_1 += weight[None, :] * tl.load(partial + rv1[:, None],
                                                   mask=valid[None, :] & (rv1[:, None] < RANK_V), other=0.0,
                                                   cache_modifier=".cg")
    return m_i, l_i, acc_0, acc_1


@triton.jit
def _store_out(out_ptr, q_start, stride_ot, stride_oh, row_head, row_valid, l_i, acc_0, acc_1, rv0, rv1,
               RANK_V: tl.constexpr, V0_LIMIT: tl.constexpr, SPLIT_V: tl.constexpr):
    """The normalized V-latent output of a program's rows (a row with no key, l = 0, stays 0)."""
    inverse = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    out_cols = out_ptr + q_start.to(tl.int64) * stride_ot + row_head[None, :] * stride_oh
    tl.store(out_cols + rv0[:, None], (acc_0 * inverse[None, :]).to(out_ptr.dtype.element_ty),
             mask=row_valid[None, :] & (rv0[:, None] < V0_LIMIT))
    if SPLIT_V:
        tl.store(out_cols + rv1[:, None], (acc_1 * inverse[None, :]).to(out_ptr.dtype.element_ty),
                 mask=row_valid[None, :] & (rv1[:, None] < RANK_V))
