"""Triton kernels vs the PyTorch oracle on fresh random inputs over a parameter matrix of :class:`Shape` cases, each
compared by :func:`check`. On the build machine they run under TRITON_INTERPRET=1 (small shapes, fp32: the
interpreter miscomputes bf16 dots); on a GPU at full size (PALU_KERNEL_TESTS_DEVICE, set by conftest.py: cuda where a
GPU is visible). What only a GPU runs is marked ``gpu`` (``pytest -m gpu``)."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import NamedTuple

import pytest
import torch

DEVICE = os.environ["PALU_KERNEL_TESTS_DEVICE"]  # cpu: TRITON_INTERPRET=1, set by conftest.py

triton = pytest.importorskip("triton")

from vllm_palu.attention import ops, reference  # noqa: E402
from vllm_palu.attention.launch import CompiledLaunch  # noqa: E402
from vllm_palu.attention.ops import KernelConfig  # noqa: E402
from vllm_palu.attention.latent_quant import (dequantize_rows, pages_to_rows, quantize_rows, row_bytes,  # noqa: E402
                                              rows_to_pages)

DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rope_cache(max_position: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Shape(NamedTuple):
    """One case of the matrix: the batch (per request: context length, new tokens), the layer's sizes and what a
    cache row holds (``shared``: one latent, rank_k == rank_v)."""

    seq_lens: list[int]
    query_lens: list[int]
    heads: int
    kv_heads: int
    group_size: int  # KV heads per latent group
    head_dim: int
    rank_k: int
    rank_v: int
    block_size: int
    latent_layout: str = "split"


def shared(shape: Shape) -> Shape:
    """The shape with one shared latent of rank_k per row."""
    return shape._replace(rank_v=shape.rank_k, latent_layout="shared")


def make_case(shape: Shape, dtype, extra_blocks=0, bias=False, seed=0):
    """A paged latent cache holding every request's context, its block table shuffled, plus poisoned padding. The
    case carries its ``latent_layout``: the launcher and the oracle both take it."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    groups = shape.kv_heads // shape.group_size
    blocks_per_req = [-(-s // shape.block_size) for s in shape.seq_lens]
    num_blocks = sum(blocks_per_req) + extra_blocks + 1
    row = shape.rank_k if shape.latent_layout == "shared" else shape.rank_k + shape.rank_v
    cache = torch.randn(num_blocks, groups, shape.block_size, row, generator=generator, device=DEVICE, dtype=dtype)
    order = torch.randperm(num_blocks, generator=generator, device=DEVICE)[:sum(blocks_per_req)]
    block_table = torch.zeros(len(shape.seq_lens), max(blocks_per_req), dtype=torch.int32, device=DEVICE)
    start = 0
    for i, count in enumerate(blocks_per_req):
        block_table[i, :count] = order[start:start + count]
        start += count
    query_start = torch.tensor([0] + list(torch.tensor(shape.query_lens).cumsum(0)), dtype=torch.int32)
    random = dict(generator=generator, device=DEVICE)
    query = torch.randn(int(query_start[-1]), shape.heads, shape.head_dim, **random)
    k_up = torch.randn(groups, shape.group_size * shape.head_dim, shape.rank_k, **random) / shape.rank_k ** 0.5
    k_bias = torch.randn(shape.kv_heads * shape.head_dim, **random) * 0.1 if bias else None
    return dict(query=query.to(dtype), kv_cache=cache, k_up=k_up.to(dtype),
                k_bias=None if k_bias is None else k_bias.to(dtype),
                cos_sin_cache=rope_cache(max(shape.seq_lens) + 1, shape.head_dim).to(DEVICE),
                query_start_loc=query_start.to(DEVICE),
                seq_lens=torch.tensor(shape.seq_lens, dtype=torch.int32, device=DEVICE), block_table=block_table,
                scale=shape.head_dim ** -0.5, latent_layout=shape.latent_layout)


def check(case, oracle=None, tolerance=None, *, is_neox_style=True, launch=None, **kwargs):
    """The contract every attention test checks: ``launch`` (default: the Triton launcher
    ``ops.paged_latent_attention``, given ``kwargs``) on ``case`` writes every row of a NaN-poisoned output, within
    ``tolerance`` (default: TOLERANCE of the case's query dtype) relative error of the fp32 oracle on ``oracle``
    (default: the case itself; a quantized case passes its dequantized twin, and its ``latent_format``)."""
    launch = launch or ops.paged_latent_attention
    expected = reference.paged_latent_attention(**(case if oracle is None else oracle), is_neox_style=is_neox_style)
    out = torch.full_like(expected, float("nan"), dtype=case["query"].dtype)  # poisoned: every row must be written
    launch(**case, is_neox_style=is_neox_style, out=out, **kwargs)
    assert torch.isfinite(out).all()
    error = float((out.float() - expected).norm() / expected.norm())
    assert error < (TOLERANCE[case["query"].dtype] if tolerance is None else tolerance), error


def gpu_shapes(shapes):
    """GPU-only cases, as parameters marked ``gpu``, where a GPU runs them; none under the interpreter."""
    return [pytest.param(shape, marks=pytest.mark.gpu) for shape in shapes] if DEVICE == "cuda" else []


SMALL = [
    Shape([5], [1], 4, 2, 1, 32, 16, 24, 16),                      # decode, GQA 2, per head
    Shape([37, 64, 3], [1, 1, 1], 8, 2, 2, 32, 24, 40, 16),        # batch decode, groups of 2 heads
    Shape([40, 70], [7, 70], 4, 4, 4, 32, 8, 48, 32),              # chunked prefill + full prefill, MHA, joint group
    Shape([130], [128], 2, 1, 1, 64, 40, 72, 16),                   # long prefill, head_dim 64, ranks not x16
    Shape([9, 90, 33], [1, 7, 33], 6, 3, 3, 32, 16, 16, 64),        # mixed batch, SmolLM2-like joint group
    Shape([33, 70], [1, 1], 4, 4, 1, 32, 16, 24, 16),               # MHA decode: one query row per KV head
    Shape([50, 17, 96], [1, 1, 5], 16, 4, 4, 32, 40, 88, 16),       # GQA joint group of 4: 16 rows a program
]
SHARED_SMALL = [shared(shape) for shape in SMALL]  # ranks 16, 24 (padded), 8, 40 (two chunks), 16, 16, 40


FULL = [  # GPU only (gpu_shapes): real head sizes and context lengths
    Shape([3000, 1, 4500, 2049], [1, 1, 1, 1], 32, 8, 1, 128, 80, 176, 16),  # Llama-3-8B decode, kv-ratio 0.5
    Shape([4096, 3000], [128, 7], 32, 8, 2, 128, 96, 160, 64),                # chunked prefill + decode, groups of 2
    Shape([2048, 700], [1, 700], 32, 32, 4, 128, 128, 256, 128),              # Llama-2-7B MHA, groups of 4
    Shape([5000], [2048], 9, 3, 3, 64, 64, 128, 32),                           # SmolLM2 joint group, long chunk
    Shape([3000, 1, 4500, 2049], [1, 1, 1, 1], 32, 8, 8, 128, 320, 704, 16),  # Llama-3-8B split over all 8 heads
    Shape([3000, 4500], [1, 1], 32, 8, 4, 128, 160, 352, 16),                 # groups of 4
]
SHARED_FULL = [  # GPU only: shared latents at kv-ratio 0.5 (r = half the group's K + V width)
    Shape([3000, 1, 4500, 2049], [1, 1, 1, 1], 32, 8, 1, 128, 128, 128, 16, "shared"),  # Llama-3-8B per head
    Shape([4096, 3000], [128, 7], 32, 8, 2, 128, 176, 176, 64, "shared"),              # groups of 2, two chunks
    Shape([5000], [2048], 9, 3, 3, 64, 192, 192, 32, "shared"),                         # SmolLM2 joint group
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL + SHARED_SMALL + gpu_shapes(FULL + SHARED_FULL))
def test_attention_matches_reference(shape, dtype):
    check(make_case(shape, dtype, seed=len(shape.seq_lens)))


@pytest.mark.parametrize("shape", [SMALL[1], SMALL[3], SHARED_SMALL[1], SHARED_SMALL[3]])
def test_fp16_key_path_matches_reference(shape):
    """The fp16 key tiles (and fp16 rebuild accumulation) that 16-bit models use, exercised with fp32 inputs (runs
    under the interpreter too)."""
    check(make_case(shape, torch.float32, seed=7), tolerance=5e-3, config=KernelConfig(key_dtype=torch.float16))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("shape", [SMALL[1], SMALL[2], SMALL[6], SHARED_SMALL[6]])
def test_decode_programs_of_fewer_heads_than_the_group(shape, heads):
    """A decode program may take only some of its group's KV heads (when the whole group's up-projection would not
    fit in shared memory): programs of one or two heads give the answer of one program per group."""
    check(make_case(shape, torch.float32 if DEVICE == "cpu" else torch.bfloat16, seed=3),
          config=KernelConfig(decode_heads=heads))


@pytest.mark.parametrize("group_size, rank_k, heads", [(1, 48, 1), (2, 80, 2), (8, 320, 1), (4, 160, 1),
                                                       (4, 16, 4), (3, 64, 3), (6, 40, 3)])
def test_decode_heads_fit_the_up_projection_budget(group_size, rank_k, heads):
    assert ops.decode_heads(group_size, 128, rank_k, 2) == heads


@pytest.mark.parametrize("rank, chunks", [(16, (16, 0)), (24, (32, 0)), (40, (32, 16)), (48, (32, 16)),
                                          (64, (64, 0)), (80, (64, 16)), (176, (128, 64)), (200, (256, 0))])
def test_rank_chunks_cover_rank_with_less_padding(rank, chunks):
    assert ops.rank_chunks(rank) == chunks


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
@pytest.mark.parametrize("num_splits", [2, 3, 4])  # 3: 32-key tiles leave the last split of 100 tokens empty
def test_split_kv_matches_reference(num_splits, latent_layout):
    shape = Shape([100, 7], [1, 1], 4, 2, 1, 32, 16, 24, 16)
    check(make_case(shape if latent_layout == "split" else shared(shape), DTYPES[0]), num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [6, 64])
def test_split_kv_combines_many_splits(num_splits):
    """More filled splits than the combine loads at once (COMBINE_SPLITS), not a multiple of it (300 tokens: 10
    tiles of 32 keys, 5 of the 6 splits filled; 64 splits, MAX_SPLITS: 10 filled), and more than MAX_SPLITS
    refused."""
    case = make_case(Shape([300, 7], [1, 1], 4, 2, 1, 32, 16, 24, 16), DTYPES[0], seed=11)
    check(case, num_splits=num_splits)
    with pytest.raises(ValueError, match="KV splits"):
        check(case, num_splits=ops.MAX_SPLITS + 1)


def test_split_kv_scratch_serves_launch_after_launch():
    """The splits of a decode batch combine inside the decode kernel: the last split of each (request, program) to
    arrive combines them and resets its arrival count, so one scratch (the builder's) serves launch after launch,
    as CUDA-graph replays use it; a short context leaves splits empty."""
    case = make_case(Shape([100, 7, 40], [1, 1, 1], 4, 2, 1, 32, 16, 24, 16), DTYPES[0], seed=5)
    plan = case_plan(case)
    scratch = ops.DecodeScratch.allocate(3 * 4, 4, 24, 3 * 2, DEVICE)  # 3 requests x 4 splits, 2 KV heads

    def launch(query, kv_cache, query_start_loc, seq_lens, block_table, out, **_):
        ops.decode_attention(plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, 3, 4, scratch)

    for _ in range(2):
        check(case, launch=launch)
        assert not scratch.arrivals.any()


@pytest.mark.parametrize("rope_shift, block_n", [(True, 16), (True, 32), (False, 32)])
@pytest.mark.parametrize("neox", [True, False])
def test_decode_rotary_by_tile_offset(rope_shift, block_n, neox):
    """Decode rotates keys by their offset in the tile and the query back by the tile start (R(s + j) = R(s) R(j));
    both ways, with a key bias, GPT-J pairs and a partial last tile, equal the reference."""
    case = make_case(Shape([150, 64, 97], [1, 1, 1], 4, 2, 1, 32, 16, 24, 16), DTYPES[0], bias=True, seed=11)
    assert ops.rotary_is_shiftable(case["cos_sin_cache"], block_n)
    check(case, is_neox_style=neox, config=KernelConfig(rope_shift=rope_shift, decode_block_n=block_n))


def test_scaled_rotary_table_is_not_shifted():
    """A table carrying a magnitude (YaRN's mscale) does not compose as rotations: the plan falls back to the
    per-tile table, and the output still equals the reference on that table."""
    case = make_case(Shape([150, 64], [1, 1], 4, 2, 1, 32, 16, 24, 16), DTYPES[0], seed=12)
    scaled = dict(case, cos_sin_cache=case["cos_sin_cache"] * 1.05)
    assert ops.rotary_is_shiftable(case["cos_sin_cache"], 32)
    assert not ops.rotary_is_shiftable(scaled["cos_sin_cache"], 32)
    plan = ops.plan_layer(scaled["k_up"], None, scaled["cos_sin_cache"], True, 4, 24, 1.0)
    assert not plan.decode["ROPE_SHIFT"]
    check(scaled)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 2^31 cache elements: GPU only")
def test_huge_cache_indexing():
    """Blocks beyond 2^31 elements (8.7 GB bf16 cache; the shuffled block table lands mostly past it): 32-bit
    offsets would wrap."""
    case = make_case(Shape([300, 77], [1, 5], 8, 2, 1, 128, 64, 192, 16), torch.bfloat16, extra_blocks=530_000)
    assert case["kv_cache"].numel() > 2 ** 31 and int(case["block_table"].max()) * 2 * 16 * 256 > 2 ** 31
    check(case)


@pytest.mark.parametrize("query_lens", [[4], [1]])  # the prefill path, the decode kernel
def test_gptj_rotary_and_key_bias(query_lens):
    check(make_case(Shape([50], query_lens, 4, 2, 1, 32, 16, 24, 16), DTYPES[0], bias=True, seed=3),
          is_neox_style=False)


PREFILL = ([SMALL[2], SMALL[3], SMALL[4], SHARED_SMALL[3], SHARED_SMALL[4]]
           + gpu_shapes([FULL[1], FULL[3], SHARED_FULL[1], SHARED_FULL[2]]))


@pytest.mark.parametrize("workspace_tokens", [16, 48])
@pytest.mark.parametrize("shape", PREFILL)
def test_prefill_windows_match_reference(shape, workspace_tokens):
    """A workspace far smaller than the contexts: the prefill path runs window by window, carrying the softmax
    state from window to window (requests shorter than a window see empty windows)."""
    workspace_tokens *= len(shape.seq_lens) * (16 if DEVICE == "cuda" else 1)
    check(make_case(shape, DTYPES[0], seed=6), config=KernelConfig(prefill_workspace_tokens=workspace_tokens))


@pytest.mark.parametrize("workspace_tokens, parts", [(4096, [0]), (256, [0, 1, None]),
                                                     (64, [0, 1, 2, 3, 4, 5, None])])
def test_prefill_takes_one_causal_part_where_the_contexts_fit(workspace_tokens, parts):
    """Chunked prefill whose contexts fit the workspace: one part holding prefix and new tokens (one rebuild, one
    attention launch); otherwise prefix windows, then the new tokens. A batch without cached prefixes is the new
    tokens alone."""
    shape = Shape([200, 70], [20, 70], 4, 2, 1, 32, 16, 24, 16)  # one request with a 180-token prefix
    case = make_case(shape, torch.float32, seed=2)
    config = KernelConfig(prefill_workspace_tokens=workspace_tokens, prefill_block_n=16)  # CPU's tiles on GPUs too
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 24, case["scale"], config=config)
    batch = ops.PrefillBatch(0, 2, 0, 70, 180)
    workspace = ops.prefill_workspace(plan, case["query"], batch, 24, 16)
    assert workspace.parts == parts
    assert workspace.whole_context == (parts == [0])
    new_only = ops.prefill_workspace(plan, case["query"], ops.PrefillBatch(0, 2, 0, 70, 0), 24, 16)
    assert new_only.parts == [None] and new_only.prefix_keys.numel() == 0
    check(case, config=config)


@pytest.mark.parametrize("workspace_tokens", [65536, 64])  # the whole context at once; prefix windows
def test_layers_of_a_step_share_the_prefill_workspace(workspace_tokens):
    """A step's layers run one after another on one stream: they rebuild into the buffers the step's first layer
    allocated (``PrefillBatch.step``, one set per shape), and each layer's output still equals its reference."""
    shape = Shape([200, 70], [20, 70], 4, 2, 1, 32, 16, 24, 16)
    layers = [make_case(shape, DTYPES[0], seed=seed) for seed in (5, 6)]  # other weights and caches, one batch
    config = KernelConfig(prefill_workspace_tokens=workspace_tokens, prefill_block_n=16)
    batch = ops.PrefillBatch(0, 2, 0, 70, 180)
    made = []
    for case in layers:
        plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 24, case["scale"], config=config)

        def step(query, kv_cache, query_start_loc, seq_lens, block_table, out, _plan=plan, **_):
            ops.prefill_attention(_plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, batch)

        check(case, launch=step)
        made.append([value[2].data_ptr() for key, value in batch.step.items() if key[0] == "workspace"])
    assert len(made[0]) == 1 and made[0] == made[1] and made[0][0] != 0  # the prefix buffer: one, made once


