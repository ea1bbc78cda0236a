"""Launchers of the Triton kernels (:mod:`vllm_palu.attention.kernels`, :mod:`vllm_palu.attention.prefill_kernels`).

What does not change between steps is computed once per layer, by :func:`plan_layer`: the up-projection in the
kernels' rotary layout, the rotary table in the key dtype and whether it can be shifted, the rank tiles and where
the V latent sits in a row (the latent layout: split or shared), the tile shapes. A launcher then only reads
host-side sizes and tensor strides: it never reads a device tensor, allocates nothing on the decode path, and so
runs unchanged inside vLLM's CUDA graphs. The KV split count of a decode batch depends on its size and the layer's
tiles alone (:func:`decode_splits`), so a graph captured for a batch size holds the grid eager mode would launch for it.

Shape contract: :mod:`vllm_palu.attention.reference` (the fp32 oracle); :func:`paged_latent_attention` has its
signature. Imports no vLLM; runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import triton
import triton.language as tl

from vllm_palu.attention.kernels import (MAX_SPLITS as KERNEL_MAX_SPLITS, decode_attention_kernel,
                                        write_latents_kernel, write_quantized_latents_kernel)
from vllm_palu.attention.launch import CompiledLaunch
from vllm_palu.attention.latent_quant import LATENT_SCALE_BYTES, check_ranks, is_shared, page_views, rank_v_of_row
from vllm_palu.attention.prefill_kernels import (NEW_TOKENS, PREFIX_WINDOW, WHOLE_CONTEXT, prefill_attention_kernel,
                                                rebuild_context_kernel)

LOG2E = 1.4426950408889634
MAX_SPLITS = KERNEL_MAX_SPLITS.value  # KV splits of a decode launch at most (the combine loads them as one tile)
# Registers bound how many decode programs a multiprocessor holds: every default decode tile takes (nearly) all the
# registers a thread may have (triton 3.8 for sm_90, benchmarks/compile_sm90.py: uncapped, one-warp per head 252,
# two-warp fp8 255, four-warp groups of 2 255, shared per head 228), and their shared memory allows as many programs
# (docs/KERNEL_NOTES.md lists both; Llama-2-7B's groups of 4 are the exception: shared memory holds 2, not 4).
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # a warp's registers are allocated in units of this many
DECODE_REGISTERS = 255  # per thread, unless the plan caps them (its decode "maxnreg")
# The per-head 16-key tile capped at 208 registers a thread: no spill and 451 instructions a tile against 447 at
# 255 (triton 3.8 SASS, benchmarks/compile_sm90.py --maxnreg), so 9 one-warp programs share a multiprocessor
# instead of 8 (its shared memory, 23,040 B and the 1 KiB reserve, allows 9 of 228 KiB); at 192 and 200 the same
# code, at 184 it spills.
DECODE_PER_HEAD_REGISTERS = 208
DECODE_WAVES = 4  # a decode batch's programs over all its splits: at most this many device-fulls (waves)
# A decode program's fixed work (its query, the partial sums it writes, the combine) in units of one whole context's
# KV loop: ~100 keys' worth, 1/50 of a 5K context; and what a partly filled last wave costs against a full one (its
# programs share the multiprocessors with fewer others). Fitted together to the split timings of 2026-12-04 (H200,
# groups of 2, at 86 x 5,120 and 16 x 32K: worst error 0.6%; docs/KERNEL_NOTES.md "Split counts of padded batches").
DECODE_PROGRAM_COST = Fraction(1, 50)
DECODE_TAIL_COST = Fraction(4, 5)
DECODE_UP_BYTES = 48 * 1024  # key up-projection a decode program holds in shared memory for its heads
FLASH_KEY_TILE = 256  # FlashAttention's widest key tile: the rebuild zero-fills this far past a context's end
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LATENT_CODES = {"auto": 0, "fp8": 1, "int4": 2}  # the kernels' LATENT constexpr
# Every launch after a kernel's first (per specialization) skips the JIT's per-call work: launch.py. Their caches
# hold compiled kernels keyed by specialization, like Triton's own.
(launch_write_latents, launch_write_quantized_latents, launch_decode, launch_rebuild_context,
 launch_prefill_attention) = map(CompiledLaunch, (write_latents_kernel, write_quantized_latents_kernel,
                                                  decode_attention_kernel, rebuild_context_kernel,
                                                  prefill_attention_kernel))


def _pow2(value: int, minimum: int = 16) -> int:
    """Smallest power of two >= value (at least ``minimum``)."""
    return max(minimum, 1 << max(value - 1, 0).bit_length())


def rank_chunks(rank: int, minimum: int = 16) -> tuple[int, int]:
    """Cover ``rank`` with power-of-two tiles of at least ``minimum`` (Triton's shapes; fp8 dots need 32): one, or
    two when that pads less (48 -> 32 + 16, 80 -> 64 + 16, 176 -> 128 + 64). Returns (first, second); second is 0
    for a single chunk."""
    single = _pow2(rank, minimum)
    first = max(minimum, single // 2)
    if first >= rank:
        return single, 0
    second = _pow2(rank - first, minimum)
    return (first, second) if first + second < single else (single, 0)


@dataclass(frozen=True)
class KernelConfig:
    """Launch choices of the kernels. ``None`` takes the default measured on the H200 (docs/KERNEL_NOTES.md),
    resolved in one place, :func:`plan_layer`. Serving uses the defaults; tests and benchmarks set fields."""

    decode_block_n: int | None = None  # keys per decode tile
    decode_warps: int | None = None
    decode_stages: int | None = None
    decode_registers: int | None = None  # registers a thread of a decode program may take (Triton's maxnreg)
    decode_heads: int | None = None  # KV heads of a latent group per decode program (ops.decode_heads)
    rope_shift: bool | None = None  # rotate keys by their offset in the tile (needs a shiftable table)
    key_dtype: torch.dtype | None = None  # dtype keys are rotated and scored in
    rebuild_dtype: torch.dtype | None = None  # dtype of the key rebuild's operands (latents, k_up)
    join_halves: bool | None = None  # score both rotary halves of the keys in one dot
    paired_cvt: bool | None = None  # fp32 sums to fp16 keys two at a time (inline PTX: CUDA only; default on)
    fp8_mma: bool = False  # fp8 latents: keys rebuilt on fp8 tensor cores from an e4m3 copy of k_up (slower: off)
    prefill_block_m: int | None = None  # query rows (tokens x query heads of a KV head) per prefill tile
    prefill_block_n: int | None = None
    prefill_warps: int | None = None
    prefill_stages: int = 3
    prefill_workspace_tokens: int = 65536  # context positions of rebuilt keys held at once, over all requests


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """Everything the launchers need about one attention layer that does not change between steps."""

    num_heads: int
    kv_heads: int
    group_size: int
    head_dim: int
    rank_k: int
    rank_v: int
    latent_format: str  # "auto", "fp8" or "int4" (vllm_palu.attention.latent_quant)
    latent_layout: str  # "split" (K latent, V latent) or "shared" (one latent, both; rank_k == rank_v)
    softmax_scale: float
    scale: float  # softmax scale times log2(e): the kernels use exp2
    k_up: torch.Tensor  # [kv_heads, head_dim, rank_k], rotary halves in NeoX order
    k_bias: torch.Tensor | None  # [kv_heads, head_dim], same order
    k_up_fp8: torch.Tensor | None  # fp8 tensor-core rebuild: k_up in e4m3, per (head, dim) channel ...
    k_up_scale: torch.Tensor | None  # ... scaled by these [kv_heads, head_dim], fp32
    query_permutation: torch.Tensor | None  # GPT-J rotary: head dims reordered into NeoX halves
    rotary: torch.Tensor  # [positions, head_dim] cos | sin, in key dtype
    multiprocessors: int  # of the device (1 on CPU): sets the decode split count
    fp32_placeholder: torch.Tensor  # passed for an unused fp32 pointer (one compiled kernel whether used or not)
    decode: dict = field(repr=False)  # constexprs and launch options of decode_attention_kernel
    prefill_tile: tuple[int, int, int, int]  # block_m, block_n, warps, stages
    prefill_workspace_tokens: int
    ranks: dict = field(repr=False)  # rank-tile constexprs shared by every kernel

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def decode_programs(self) -> int:
        """Decode programs per request and split: KV heads over the heads each program takes."""
        return self.kv_heads // self.decode["HEADS"]

    @property
    def decode_slots(self) -> int:
        """Decode programs the device runs at once: per multiprocessor, as many as its registers hold (every
        default tile takes all it may: 255 a thread, or the plan's cap)."""
        registers = self.decode["maxnreg"] or DECODE_REGISTERS
        per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        per_sm = REGISTERS_PER_SM // (per_warp * self.decode["num_warps"])
        return max(per_sm, 1) * self.multiprocessors

    def decode_splits(self, num_requests: int, fewest_requests: int | None = None) -> int:
        """KV splits of a decode launch over ``num_requests`` requests, of which as few as ``fewest_requests`` are
        real (:func:`decode_splits`)."""
        return decode_splits(num_requests, self.decode_programs, self.decode_slots, fewest_requests)


def _rank_tiles(rank_k: int, rank_v: int, latent_format: str, latent_layout: str, fp8_mma: bool = False) -> dict:
    """The kernels' rank constexprs: tiles covering the K and V latents (one chunk, or two with less padding; int4
    pages hold both halves of a rank in one byte tile: two chunks of rank / 2), and where V sits in a row:
    ``V_OFFSET`` (elements, or payload bytes for fp8 / int4) and ``V_SCALE`` (slot of V's fp16 scale, its int4
    minimum next) in the scale row. A shared latent is the K latent: both 0, the K latent's own slots."""
    if latent_format == "int4":
        rk0 = rk1 = _pow2(rank_k // 2)
        rv0 = rv1 = _pow2(rank_v // 2)
        k_limit, v_limit = rank_k // 2, rank_v // 2
    else:
        rk0, rk1 = rank_chunks(rank_k, 32 if fp8_mma else 16)  # K tiles are the rebuild's reduction dimension
        rv0, rv1 = rank_chunks(rank_v)
        k_limit, v_limit = rank_k, rank_v
    shared = is_shared(latent_layout)
    return dict(RANK_K=rank_k, RANK_V=rank_v, RK0=rk0, RK1=max(rk1, 16), RV0=rv0, RV1=max(rv1, 16),
                SPLIT_K=rk1 > 0, SPLIT_V=rv1 > 0, LATENT=LATENT_CODES[latent_format], K0_LIMIT=k_limit,
                K1_OFFSET=k_limit if latent_format == "int4" else rk0, V0_LIMIT=v_limit,
                V1_OFFSET=v_limit if latent_format == "int4" else rv0,
                V_OFFSET=0 if shared else k_limit,  # split: after K's payload and K's fp16 scale set
                V_SCALE=0 if shared else LATENT_SCALE_BYTES[latent_format] // 2)


def rotary_permutation(head_dim: int, is_neox_style: bool, device) -> torch.Tensor | None:
    """GPT-J rotates pairs (2i, 2i+1); reordering dims to [evens | odds] turns them into NeoX halves. Applied to
    both queries and key up-projection rows, it leaves every q.k unchanged."""
    if is_neox_style:
        return None
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(device)


def rotary_is_shiftable(table: torch.Tensor, block_n: int) -> bool:
    """Whether rows of the cos/sin table are rotations that compose, R(start + j) = R(start) R(j), for every tile
    start (a multiple of ``block_n``) and offset j < block_n: true of cos/sin(position x frequency) with any
    frequencies (plain, linear, NTK, Llama-3 scaling), false where the table carries a magnitude (YaRN's mscale:
    cos^2 + sin^2 != 1) or changes frequencies along positions. The tolerances admit a bf16 table of 128K
    positions (angles rounded in fp32, entries in bf16: composition error up to ~0.01). One device sync: called
    once per layer, by :func:`plan_layer`."""
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
    return bool(worst <= 1)


def plan_layer(k_up: torch.Tensor, k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
               num_heads: int, rank_v: int, scale: float, latent_format: str = "auto",
               config: KernelConfig = KernelConfig(), latent_layout: str = "split") -> LayerPlan:
    """The per-layer facts of the kernels, with every default of ``config`` resolved (the only place that does).

    ``k_up [groups, group_size * head_dim, rank_k]`` and ``k_bias`` as the model holds them; ``cos_sin_cache`` the
    model's rotary table (its dtype: the model's); ``latent_layout`` what a cache row holds (shared: ``rank_v ==
    rank_k``). Costs one device sync (the rotary check): call it once per layer, after the weights are loaded."""
    num_groups, group_width, rank_k = k_up.shape
    problem = check_ranks(rank_k, rank_v, latent_format, latent_layout)
    if problem:
        raise ValueError(problem)
    head_dim = cos_sin_cache.shape[-1]
    if head_dim * (group_width // head_dim) != group_width:
        raise NotImplementedError("partial rotary embeddings are not supported by the Triton PALU kernels")
    group_size = group_width // head_dim
    kv_heads = num_groups * group_size
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv_heads} KV heads")
    device = k_up.device
    on_gpu = device.type == "cuda"
    # 16-bit models rebuild, rotate and score keys in fp16: packed math and half the registers of fp32 tiles.
    key_dtype = config.key_dtype or (torch.float32 if k_up.dtype == torch.float32 else torch.float16)

    k_up_heads = k_up.reshape(kv_heads, head_dim, rank_k)
    permutation = rotary_permutation(head_dim, is_neox_style, device)
    if permutation is not None:
        k_up_heads = k_up_heads[:, permutation]
        k_bias = None if k_bias is None else k_bias.view(kv_heads, head_dim)[:, permutation]
    elif k_bias is not None:
        k_bias = k_bias.view(kv_heads, head_dim)
    rotary = cos_sin_cache.to(key_dtype).contiguous()

    # Decode tiles measured on the H200 (docs/KERNEL_NOTES.md "Version 3.4"). 16-bit latents: one-warp programs
    # with double-buffered latents (3 stages), keys rotated by their offset in the tile and the query back by the
    # tile's start; 16-key tiles for GQA with latent rows of 128+ (Llama-3-8B kv 0.5: 347 -> 322 us), 32 keys
    # otherwise. Quantized latents, whose dequantization needs the registers: two-warp programs of 64 keys, one
    # buffer, the per-tile table (the offset rotation spills there). The 16-key tile capped at
    # DECODE_PER_HEAD_REGISTERS, for one more program a multiprocessor.
    heads_per_kv = num_heads // kv_heads
    heads = config.decode_heads or decode_heads(group_size, head_dim, rank_k, k_up.element_size())
    if group_size % heads:
        raise ValueError(f"{heads} KV heads per decode program do not divide latent groups of {group_size}")
    row = rank_k if is_shared(latent_layout) else rank_k + rank_v
    registers = None  # a thread's register cap (maxnreg); None: all it may take
    if latent_format == "auto" and (group_size > 1 or is_shared(latent_layout)):
        # Joint groups and shared latents: more key-rebuild work per byte, four-warp 64-key tiles (wgmma); two-warp
        # 32-key tiles where a 64-key tile's buffers do not fit beside the up-projection (rows over 512). H200,
        # triton 3.8, Llama-3-8B kv 0.5 b16 32K (docs/KERNEL_NOTES.md "Version 4.2"): groups of 2, 2 heads a
        # program 573 us (1 head: 602; one-warp 16-key tiles: 747); shared per head 694 (1042).
        block_n, warps, stages = (64, 4, 2) if row <= 512 else (32, 2, 2)
        block_n = block_n if on_gpu else 32
    elif latent_format == "auto":
        wide = heads_per_kv > 1 and (rank_k if is_shared(latent_layout) else rank_k + rank_v) >= 128
        block_n = 16 if wide and on_gpu and rotary_is_shiftable(rotary, 16) else 32
        warps, stages = 1, 3
        if block_n == 16:
            registers = DECODE_PER_HEAD_REGISTERS
    else:
        block_n, warps, stages = 64 if on_gpu else 32, 2, 2
    if (config.decode_block_n, config.decode_warps, config.decode_stages) != (None, None, None):
        registers = None  # the cap was measured on the default tile only
    registers = config.decode_registers or registers
    block_n = config.decode_block_n or block_n
    warps, stages = config.decode_warps or warps, config.decode_stages or stages
    wgmma_tiles = warps >= 4  # four-warp tiles: triton 3.8 makes their dots wgmma
    rope_shift = config.rope_shift if config.rope_shift is not None else latent_format == "auto"
    rope_shift = rope_shift and rotary_is_shiftable(rotary, block_n)
    fp8_mma = config.fp8_mma and latent_format == "fp8"
    # The key rebuild's operands: on wgmma tiles with latent rows up to 256, 16-bit latents and k_up as the model
    # holds them (bf16), which triton 3.8 then reads from shared memory with the k-steps chained (converted to fp16
    # they went through registers and every wgmma waited for the one before: groups of 2, 47 -> 17 waits per 64-key
    # tile; H200 559 -> 433 us, shared per head 677 -> 566); fp32 sums. Elsewhere the key dtype: one-warp tiles
    # (fp16 sums, half the registers), dequantized latents (fp16's mantissa), and rows of 512 (groups of 4), where
    # bf16 operands took 20 KB more shared memory and spilled more (Llama-2-7B 4575 -> 8901 us).
    bf16_operands = wgmma_tiles and row <= 256 and latent_format == "auto" and k_up.dtype == torch.bfloat16
    rebuild_dtype = config.rebuild_dtype or (k_up.dtype if bf16_operands else key_dtype)
    # One score dot over both rotary halves where a program has several query rows (GQA: per head 328 -> 316 us);
    # two with one row (MHA), which spill less (Llama-2-7B groups of 4: 4575 us joined, 4087 before).
    join_halves = config.join_halves if config.join_halves is not None else heads_per_kv > 1
    acc_dtype = torch.float32 if torch.bfloat16 in (key_dtype, rebuild_dtype) else key_dtype
    ranks = _rank_tiles(rank_k, rank_v, latent_format, latent_layout, fp8_mma)
    k_up_heads = k_up_heads.contiguous()
    k_up_fp8 = k_up_scale = None
    if fp8_mma:  # channel scales from each (head, dim) row's largest magnitude
        k_up_scale = (k_up_heads.float().abs().amax(dim=-1) / 448.0).clamp(min=2.0 ** -24)
        k_up_fp8 = (k_up_heads.float() / k_up_scale[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    # Decode query rows: the query heads of the program's KV heads, padded to a power of two only (not to 16:
    # Triton pads tiny dots itself, and the softmax and accumulators shrink; Llama-3-8B 476 -> 421 us).
    decode = dict(HEADS_PER_KV=heads_per_kv, GROUP_SIZE=group_size, HEADS=heads, HEAD_DIM=head_dim,
                  HALF=head_dim // 2,
                  PAD_V=_pow2(rank_v), KEY_DTYPE=TRITON_DTYPES[key_dtype],
                  REBUILD_DTYPE=TRITON_DTYPES[rebuild_dtype], ACC_DTYPE=TRITON_DTYPES[acc_dtype],
                  BLOCK_M=_pow2(heads * heads_per_kv, 1), BLOCK_N=block_n, HAS_BIAS=k_bias is not None,
                  ROPE_SHIFT=rope_shift, DOT_PRECISION=_dot_precision(key_dtype), FP8_MMA=fp8_mma,
                  TAIL_STAGES=1 if wgmma_tiles else None, JOIN_HALVES=join_halves,
                  PAIRED_CVT=on_gpu and config.paired_cvt is not False, num_warps=warps,
                  num_stages=stages, maxnreg=registers, **ranks)
    # Prefill tiles: scripts measured on the H200 (docs/KERNEL_NOTES.md, prefill).
    prefill_block_n = config.prefill_block_n or (64 if on_gpu else 16)
    prefill_block_m = max(config.prefill_block_m or (256 if on_gpu else 16), _pow2(heads_per_kv))
    prefill_tile = (prefill_block_m, prefill_block_n, config.prefill_warps or (8 if on_gpu else 4),
                    config.prefill_stages)
    return LayerPlan(num_heads=num_heads, kv_heads=kv_heads, group_size=group_size, head_dim=head_dim,
                     rank_k=rank_k, rank_v=rank_v, latent_format=latent_format, latent_layout=latent_layout,
                     softmax_scale=scale, scale=scale * LOG2E,
                     k_up=k_up_heads, k_bias=None if k_bias is None else k_bias.contiguous(),
                     k_up_fp8=k_up_fp8, k_up_scale=k_up_scale,
                     query_permutation=permutation, rotary=rotary,
                     multiprocessors=torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1,
                     fp32_placeholder=torch.empty(1, dtype=torch.float32, device=device),
                     decode=decode, prefill_tile=prefill_tile,
                     prefill_workspace_tokens=config.prefill_workspace_tokens, ranks=ranks)


def decode_heads(group_size: int, head_dim: int, rank_k: int, element_size: int) -> int:
    """KV heads per decode program: as many of a latent group's heads as share one program's latent tiles with
    their key up-projections held in shared memory, DECODE_UP_BYTES at most (1 if even one head's is larger)."""
    heads = min(group_size, max(1, DECODE_UP_BYTES // (head_dim * rank_k * element_size)))
    while group_size % heads:
        heads -= 1
    return heads


def decode_splits(num_requests: int, programs: int, slots: int, fewest_requests: int | None = None) -> int:
    """KV splits of a decode launch over ``num_requests`` requests of ``programs`` decode programs each (per split),
    on a device running ``slots`` programs at once. Programs of equal contexts run in waves of ``slots``: ``s``
    splits take requests * programs * s / slots waves, a partly filled last one at DECODE_TAIL_COST of a full one,
    each of 1/s of a context plus a program's fixed work (DECODE_PROGRAM_COST). The fastest count, and of equal ones the fewest; up to DECODE_WAVES waves' worth of
    programs and MAX_SPLITS. A FULL CUDA graph captured for ``num_requests`` also replays every smaller batch down
    to ``fewest_requests`` (vLLM pads it with requests whose programs exit at once): then the count whose worst
    batch, against that batch's own fastest count, loses least. H200, groups of 2 (2 programs a multiprocessor, 4
    a request): 86 requests take 3 splits (measured 1 / 2 / 3 / 4 / 6 splits: 480 / 383 / 355 / 395 / 374 us), 16
    requests 4 (16 splits: 426, 4: 410 us). A function of the batch size alone, so a CUDA graph captured for a
    batch size holds the grid eager mode would launch for it."""
    batches = range(num_requests if fewest_requests is None else fewest_requests, num_requests + 1)
    most = max(1, min(MAX_SPLITS, math.ceil(DECODE_WAVES * slots / max(batches[0] * programs, 1))))
    counts = range(1, most + 1)

    def time(requests: int, splits: int) -> Fraction:
        waves = Fraction(requests * programs * splits, slots)
        waves += DECODE_TAIL_COST * (math.ceil(waves) - waves)
        return waves * (Fraction(1, splits) + DECODE_PROGRAM_COST)

    fastest = {requests: min(time(requests, splits) for splits in counts) for requests in batches if requests}

    def loss(splits: int) -> Fraction:  # the most any batch loses against its own fastest count
        return max((time(requests, splits) / best for requests, best in fastest.items()), default=Fraction(0))

    return min(counts, key=lambda splits: (loss(splits), splits))


@dataclass(frozen=True)
class DecodeScratch:
    """Split-KV scratch of the decode kernel (unused with one split): each split's partial V-latent sums
    ``[requests x heads x splits, pow2(rank_v)]`` and softmax statistics ``[.., 2]``, flat fp32, and one int32
    arrival count per (request, decode program), zero between launches (the last split to arrive combines the
    splits and resets it)."""

    partial: torch.Tensor
    stats: torch.Tensor
    arrivals: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, num_heads: int, rank_v: int, programs: int, device) -> DecodeScratch:
        """For ``rows`` (requests x splits) of ``num_heads`` heads, and ``programs`` (requests x KV heads)
        arrival counts."""
        return cls(torch.empty(rows * num_heads * _pow2(rank_v), dtype=torch.float32, device=device),
                   torch.empty(rows * num_heads * 2, dtype=torch.float32, device=device),
                   torch.zeros(programs, dtype=torch.int32, device=device))


def decode_scratch(num_heads: int, rank_v: int, kv_heads: int, splits: list[int], device) -> DecodeScratch:
    """Scratch for every decode batch of up to ``len(splits) - 1`` requests, ``splits[b]`` the split count of a batch
    of ``b``, allocated once (the metadata builder holds it, so every CUDA graph uses the same buffers)."""
    rows = max((b * count for b, count in enumerate(splits) if count > 1), default=0)
    return DecodeScratch.allocate(rows, num_heads, rank_v, (len(splits) - 1) * kv_heads, device)


def write_latents(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k_latent: torch.Tensor,
                  v_latent: torch.Tensor | None, latent_format: str = "auto", num_tokens: int | None = None,
                  latent_layout: str = "split") -> None:
    """Triton version of :func:`vllm_palu.attention.reference.write_latents`: the first ``num_tokens`` (default:
    all) rows of ``k_latent [T, G, rank_k]`` / ``v_latent [T, G, rank_v]`` into their slots of ``kv_cache [blocks,
    G, block_size, row]`` (slots < 0: padding, skipped); fp8 / int4 latents are quantized into the page layout on
    the way (:mod:`vllm_palu.attention.latent_quant`). Shared: ``k_latent`` is the one latent written
    (``v_latent``, the same latent, is not read)."""
    num_tokens = k_latent.shape[0] if num_tokens is None else num_tokens
    if num_tokens == 0:
        return
    shared = is_shared(latent_layout)
    groups, rank_k = k_latent.shape[1:]
    if shared:  # the V arguments are never read: K's stand in, one compiled kernel per shape
        v_latent = k_latent
    rank_v = v_latent.shape[-1]
    if latent_format == "auto":
        launch_write_latents(
            (num_tokens, groups),
            k_latent, v_latent, kv_cache, slot_mapping,
            k_latent.stride(0), k_latent.stride(1), v_latent.stride(0), v_latent.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            BLOCK_SIZE=kv_cache.shape[2], RANK_K=rank_k, RANK_V=rank_v, PAD_K=_pow2(rank_k, 1),
            PAD_V=_pow2(rank_v, 1), SHARED=shared)
        return
    payload, v_payload, scales = _cache_views(kv_cache, rank_k, latent_format, latent_layout)
    launch_write_quantized_latents(
        (num_tokens, groups),
        k_latent, v_latent, payload, v_payload, scales, slot_mapping,
        k_latent.stride(0), k_latent.stride(1), v_latent.stride(0), v_latent.stride(1),
        payload.stride(0), payload.stride(1), payload.stride(2), v_payload.stride(0), v_payload.stride(1),
        scales.stride(0), scales.stride(1), scales.stride(2), BLOCK_SIZE=kv_cache.shape[2], RANK_K=rank_k,
        RANK_V=rank_v,
        PAD_K=_pow2(rank_k, 2), PAD_V=_pow2(rank_v, 2), INT4=latent_format == "int4", SHARED=shared)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get IEEE fp32 tensor-core products (Triton's fp32 default is tf32); 16-bit operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _cache_views(kv_cache: torch.Tensor, rank_k: int, latent_format: str,
                 latent_layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent rows, key-major V payloads, fp16 scale rows) of the page layout (latent_quant); for 16-bit latents
    (V in the rows) and shared latents (no V payload) the unused views are the first one."""
    if latent_format == "auto":
        return kv_cache, kv_cache, kv_cache
    payload, v_payload, scales = page_views(kv_cache, rank_k, latent_format, latent_layout)
    return payload, payload if v_payload is None else v_payload, scales.view(torch.float16)


def kernel_query(plan: LayerPlan, query: torch.Tensor) -> torch.Tensor:
    """The query in the kernels' rotary layout (GPT-J pairs permuted into NeoX halves, as the plan's k_up)."""
    if plan.query_permutation is not None:
        query = query[..., plan.query_permutation]
    return query if query.stride(-1) == 1 else query.contiguous()


def decode_attention(plan: LayerPlan, query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                     seq_lens: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor, num_requests: int,
                     num_splits: int, scratch: DecodeScratch):
    """Requests ``0 .. num_requests - 1``, one new token each (already written to the cache; requests with no
    token, the padding of CUDA-graph batches, are skipped), attend over their contexts: ``out`` at their tokens.
    ``scratch``: :func:`decode_scratch`'s, for at least ``num_requests`` (unused with one split). Returns the compiled
    decode kernel (registers, SASS: benchmarks/)."""
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"a decode launch takes 1 to {MAX_SPLITS} KV splits, got {num_splits}")
    query = kernel_query(plan, query)
    payload, v_payload, scales = _cache_views(kv_cache, plan.rank_k, plan.latent_format, plan.latent_layout)
    bias = plan.k_bias if plan.k_bias is not None else plan.k_up  # unused when HAS_BIAS is false
    fp8_mma = plan.decode["FP8_MMA"]
    k_up = plan.k_up_fp8 if fp8_mma else plan.k_up
    k_up_scale = plan.k_up_scale if fp8_mma else plan.fp32_placeholder  # unused without FP8_MMA
    kernel = launch_decode(
        (num_requests, plan.decode_programs, num_splits),
        query, payload, v_payload, scales, k_up, k_up_scale, bias, plan.rotary, block_table, seq_lens,
        query_start_loc, out, scratch.partial, scratch.stats, scratch.arrivals, plan.scale, query.stride(0),
        query.stride(1), payload.stride(0), payload.stride(1), payload.stride(2), v_payload.stride(0),
        v_payload.stride(1), scales.stride(0), scales.stride(1), scales.stride(2), block_table.stride(0),
        plan.rotary.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=payload.shape[2], **plan.decode)
    return kernel


@dataclass(frozen=True)
class PrefillBatch:
    """The prefill requests of a batch, as the launchers see them: ``first_request .. + num_requests`` of the
    metadata, their tokens from ``first_token`` on; host-side bounds of their query lengths and of their cached
    prefixes (context before the new tokens). ``step``: what the step's first layer derives for the prefill path
    (workspace buffers, FlashAttention's sequence tensors), reused by the other layers of the step (they run one
    after another on one stream): created by the metadata builder, it lives for one step."""

    first_request: int
    num_requests: int
    first_token: int
    max_query_len: int
    max_prefix_len: int
    step: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class PrefillWorkspace:
    """Rebuilt keys and V latents of one prefill batch (FlashAttention's layout, ``[rows, kv_heads, width]``): the
    new tokens packed by token, and one prefix window of ``window`` positions per request (reused window by
    window). ``windows``: how many prefix windows the longest prefix needs (0: no request has one).
    ``whole_context``: every request's whole context (prefix and new tokens) fits its window, which holds it: one
    causal part, no new-token rows."""

    new_keys: torch.Tensor
    new_values: torch.Tensor
    prefix_keys: torch.Tensor
    prefix_values: torch.Tensor
    window: int
    windows: int
    whole_context: bool

    @property
    def parts(self) -> list[int | None]:
        """What each launch covers, in order: window indices, None for the new tokens."""
        return [0] if self.whole_context else [*range(self.windows), None]

    def part(self, window_index: int | None) -> tuple[int, torch.Tensor, torch.Tensor, int]:
        """(the kernels' part code, keys, values, first context position) of one entry of :attr:`parts`."""
        if window_index is None:
            return NEW_TOKENS, self.new_keys, self.new_values, 0
        return (WHOLE_CONTEXT if self.whole_context else PREFIX_WINDOW, self.prefix_keys, self.prefix_values,
                window_index * self.window)


def prefill_workspace(plan: LayerPlan, query: torch.Tensor, batch: PrefillBatch, v_width: int,
                      window_multiple: int, key_width: int | None = None) -> PrefillWorkspace:
    """Allocate the workspace: ``plan.prefill_workspace_tokens`` context positions in all (Llama-3-8B: 4 KiB a
    position), split evenly over the requests in multiples of ``window_multiple``; a request's whole context where
    the longest fits its share and a prefix is cached (chunked prefill), else windows of the prefix and the new
    tokens apart. Keys are ``key_width`` wide (default: the head dim; wider: zero-padded), values ``v_width``."""
    block_n = plan.prefill_tile[1]
    share = max(window_multiple, plan.prefill_workspace_tokens // batch.num_requests // window_multiple
                * window_multiple)
    context = triton.cdiv(batch.max_prefix_len + batch.max_query_len, window_multiple) * window_multiple
    whole_context = batch.max_prefix_len > 0 and context <= share
    window = context if whole_context else min(
        share, triton.cdiv(max(batch.max_prefix_len, 1), window_multiple) * window_multiple)
    assert window % block_n == 0
    new_rows = 0 if whole_context else query.shape[0] - batch.first_token
    prefix_rows = batch.num_requests * window if batch.max_prefix_len else 0
    key_width = key_width or plan.head_dim
    sizes = ("workspace", new_rows, prefix_rows, plan.kv_heads, key_width, v_width, query.dtype, query.device)
    buffers = batch.step.get(sizes)
    if buffers is None:  # the step's first layer of these sizes: later ones rebuild into the same buffers
        buffers = batch.step[sizes] = (
            query.new_empty(new_rows, plan.kv_heads, key_width), query.new_empty(new_rows, plan.kv_heads, v_width),
            query.new_empty(prefix_rows, plan.kv_heads, key_width),
            query.new_empty(prefix_rows, plan.kv_heads, v_width))
    return PrefillWorkspace(*buffers, window=window,
                            windows=1 if whole_context else triton.cdiv(batch.max_prefix_len, window),
                            whole_context=whole_context)


def rebuild_context(plan: LayerPlan, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, batch: PrefillBatch,
                    workspace: PrefillWorkspace, window_index: int | None, operand_dtype: torch.dtype) -> None:
    """Rebuild one part of every prefill request's context into the workspace (an entry of
    ``workspace.parts``): its new tokens (``window_index`` None) or window ``window_index``."""
    part, keys, values, window_start = workspace.part(window_index)
    block_n = plan.prefill_tile[1]
    tiles = triton.cdiv(batch.max_query_len, block_n) if part == NEW_TOKENS else workspace.window // block_n
    payload, v_payload, scales = _cache_views(kv_cache, plan.rank_k, plan.latent_format, plan.latent_layout)
    bias = plan.k_bias if plan.k_bias is not None else plan.k_up  # unused when HAS_BIAS is false
    width, key_width = values.shape[-1], keys.shape[-1]
    launch_rebuild_context(
        (tiles, batch.num_requests, plan.kv_heads),
        payload, v_payload, scales, plan.k_up, bias, plan.rotary, block_table, seq_lens, query_start_loc, keys,
        values, batch.first_request, batch.first_token, window_start, workspace.window, part,
        payload.stride(0), payload.stride(1), payload.stride(2), v_payload.stride(0), v_payload.stride(1),
        scales.stride(0), scales.stride(1), scales.stride(2), block_table.stride(0), plan.rotary.stride(0),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        GROUP_SIZE=plan.group_size, HEAD_DIM=plan.head_dim, HALF=plan.head_dim // 2, KEY_WIDTH=key_width,
        K_FILL=_pow2(key_width - plan.head_dim) if key_width > plan.head_dim else 0, **plan.ranks,
        V_WIDTH=width, V_FILL=_pow2(width - plan.rank_v) if width > plan.rank_v else 0,
        OPERAND_DTYPE=TRITON_DTYPES[operand_dtype], HAS_BIAS=plan.k_bias is not None, BLOCK_N=block_n,
        BLOCK_SIZE=payload.shape[2], DOT_PRECISION=_dot_precision(operand_dtype), FILL_ROWS=FLASH_KEY_TILE,
        num_warps=4)


def prefill_attention(plan: LayerPlan, query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor,
                      batch: PrefillBatch) -> None:
    """The prefill requests of ``batch`` attend causally over their contexts: each context is rebuilt once
    (:func:`rebuild_context`: the whole context where it fits the workspace, else the cached prefix window by
    window, then the new tokens), with FlashAttention in Triton over each part; the softmax state is carried
    between parts in fp32 scratch. (Where vLLM's own FlashAttention runs, :mod:`vllm_palu.attention.flash_prefill`
    replaces the Triton attention.)"""
    query = kernel_query(plan, query)
    block_m, block_n, warps, stages = plan.prefill_tile
    block_q = block_m // plan.heads_per_kv
    workspace = prefill_workspace(plan, query, batch, plan.rank_v, block_n)
    pad_v = _pow2(plan.rank_v)
    parts = workspace.parts
    state = (query.new_empty(query.shape[0] - batch.first_token, plan.num_heads, pad_v + 2, dtype=torch.float32)
             if len(parts) > 1 else plan.fp32_placeholder)  # unused with one part
    for index, window_index in enumerate(parts):
        rebuild_context(plan, kv_cache, query_start_loc, seq_lens, block_table, batch, workspace, window_index,
                        query.dtype)
        part, keys, values, window_start = workspace.part(window_index)
        launch_prefill_attention(
            (triton.cdiv(batch.max_query_len, block_q), batch.num_requests, plan.kv_heads),
            query, keys, values, seq_lens, query_start_loc, out, state, plan.scale,
            batch.first_request, batch.first_token, window_start, workspace.window, part, index == 0,
            index == len(parts) - 1,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            out.stride(0), out.stride(1),
            HEADS_PER_KV=plan.heads_per_kv, HEAD_DIM=plan.head_dim, RANK_V=plan.rank_v, PAD_V=pad_v,
            BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(query.dtype),
            num_warps=warps, num_stages=stages)


def paged_latent_attention(query: torch.Tensor, kv_cache: torch.Tensor, k_up: torch.Tensor,
                           k_bias: torch.Tensor | None, cos_sin_cache: torch.Tensor, is_neox_style: bool,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                           scale: float, *, latent_format: str = "auto", num_decodes: int | None = None,
                           num_decode_tokens: int | None = None, num_splits: int | None = None,
                           out: torch.Tensor | None = None, config: KernelConfig = KernelConfig(),
                           prefill=None, latent_layout: str = "split") -> torch.Tensor:
    """Triton version of :func:`vllm_palu.attention.reference.paged_latent_attention` (same signature), for tests
    and benchmarks: plans the layer and reads the batch's sizes from the device on every call, which serving does
    once per layer (the plan) and per step on the host (the metadata builder).

    The first ``num_decodes`` requests (default: all, when every request has one token) take the decode kernel,
    ``num_decode_tokens`` tokens in all (default: one each); the rest the prefill path, ``prefill`` (default
    :func:`prefill_attention`; a :class:`vllm_palu.attention.flash_prefill.FlashPrefill` on GPUs)."""
    num_tokens, num_heads, _ = query.shape
    rank_k = k_up.shape[-1]
    rank_v = rank_v_of_row(kv_cache.shape[-1], rank_k, latent_format, latent_layout)
    if out is None:
        out = query.new_empty(num_tokens, num_heads, rank_v)
    num_requests = seq_lens.shape[0]
    query_lens = query_start_loc.diff()
    if num_decodes is None:
        num_decodes = num_requests if int(query_lens.max()) <= 1 else 0
    num_decode_tokens = num_decodes if num_decode_tokens is None else num_decode_tokens
    plan = plan_layer(k_up, k_bias, cos_sin_cache, is_neox_style, num_heads, rank_v, scale, latent_format, config,
                      latent_layout)
    if num_decodes:
        splits = num_splits or plan.decode_splits(num_decodes)
        scratch = DecodeScratch.allocate(num_decodes * splits, num_heads, rank_v, num_decodes * plan.kv_heads,
                                         query.device)
        decode_attention(plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, num_decodes, splits,
                         scratch)
    if num_decodes < num_requests:
        prefixes = seq_lens[num_decodes:] - query_lens[num_decodes:]
        batch = PrefillBatch(num_decodes, num_requests - num_decodes, num_decode_tokens,
                             int(query_lens[num_decodes:].max()), int(prefixes.max()))
        (prefill or prefill_attention)(plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, batch)
    return out