def torch_flash_attention(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal, out,
                          fa_version, cu_seqlens_k=None, seqused_k=None, block_table=None,
                          return_softmax_lse=False):
    """vLLM's ``flash_attn_varlen_func`` as FlashPrefill calls it, in fp32 PyTorch: packed or paged keys (a block
    table over ``[pages, page, kv_heads, width]``, ``seqused_k`` keys a request), GQA, the causal mask aligned
    bottom-right; writes ``out`` and returns it with the log-sum-exp ``[heads, tokens]`` (-inf where no key)."""
    heads, kv_heads = q.shape[1], k.shape[-2]
    lse = torch.full((heads, q.shape[0]), float("-inf"))
    for request in range(cu_seqlens_q.numel() - 1):
        start, end = int(cu_seqlens_q[request]), int(cu_seqlens_q[request + 1])
        if block_table is None:
            keys = k[int(cu_seqlens_k[request]):int(cu_seqlens_k[request + 1])]
            values = v[int(cu_seqlens_k[request]):int(cu_seqlens_k[request + 1])]
        else:
            used = int(seqused_k[request])
            keys = k[block_table[request].long()].flatten(0, 1)[:used]
            values = v[block_table[request].long()].flatten(0, 1)[:used]
        keys = keys.float().repeat_interleave(heads // kv_heads, dim=1)
        values = values.float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * softmax_scale
        if causal:  # query i of n sees keys up to len - n + i
            n, length = end - start, keys.shape[0]
            seen = torch.arange(length)[None, :] <= (length - n + torch.arange(n))[:, None]
            scores = scores.masked_fill(~seen, float("-inf"))
        request_lse = torch.logsumexp(scores, dim=-1)
        weights = torch.nan_to_num(torch.exp(scores - request_lse[..., None]))
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, values).to(out.dtype)
        lse[:, start:end] = request_lse
    return (out, lse) if return_softmax_lse else out


def torch_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse):
    """vLLM's ``merge_attn_states`` in PyTorch: two partial attentions merged by their log-sum-exp."""
    merged_lse = torch.logaddexp(prefix_lse, suffix_lse)
    prefix = torch.nan_to_num(torch.exp(prefix_lse - merged_lse)).T[..., None]
    suffix = torch.nan_to_num(torch.exp(suffix_lse - merged_lse)).T[..., None]
    output.copy_(prefix * prefix_output.float() + suffix * suffix_output.float())
    output_lse.copy_(merged_lse)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs vLLM's own FlashAttention (test_flash_prefill_...)")
@pytest.mark.parametrize("workspace_tokens", [65536, 256])  # the whole context in one call; prefix windows
def test_flash_prefill_glue_matches_reference(workspace_tokens):
    """The FlashAttention prefill path's own work (workspace, query padding to FlashAttention's width, cu_seqlens,
    the block table over the workspace, windows merged by log-sum-exp, the output's V-latent columns), with
    FlashAttention itself in PyTorch: two layers of one step (the second reusing the step's tensors), each
    against the oracle. A head dim of 32 with V ranks of 48 pads queries, keys and V latents to width 64."""
    flash_prefill = pytest.importorskip("vllm_palu.attention.flash_prefill")
    shape = Shape([600, 70], [40, 70], 4, 2, 1, 32, 16, 48, 16)  # chunked prefill over a 560-token prefix
    config = KernelConfig(prefill_workspace_tokens=workspace_tokens, prefill_block_n=16)
    batch = ops.PrefillBatch(0, 2, 0, 70, 560)
    for seed in (7, 8):
        case = make_case(shape, DTYPES[0], seed=seed)
        plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 48, case["scale"], config=config)
        flash = flash_prefill.FlashPrefill.__new__(flash_prefill.FlashPrefill)  # vLLM's FlashAttention: CUDA only
        flash.fa_version, flash.width = 3, flash_prefill.flash_head_dim(32, 48)
        flash.attend, flash.merge = torch_flash_attention, torch_merge_attn_states

        def step(query, kv_cache, query_start_loc, seq_lens, block_table, out, _plan=plan, _flash=flash, **_):
            _flash(_plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, batch)

        check(case, launch=step)
        workspace = ops.prefill_workspace(plan, case["query"], batch, flash.width, flash_prefill.PAGE,
                                          key_width=flash.width)
        assert flash.width == 64 and workspace.whole_context == (workspace_tokens == 65536)
        assert workspace.windows == (1 if workspace_tokens == 65536 else 3)


@pytest.mark.parametrize("head_dim, rank_v, width", [(128, 88, 128), (128, 176, 192), (64, 40, 64), (80, 60, 96),
                                                     (128, 320, None)])
def test_flash_attention_width_holds_keys_and_v_latents(head_dim, rank_v, width):
    flash_prefill = pytest.importorskip("vllm_palu.attention.flash_prefill")
    assert flash_prefill.flash_head_dim(head_dim, rank_v) == width


@pytest.mark.parametrize("whole_context", [True, False])
def test_rebuild_fills_the_workspace_slots(whole_context):
    """The rebuild writes a window slot's rows past the context with zeros, up to FlashAttention's widest key tile
    (it reads its last tile there: uninitialized rows would poison its output), and a workspace wider than the
    head dim and the V rank (FlashAttention's width for V latents over the head dim) gets the same keys and V
    latents, then zero columns."""
    shape = Shape([200, 70], [20, 70], 4, 2, 1, 32, 16, 40, 16)  # V rank 40 over head dim 32: width 64
    case = make_case(shape, torch.float32, seed=4)
    config = KernelConfig(prefill_workspace_tokens=4096 if whole_context else 64, prefill_block_n=16)
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 40, case["scale"], config=config)
    batch = ops.PrefillBatch(0, 2, 0, 70, 180)
    narrow = ops.prefill_workspace(plan, case["query"], batch, 40, 16)
    wide = ops.prefill_workspace(plan, case["query"], batch, 64, 16, key_width=64)
    assert narrow.parts == wide.parts and narrow.whole_context == whole_context
    for workspace in (narrow, wide):
        for tensor in (workspace.new_keys, workspace.new_values, workspace.prefix_keys, workspace.prefix_values):
            tensor.fill_(float("nan"))
    window = narrow.window
    for window_index in dict.fromkeys(narrow.parts[:1] + narrow.parts[-2:]):  # first, last window, new tokens
        for workspace in (narrow, wide):
            ops.rebuild_context(plan, case["kv_cache"], case["query_start_loc"], case["seq_lens"],
                                case["block_table"], batch, workspace, window_index, torch.float32)
        part, keys, values, window_start = narrow.part(window_index)
        _, wide_keys, wide_values, _ = wide.part(window_index)
        if part == ops.NEW_TOKENS:  # packed rows, every one a new token's
            slots = [(slice(0, keys.shape[0]), keys.shape[0], keys.shape[0])]
        else:  # each request's slot: its positions of the part, then zeros up to the fill
            ends = [200, 70] if part == ops.WHOLE_CONTEXT else [180, 0]
            used = [max(0, min(end - window_start, window)) for end in ends]
            slots = [(slice(r * window, (r + 1) * window), n, min(window, n + ops.FLASH_KEY_TILE) if n else 0)
                     for r, n in enumerate(used)]
        assert any(n for _, n, _ in slots)
        for rows, n, filled in slots:
            slot_keys, slot_values = keys[rows], values[rows]
            assert torch.isfinite(slot_keys[:filled]).all() and torch.isfinite(slot_values[:filled]).all()
            assert (slot_keys[n:filled] == 0).all() and (slot_values[n:filled] == 0).all()
            torch.testing.assert_close(wide_keys[rows][:filled, :, :32], slot_keys[:filled])
            torch.testing.assert_close(wide_values[rows][:filled, :, :40], slot_values[:filled])
            assert (wide_keys[rows][:filled, :, 32:] == 0).all() and (wide_values[rows][:filled, :, 40:] == 0).all()


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
def test_padding_decodes_without_tokens_then_prefill(latent_layout):
    """CUDA-graph padding: leading requests with no token count as decodes; the prefill path still finds its
    tokens (num_decode_tokens, not num_decodes)."""
    shape = Shape([9, 4, 90], [1, 0, 7], 6, 3, 3, 32, 16, 40, 16)
    case = make_case(shape if latent_layout == "split" else shared(shape), DTYPES[0], seed=8)
    check(case, num_decodes=2, num_decode_tokens=1)


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
@pytest.mark.parametrize("latent_format", ["auto", "fp8", "int4"])
def test_decodes_first_then_prefill(latent_format, latent_layout):
    """vLLM's reordered batches: the first num_decodes requests (one token each) take the decode kernel, the rest
    the prefill path, into one output."""
    shape = Shape([9, 300, 90, 33], [1, 1, 7, 33], 6, 3, 3, 32, 16, 40, 16)
    shape = shape if latent_layout == "split" else shared(shape)
    if latent_format == "auto":
        case, oracle = make_case(shape, DTYPES[0], seed=7), None
    else:
        case, oracle = quantized_case(shape, latent_format, DTYPES[0])
    check(case, oracle, num_decodes=2, num_decode_tokens=2, latent_format=latent_format)


@pytest.mark.parametrize("latent_format", ["auto", "fp8", "int4"])
def test_shared_latent_is_read_as_both_k_and_v(latent_format):
    """The shared layout against the split oracle on rows holding the latent twice ([z, z]): the kernels' V is the
    latent at offset 0 of the row (decode kernel and prefill path, one mixed batch). Canary: V taken from another
    place (the neighbouring slot's latent) changes the oracle far beyond the tolerance."""
    shape = shared(SMALL[4])
    if latent_format == "auto":
        case = make_case(shape, DTYPES[0], seed=21)
        dequantized = dict(case)
    else:
        case, dequantized = quantized_case(shape, latent_format, DTYPES[0], seed=21)
    latent = dequantized["kv_cache"]
    twice = dict(dequantized, kv_cache=torch.cat([latent, latent], dim=-1), latent_layout="split")
    check(case, oracle=twice, num_decodes=1, latent_format=latent_format)
    elsewhere = dict(twice, kv_cache=torch.cat([latent, latent.roll(1, dims=2)], dim=-1))
    right = reference.paged_latent_attention(**twice, is_neox_style=True)
    wrong = reference.paged_latent_attention(**elsewhere, is_neox_style=True)
    assert float((wrong - right).norm() / right.norm()) > 0.05


@pytest.mark.parametrize("latent_format, split_offsets", [("auto", (16, 0)), ("fp8", (16, 1)), ("int4", (8, 2))])
def test_plan_places_the_v_latent(latent_format, split_offsets):
    """Where the kernels read V (payload offset, scale slot) is fixed by the plan: after K in a split row, K's own
    place in a shared row; a shared plan needs rank_v == rank_k."""
    case = make_case(SMALL[0], DTYPES[0])
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 24, 1.0, latent_format)
    assert (plan.ranks["V_OFFSET"], plan.ranks["V_SCALE"]) == split_offsets and plan.latent_layout == "split"
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 16, 1.0, latent_format,
                          latent_layout="shared")
    assert (plan.ranks["V_OFFSET"], plan.ranks["V_SCALE"]) == (0, 0) and plan.decode["V_OFFSET"] == 0
    with pytest.raises(ValueError, match="rank_k and rank_v must be equal"):
        ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 4, 24, 1.0, latent_format,
                       latent_layout="shared")


@pytest.mark.parametrize("group_size, heads, ranks, latent_format, rebuild, accumulate, tail_stages, joined", [
    # four-warp (wgmma) tiles, rows of 240: bf16 operands as stored, fp32 sums
    (2, 8, (80, 160), "auto", torch.bfloat16, torch.float32, 1, True),
    (1, 8, (48, 160), "auto", torch.float16, torch.float16, None, True),  # one-warp tiles: fp16 operands and sums
    (2, 8, (80, 160), "fp8", torch.float16, torch.float16, None, True),  # dequantized latents keep fp16's mantissa
    # rows of 512 (groups of 4): fp16 operands; one query row a program (MHA): one score dot per rotary half
    (4, 4, (160, 352), "auto", torch.float16, torch.float16, 1, False),
])
def test_plan_picks_the_rebuild_operands_and_tail_pipeline(group_size, heads, ranks, latent_format, rebuild,
                                                           accumulate, tail_stages, joined):
    """A bf16 model's key rebuild: on four-warp tiles with latent rows up to 256 from the bf16 latents and k_up as
    they are stored (triton 3.8 chains the k-steps of shared-memory operands), the masked last tile unpipelined (its
    buffers set the program's shared memory); fp16 elsewhere. Keys are rotated and scored in fp16 either way, both
    rotary halves in one dot where a program has several query rows; on CUDA the fp32 sums converted to fp16 two
    at a time (the full-size GPU tests of every four-warp layout check the pairs' order)."""
    tl = triton.language
    rank_k, rank_v = ranks
    k_up = torch.zeros(max(1, 2 // group_size), group_size * 128, rank_k, dtype=torch.bfloat16)
    table = rope_cache(4096, 128).to(torch.bfloat16)
    plan = ops.plan_layer(k_up, None, table, True, heads, rank_v, 1.0, latent_format)
    dtypes = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    assert plan.decode["REBUILD_DTYPE"] == dtypes[rebuild] and plan.decode["ACC_DTYPE"] == dtypes[accumulate]
    assert plan.decode["KEY_DTYPE"] == tl.float16 and plan.decode["TAIL_STAGES"] == tail_stages
    assert plan.decode["JOIN_HALVES"] == joined
    on_device = ops.plan_layer(k_up.to(DEVICE), None, table.to(DEVICE), True, heads, rank_v, 1.0, latent_format)
    assert on_device.decode["PAIRED_CVT"] == (DEVICE == "cuda")  # inline PTX: never under the interpreter
    forced = ops.plan_layer(k_up, None, table, True, heads, rank_v, 1.0, latent_format,
                            KernelConfig(rebuild_dtype=torch.float16, join_halves=not joined))
    assert forced.decode["REBUILD_DTYPE"] == tl.float16 and forced.decode["ACC_DTYPE"] == tl.float16
    assert forced.decode["JOIN_HALVES"] == (not joined)


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
def test_write_latents_scatters_by_slot(latent_layout):
    """Split rows get K then V; shared rows the one latent (K's), with nothing written past it (the next slot)."""
    generator = torch.Generator().manual_seed(0)
    rank_v = 24 if latent_layout == "split" else 16
    cache = torch.randn(6, 2, 16, 16 + rank_v if latent_layout == "split" else 16, generator=generator).to(DEVICE)
    expected = cache.clone()
    slots = torch.tensor([3, -1, 17, 95], dtype=torch.int64, device=DEVICE)
    k_latent = torch.randn(4, 2, 16, generator=generator).to(DEVICE)
    v_latent = torch.randn(4, 2, rank_v, generator=generator).to(DEVICE)  # shared: not read
    reference.write_latents(expected, slots, k_latent, v_latent, latent_layout=latent_layout)
    ops.write_latents(cache, slots, k_latent, v_latent, latent_layout=latent_layout)
    assert torch.equal(cache, expected)
    assert torch.equal(reference.gather_latents(cache, torch.arange(6, device=DEVICE), 96)[:, 17, :16], k_latent[2])


def quantized_case(shape, latent_format, dtype, seed=5):
    """The case's latents stored as fp8/int4 rows, and the same case with the dequantized latents (the oracle)."""
    rank_k, rank_v, layout = shape.rank_k, shape.rank_v, shape.latent_layout
    case = make_case(shape, torch.float32, seed=seed)
    latents = case["kv_cache"] * torch.linspace(0.5, 4.0, case["kv_cache"].shape[-1], device=DEVICE)  # uneven
    if layout == "shared":
        rows = quantize_rows(latents, None, latent_format, layout)
        dequantized = dict(case, kv_cache=dequantize_rows(rows, rank_k, rank_v, latent_format, layout)[0])
    else:
        rows = quantize_rows(latents[..., :rank_k], latents[..., rank_k:], latent_format)
        dequantized = dict(case, kv_cache=torch.cat(dequantize_rows(rows, rank_k, rank_v, latent_format), dim=-1))
    quantized = {name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                 for name, value in dict(case, kv_cache=rows_to_pages(rows, rank_k, latent_format, layout)).items()}
    quantized["cos_sin_cache"] = case["cos_sin_cache"]
    return quantized, dequantized


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL[1:5] + SHARED_SMALL[1:4] + gpu_shapes(FULL + SHARED_FULL))
def test_quantized_latents_match_dequantizing_reference(shape, latent_format, dtype):
    """Quantized pages (fp8 / int4, V payloads key-major) against the oracle on the dequantized latents; SMALL[4]'s
    64-token pages hold two of the interpreter's 32-key decode tiles each (a V tile within one page)."""
    quantized, dequantized = quantized_case(shape, latent_format, dtype)
    check(quantized, oracle=dequantized, latent_format=latent_format)


FP8_MMA_CONFIGS = [KernelConfig(fp8_mma=True)] + ([KernelConfig(fp8_mma=True, decode_block_n=64, decode_warps=4)]
                                                  if DEVICE == "cuda" else [])


@pytest.mark.parametrize("config", FP8_MMA_CONFIGS)
@pytest.mark.parametrize("shape", [SMALL[0], SMALL[1], SMALL[5], SHARED_SMALL[1]] + gpu_shapes(FULL[:1]))
def test_fp8_tensor_core_rebuild_matches_reference(shape, config):
    """fp8 latents with keys rebuilt on fp8 tensor cores (``fp8_mma``): e4m3 codes times the plan's e4m3 copy of
    k_up, then the token's and the channel's scales. Against the dequantizing oracle given that same rounded k_up
    it is as exact as the dequantizing kernels; the rounding itself moves these random cases' outputs by 2-3%."""
    quantized, dequantized = quantized_case(shape, "fp8", DTYPES[0])
    plan = ops.plan_layer(quantized["k_up"], None, quantized["cos_sin_cache"], True, shape.heads, shape.rank_v,
                          quantized["scale"], "fp8", config, shape.latent_layout)
    assert plan.decode["FP8_MMA"] and plan.k_up_fp8.dtype == torch.float8_e4m3fn
    rounded = (plan.k_up_fp8.float() * plan.k_up_scale[..., None]).reshape(quantized["k_up"].shape)
    check(quantized, oracle=dict(dequantized, k_up=rounded), latent_format="fp8", config=config)


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
@pytest.mark.parametrize("shape", [SMALL[1], SHARED_SMALL[1]])
def test_quantized_latents_with_splits(shape, latent_format):
    quantized, dequantized = quantized_case(shape, latent_format, DTYPES[0])
    check(quantized, oracle=dequantized, latent_format=latent_format, num_splits=4)


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
@pytest.mark.parametrize("shape", [SMALL[1], SMALL[3], SHARED_SMALL[1], SHARED_SMALL[3]])  # decode, prefill
def test_quantized_latents_with_key_bias(shape, latent_format):
    """Qwen2-style key bias with quantized latents, in the decode kernel and the prefill path."""
    quantized, dequantized = quantized_case(shape, latent_format, DTYPES[0])
    bias = torch.randn(quantized["k_up"].shape[0] * quantized["k_up"].shape[1], device=DEVICE) * 0.1
    quantized["k_bias"], dequantized["k_bias"] = bias.to(DTYPES[0]), bias
    check(quantized, oracle=dequantized, latent_format=latent_format)


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
@pytest.mark.parametrize("ranks,dtype,latent_layout", [
    ((16, 24), torch.float32, "split"), ((48, 80), torch.bfloat16, "split"), ((2, 6), torch.float16, "split"),
    ((16, 16), torch.float32, "shared"), ((48, 48), torch.bfloat16, "shared"), ((2, 2), torch.float16, "shared")])
def test_write_latents_quantizes_rows(latent_format, ranks, dtype, latent_layout):
    """The fused quantize-and-scatter kernel writes exactly the bytes of the PyTorch contract (codes, fp16 scales
    and minima, page layout), for latents spanning six orders of magnitude between rows; padding slots untouched.
    Shared rows: the one latent and its one scale set."""
    generator = torch.Generator().manual_seed(1)
    magnitude = 10.0 ** (torch.rand(4, 2, 1, generator=generator) * 6 - 3)
    k_latent = (torch.randn(4, 2, ranks[0], generator=generator) * magnitude).to(dtype).to(DEVICE)
    v_latent = (torch.randn(4, 2, ranks[1], generator=generator) * magnitude + 1).to(dtype).to(DEVICE)
    rows = quantize_rows(k_latent, v_latent, latent_format, latent_layout)
    cache = torch.randint(0, 255, (6, 2, 16, rows.shape[-1]), dtype=torch.uint8, generator=generator).to(DEVICE)
    expected = pages_to_rows(cache, ranks[0], latent_format, latent_layout)
    slots = torch.tensor([3, -1, 17, 95], dtype=torch.int64, device=DEVICE)
    expected[slots[[0, 2, 3]] // 16, :, slots[[0, 2, 3]] % 16] = rows[[0, 2, 3]]
    ops.write_latents(cache, slots, k_latent, v_latent, latent_format=latent_format, latent_layout=latent_layout)
    assert torch.equal(pages_to_rows(cache, ranks[0], latent_format, latent_layout), expected)
    reference_cache = rows_to_pages(expected, ranks[0], latent_format, latent_layout)
    reference.write_latents(reference_cache, slots, k_latent, v_latent, latent_format, latent_layout)
    assert torch.equal(reference_cache, cache)


@pytest.mark.parametrize("latent_format", ["fp8", "int4"])
def test_write_latents_rounds_ties_to_even(latent_format):
    """Values exactly halfway between two codes (scale 1 by construction): fp8 124 -> 128, 9.5 -> 10, 2^-9 * 1.5
    -> 2^-8 (subnormal), a tiny negative -> -0; int4 2.5 -> 2, 3.5 -> 4. The kernel must agree with the PyTorch
    contract bit for bit."""
    if latent_format == "fp8":
        k = torch.tensor([448.0, 124.0, 9.5, -9.5, 1.5 * 2 ** -9, -120.0, -2 ** -12, 7.25])  # -2^-12 -> -0
    else:
        k = torch.tensor([0.0, 15.0, 2.5, 3.5, 4.5, 14.5, 0.5, 1.0])
    k_latent = k.view(1, 1, 8).to(DEVICE)
    v_latent = k.flip(0).view(1, 1, 8).to(DEVICE)
    rows = quantize_rows(k_latent, v_latent, latent_format)
    cache = torch.zeros(1, 1, 16, rows.shape[-1], dtype=torch.uint8, device=DEVICE)
    ops.write_latents(cache, torch.tensor([5], device=DEVICE), k_latent, v_latent, latent_format=latent_format)
    assert torch.equal(pages_to_rows(cache, 8, latent_format)[0, 0, 5], rows[0, 0])
    k_back, _ = dequantize_rows(rows[0, 0], 8, 8, latent_format)
    expected = [448, 128, 10, -10, 2 ** -8, -120, 0, 7] if latent_format == "fp8" else [0, 15, 2, 4, 4, 14, 0, 1]
    assert k_back.tolist() == expected


def case_plan(case, latent_format="auto"):
    """The layer plan the backend makes once for ``case``'s weights (split layout, NeoX rotary)."""
    return ops.plan_layer(case["k_up"], case["k_bias"], case["cos_sin_cache"], True, case["query"].shape[1],
                          case["kv_cache"].shape[-1] - case["k_up"].shape[-1], case["scale"], latent_format)


def test_launchers_run_on_inference_tensors():
    """vLLM runs the model under torch.inference_mode(), where its rotary table, weights and metadata are inference
    tensors (no version counter: reading ``_version`` raised in vLLM 0.33 on the first forward). Plan, write the new
    tokens' latents, decode and prefill exactly as the backend does, all on inference tensors."""
    with torch.inference_mode():
        case = make_case(Shape([40, 70, 9], [1, 1, 9], 4, 2, 1, 32, 16, 24, 16), DTYPES[0], seed=13)
        assert case["cos_sin_cache"].is_inference() and case["k_up"].is_inference()
        positions = [39, 69] + list(range(9))  # the new tokens: each request's last query_len positions
        requests = [0, 1] + [2] * 9
        slots = torch.tensor([int(case["block_table"][r, p // 16]) * 16 + p % 16 for r, p in zip(requests, positions)],
                             device=DEVICE)
        generator = torch.Generator(device=DEVICE).manual_seed(3)
        new_k = torch.randn(11, 2, 16, generator=generator, device=DEVICE).to(DTYPES[0])
        new_v = torch.randn(11, 2, 24, generator=generator, device=DEVICE).to(DTYPES[0])
        plan = case_plan(case)
        scratch = ops.DecodeScratch.allocate(2 * 4, 4, 24, 2 * 2, DEVICE)  # 2 requests x 4 splits, 2 KV heads
        ops.write_latents(case["kv_cache"], slots, new_k, new_v)

        def backend(query, kv_cache, query_start_loc, seq_lens, block_table, out, **_):
            ops.decode_attention(plan, query, kv_cache, query_start_loc, seq_lens, block_table, out, 2, 4, scratch)
            ops.prefill_attention(plan, query, kv_cache, query_start_loc, seq_lens, block_table, out,
                                  ops.PrefillBatch(2, 1, 2, 9, 0))

        check(case, launch=backend)
    assert torch.equal(reference.gather_latents(case["kv_cache"], case["block_table"][1], 70)[:, 69, :16],
                       new_k[1])


def model_time(requests: int, programs: int, slots: int, splits: int) -> Fraction:
    """The wave model's time of a batch of ``requests`` in ``splits`` splits: waves of ``slots`` programs (a partly
    filled last one at ops.DECODE_TAIL_COST of a full one), each of 1/splits of a context plus a program's fixed work
    (ops.DECODE_PROGRAM_COST)."""
    full = -(-requests * programs * splits // slots)
    waves = Fraction(requests * programs * splits, slots)
    return (waves + ops.DECODE_TAIL_COST * (full - waves)) * (Fraction(1, splits) + ops.DECODE_PROGRAM_COST)


def allowed_splits(requests: int, programs: int, slots: int) -> list[int]:
    """Split counts up to MAX_SPLITS and DECODE_WAVES waves' worth of programs."""
    return [s for s in range(1, ops.MAX_SPLITS + 1)
            if s == 1 or requests * programs * (s - 1) < ops.DECODE_WAVES * slots]


@pytest.mark.parametrize("programs, slots", [(4, 264), (8, 1056), (1, 264), (32, 528), (3, 8)])
def test_split_count_and_scratch_cover_every_batch_size(programs, slots):
    """The split count is a function of the batch size alone (CUDA graphs hold one grid per captured size), within
    MAX_SPLITS and DECODE_WAVES waves of programs, the fastest in the wave model and the fewest of equal time; the
    builder's scratch, allocated once, holds every batch's splits and a zeroed arrival count per (request, KV
    head)."""
    max_requests = 512
    splits = [1] + [ops.decode_splits(b, programs, slots) for b in range(1, max_requests + 1)]
    scratch = ops.decode_scratch(32, 88, 8, splits, "cpu")
    assert scratch.arrivals.dtype == torch.int32 and scratch.arrivals.numel() == max_requests * 8
    assert not scratch.arrivals.any()
    for requests, count in enumerate(splits[1:], start=1):
        allowed = allowed_splits(requests, programs, slots)
        times = [model_time(requests, programs, slots, s) for s in allowed]
        assert count in allowed and times[count - 1] == min(times) and all(t > min(times) for t in times[:count - 1])
        if count > 1:
            assert requests * count * 32 * 128 <= scratch.partial.numel()
            assert requests * count * 32 * 2 <= scratch.stats.numel()
    assert splits[1] >= splits[max_requests] == 1


@pytest.mark.parametrize("programs, slots, count", [(4, 264, 3), (8, 1056, 6)])
def test_split_count_of_a_captured_size_serves_the_batches_it_replays(programs, slots, count):
    """A FULL graph captured for 128 requests replays batches of 65 to 128 (vLLM pads them): its split count is the
    one whose worst batch loses least against that batch's own fastest count, not the count for 128 real requests.
    Llama-3-8B kv 0.5 on the H200, groups of 2 and per head: 128 requests alone take 1 split, which 86 requests
    padded to 128 ran with (the capacity run of 2026-12-04 04:39)."""
    replayed = range(65, 129)
    assert ops.decode_splits(128, programs, slots, fewest_requests=65) == count
    assert ops.decode_splits(128, programs, slots) == 1 == ops.decode_splits(128, programs, slots, 128)

    def loss(s):
        return max(model_time(r, programs, slots, s) / min(model_time(r, programs, slots, t)
                                                             for t in allowed_splits(65, programs, slots))
                   for r in replayed)

    losses = {s: loss(s) for s in allowed_splits(65, programs, slots)}
    assert losses[count] == min(losses.values()) and all(v > losses[count] for s, v in losses.items() if s < count)
    assert model_time(86, programs, slots, count) < model_time(86, programs, slots, 1)


def test_decode_slots_count_the_register_cap():
    """Programs a multiprocessor holds, from the registers a program's threads take in a warp's allocation units of
    256: uncapped (255 a thread) one-warp tiles 8 and two-warp tiles 4; the per-head tile's cap of 208 (on a GPU:
    ops.DECODE_PER_HEAD_REGISTERS) 9, 192 10. The cap reaches the launch as Triton's ``maxnreg``; a tile chosen
    through the config runs uncapped unless a cap is given too."""
    k_up = torch.zeros(8, 128, 40, dtype=torch.bfloat16)
    table = rope_cache(4096, 128).to(torch.bfloat16)

    def plan(**config):
        return ops.plan_layer(k_up, None, table, True, 32, 88, 1.0, config=KernelConfig(**config))

    assert (plan().decode["maxnreg"], plan().decode_slots) == (None, 8)  # the interpreter's 32-key tile
    assert (plan(decode_registers=208).decode["maxnreg"], plan(decode_registers=208).decode_slots) == (208, 9)
    assert plan(decode_registers=192).decode_slots == 10
    assert plan(decode_warps=2).decode_slots == 4
    assert plan(decode_warps=4, decode_registers=128).decode_slots == 4
    assert ops.DECODE_PER_HEAD_REGISTERS == 208


# Each default layout's decode tile at Llama-3-8B (and Llama-2-7B) kv 0.5 shapes: (group size, ranks, KV heads,
# latent format, layout, programs a multiprocessor the compiled kernel's registers and shared memory allow).
RESIDENCY_CASES = [(1, (40, 88), 8, "auto", "split"), (2, (80, 176), 8, "auto", "split"),
                   (1, (128, 128), 8, "auto", "shared"), (1, (40, 88), 8, "fp8", "split"),
                   pytest.param(4, (160, 352), 32, "auto", "split", marks=pytest.mark.xfail(
                       strict=True, reason="shared memory holds 2 of Llama-2-7B's groups-of-4 programs a "
                       "multiprocessor, the registers 4: the plan counts registers only (docs/KERNEL_NOTES.md)"))]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels' registers and shared memory: GPU only")
@pytest.mark.parametrize("group_size, ranks, kv_heads, latent_format, latent_layout", RESIDENCY_CASES)
def test_decode_programs_fit_a_multiprocessor_as_planned(group_size, ranks, kv_heads, latent_format,
                                                         latent_layout):
    """The wave model's slots (LayerPlan.decode_slots) are the programs a multiprocessor really holds: by the
    compiled decode kernel's registers (within the plan's cap) and its shared memory with the 1 KiB a block
    reserves, whichever binds."""
    rank_k, rank_v = ranks
    shape = Shape([300, 17], [1, 1], 32, kv_heads, group_size, 128, rank_k, rank_v, 16)
    shape = shape if latent_layout == "split" else shared(shape)
    if latent_format == "auto":
        case = make_case(shape, torch.bfloat16, seed=4)
    else:
        case = quantized_case(shape, latent_format, torch.bfloat16, seed=4)[0]
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, 32, shape.rank_v, case["scale"],
                          latent_format, latent_layout=latent_layout)
    out = torch.empty(2, 32, shape.rank_v, dtype=case["query"].dtype, device=DEVICE)
    scratch = ops.decode_scratch(32, shape.rank_v, kv_heads, [1], DEVICE)
    compiled = ops.decode_attention(plan, case["query"], case["kv_cache"], case["query_start_loc"],
                                    case["seq_lens"], case["block_table"], out, 2, 1, scratch)
    properties = torch.cuda.get_device_properties(DEVICE)
    registers_per_sm = getattr(properties, "regs_per_multiprocessor", ops.REGISTERS_PER_SM)
    shared_per_sm = getattr(properties, "shared_memory_per_multiprocessor", 228 * 1024)
    warps = plan.decode["num_warps"]
    assert compiled.n_regs <= (plan.decode["maxnreg"] or ops.DECODE_REGISTERS)
    per_warp = -(-compiled.n_regs * 32 // ops.REGISTER_UNIT) * ops.REGISTER_UNIT
    by_registers = registers_per_sm // (per_warp * warps)
    by_shared = shared_per_sm // (compiled.metadata.shared + 1024)
    assert min(by_registers, by_shared) == plan.decode_slots // plan.multiprocessors, (by_registers, by_shared)


def test_split_counts_of_the_measured_batches():
    """H200, groups of 2, four-warp tiles (2 programs a multiprocessor, 4 programs a request): the split counts the
    kernel tune measured fastest, and the model's times of every count measured within 1% of the timings, up to one
    scale per shape (docs/KERNEL_NOTES.md "Split counts of padded batches"). The fixed work is ~100 keys, which the
    model counts as a share of a 5K context: at 32K it is 1/328 of a context."""
    slots = 2 * 132
    assert ops.decode_splits(86, 4, slots) == 3  # 1 / 2 / 3 / 4 / 6 splits: 480 / 383 / 355 / 395 / 374 us
    assert ops.decode_splits(16, 4, slots) == 4  # 16 splits: 426 us, 4: 410
    measured = {(86, 5120): {1: 480, 2: 383, 3: 355, 4: 395, 6: 374}, (16, 32768): {4: 410, 16: 426}}
    for (requests, context), timings in measured.items():
        with_fixed_work = {s: model_time(requests, 4, slots, s) / (Fraction(1, s) + ops.DECODE_PROGRAM_COST)
                           * (Fraction(1, s) + ops.DECODE_PROGRAM_COST * 5120 / context) for s in timings}
        scale = sum(timings.values()) / sum(with_fixed_work.values())
        assert all(abs(float(with_fixed_work[s] * scale) / us - 1) < 0.01 for s, us in timings.items()), timings


class LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's grid and arguments instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("latent_layout", ["split", "shared"])
@pytest.mark.parametrize("latent_format", ["auto", "fp8", "int4"])
def test_launchers_read_no_device_tensor(monkeypatch, latent_format, latent_layout):
    """A launcher decides everything from the plan and host-side sizes: run it on "meta" tensors (any read of a
    value raises) with the kernels recorded instead of launched. This is what lets decode run inside CUDA graphs
    and keeps host time per call low. The decode grid depends on the batch size, never on context lengths."""
    kernels = {name: LaunchRecorder() for name in ("write_latents_kernel", "write_quantized_latents_kernel",
                                                  "decode_attention_kernel", "rebuild_context_kernel",
                                                  "prefill_attention_kernel")}
    launches = {name: launch for name, launch in vars(ops).items() if isinstance(launch, CompiledLaunch)}
    assert {launch.kernel.__name__ for launch in launches.values()} == set(kernels)
    for name, launch in launches.items():  # the launchers' launch objects, recording instead of running
        monkeypatch.setattr(ops, name, CompiledLaunch(kernels[launch.kernel.__name__]))
    rank_v = 24 if latent_layout == "split" else 16
    case = make_case(Shape([40, 70, 9], [1, 1, 9], 4, 2, 1, 32, 16, 24, 16), torch.float32, seed=13)
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], False, 4, rank_v, 0.2, latent_format,
                          KernelConfig(decode_registers=208), latent_layout=latent_layout)
    row = row_bytes(16, rank_v, latent_format, 1, latent_layout)  # values for auto
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    cache = meta(20, 2, 16, row, dtype=torch.float32 if latent_format == "auto" else torch.uint8)
    query, out = meta(11, 4, 32), meta(11, 4, rank_v)
    qsl, seq_lens = meta(4, dtype=torch.int32), meta(3, dtype=torch.int32)
    table, slots = meta(3, 8, dtype=torch.int32), meta(11, dtype=torch.int64)
    ops.write_latents(cache, slots, meta(11, 2, 16), meta(11, 2, rank_v), latent_format, 11, latent_layout)
    ops.decode_attention(plan, query, cache, qsl, seq_lens, table, out, 2, 4,
                         ops.DecodeScratch(meta(2 * 4 * 4 * 32), meta(64), meta(4, dtype=torch.int32)))
    ops.prefill_attention(plan, query, cache, qsl, seq_lens, table, out, ops.PrefillBatch(2, 1, 2, 9, 291))
    decode_grid, _, decode_options = kernels["decode_attention_kernel"].launches[0]
    assert decode_grid == (2, 2, 4)  # the splits combine inside it: one launch
    # The plan's launch options reach the launch as the JIT takes them (the register cap as maxnreg).
    assert decode_options["maxnreg"] == 208
    assert (decode_options["num_warps"], decode_options["num_stages"]) == (plan.decode["num_warps"],
                                                                         plan.decode["num_stages"])
    assert len(kernels["prefill_attention_kernel"].launches) == len(kernels["rebuild_context_kernel"].launches)
    write = kernels["write_latents_kernel" if latent_format == "auto" else "write_quantized_latents_kernel"]
    assert write.launches[0][2]["SHARED"] == (latent_layout == "shared")
    for name in ("decode_attention_kernel", "rebuild_context_kernel"):  # where V sits: the plan's constexprs
        constexprs = kernels[name].launches[0][2]
        assert (constexprs["V_OFFSET"], constexprs["V_SCALE"]) == (plan.ranks["V_OFFSET"], plan.ranks["V_SCALE"])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels: GPU only (the interpreter has none)")
@pytest.mark.parametrize("latent_format", ["auto", "fp8"])
def test_launches_after_the_first_skip_the_jit(monkeypatch, latent_format):
    """What serving launches after warm-up are the compiled kernels themselves (vllm_palu/attention/launch.py):
    a step with new queries, contexts, block tables and outputs must not reach Triton's JIT (its run raises here)
    and still equals the reference, on every launcher: cache write, decode with splits, rebuild, prefill."""
    shape = Shape([300, 700, 90], [1, 1, 20], 8, 4, 2, 64, 48, 80, 16)

    def step(seed):
        case = oracle = make_case(shape, DTYPES[0], seed=seed)
        if latent_format != "auto":
            case, oracle = quantized_case(shape, latent_format, DTYPES[0], seed=seed)
        new_k, new_v = case["query"].new_ones(20, 2, 48), case["query"].new_ones(20, 2, 80)
        pages = torch.zeros_like(case["kv_cache"])  # a cache of its own: the case's stays as the oracle has it
        ops.write_latents(pages, torch.arange(20, device=DEVICE), new_k, new_v, latent_format)
        assert pages.any()  # (what lands where: test_write_latents_scatters_by_slot, ..._quantizes_rows)
        check(case, oracle, latent_format=latent_format, num_decodes=2, num_decode_tokens=2, num_splits=4)

    step(seed=1)  # through the JIT: compiles, then caches each compiled kernel by its specialization
    for launch in (value for value in vars(ops).values() if isinstance(value, CompiledLaunch)):
        def refuse(*args, _name=launch.kernel.__name__, **kwargs):
            raise AssertionError(f"{_name} went through Triton's JIT again")
        monkeypatch.setattr(launch.kernel, "run", refuse)
    step(seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("latent_layout", ["split", "shared"])
@pytest.mark.parametrize("latent_format", ["auto", "fp8", "int4"])
def test_decode_replays_in_a_cuda_graph_with_new_lengths(latent_format, latent_layout):
    """The decode step (the decode kernel with the batch size's split count and persistent scratch, the splits
    combined by the last to arrive), captured once and replayed after the metadata buffers change in place (other
    contexts, other blocks, new queries): each split's range comes from seq_lens on the device, so replays equal the
    reference, and every replay leaves the arrival counts at zero for the next."""
    shape = Shape([3000, 17, 900], [1, 1, 1], 32, 8, 1, 128, 48, 80, 16)
    shape = shape if latent_layout == "split" else shared(shape._replace(rank_k=128))
    rank_v = shape.rank_v
    longer_shape = shape._replace(seq_lens=[2000, 2900, 5])
    if latent_format == "auto":
        case, longer = make_case(shape, torch.bfloat16, seed=9), make_case(longer_shape, torch.bfloat16, seed=10)
    else:
        case, longer = (quantized_case(s, latent_format, torch.bfloat16, seed=seed)[0]
                        for s, seed in ((shape, 9), (longer_shape, 10)))
    static = {name: value.clone() if torch.is_tensor(value) else value for name, value in case.items()}
    static["kv_cache"] = torch.cat([case["kv_cache"], longer["kv_cache"]])  # room for both cases' blocks
    static["cos_sin_cache"] = rope_cache(4096, 128).to(DEVICE)
    static["block_table"] = torch.zeros(3, 256, dtype=torch.int32, device=DEVICE)
    static["block_table"][:, :case["block_table"].shape[1]] = case["block_table"]
    plan = ops.plan_layer(static["k_up"], None, static["cos_sin_cache"], True, 32, rank_v, static["scale"],
                          latent_format, latent_layout=latent_layout)
    splits = plan.decode_splits(3)
    scratch = ops.decode_scratch(32, rank_v, 8, [1] + [plan.decode_splits(b) for b in (1, 2, 3)], DEVICE)
    assert splits > 1
    out = torch.empty(3, 32, rank_v, dtype=torch.bfloat16, device=DEVICE)

    def launch():
        ops.decode_attention(plan, static["query"], static["kv_cache"], static["query_start_loc"],
                             static["seq_lens"], static["block_table"], out, 3, splits, scratch)

    launch()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    offset = case["kv_cache"].shape[0]
    static["block_table"].zero_()
    static["block_table"][:, :longer["block_table"].shape[1]] = longer["block_table"] + offset
    static["seq_lens"].copy_(longer["seq_lens"])
    static["query"].copy_(longer["query"])
    expected = reference.paged_latent_attention(**static, is_neox_style=True, latent_format=latent_format)
    for _ in range(2):
        out.zero_()
        graph.replay()
        assert float((out.float() - expected).norm() / expected.norm()) < TOLERANCE[torch.bfloat16]
        assert not scratch.arrivals.any()


FLASH_PREFILL = [  # GPU only: shapes vLLM's FlashAttention runs
    Shape([4096, 3000, 700], [512, 7, 700], 32, 8, 1, 128, 40, 88, 16),   # Llama-3-8B kv 0.5 per head, chunked
    Shape([4096, 3000, 700], [512, 7, 700], 32, 8, 2, 128, 80, 176, 16),  # groups of 2: V rank 176, width 192
    Shape([2048, 9, 300], [1, 9, 300], 16, 4, 1, 64, 24, 40, 32),         # head dim 64, a decode first
    Shape([4096, 3000, 700], [512, 7, 700], 32, 8, 1, 128, 96, 96, 16, "shared"),  # one shared latent per head
]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="vLLM's FlashAttention: GPU only")
@pytest.mark.parametrize("workspace_tokens", [65536, 1024])  # one prefix window, then several
@pytest.mark.parametrize("shape", FLASH_PREFILL)
def test_flash_prefill_matches_reference(shape, workspace_tokens):
    """The serving prefill path on GPUs: the rebuilt context under vLLM's FlashAttention, new tokens causal and
    prefix windows merged by log-sum-exp, against the fp32 oracle (fresh inputs, poisoned output)."""
    flash_prefill = pytest.importorskip("vllm_palu.attention.flash_prefill")
    case = make_case(shape, torch.bfloat16, seed=15)
    plan = ops.plan_layer(case["k_up"], None, case["cos_sin_cache"], True, shape.heads, shape.rank_v, case["scale"])
    flash = flash_prefill.FlashPrefill.for_plan(plan)
    if flash is None:
        pytest.skip("this vLLM has no FlashAttention for the shape")
    check(case, config=KernelConfig(prefill_workspace_tokens=workspace_tokens), prefill=flash)
