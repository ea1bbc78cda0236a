"""Kernel benchmark cases: a shape, its inputs, its roofline floor, and a Palu call planned once (as the backend
plans a layer) and checked against the fp32 reference before anything is timed.

The floor is ``max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s)``: the H200's measured copy bandwidth and bf16 matrix
rate; Palu's FLOPs include rebuilding the keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from vllm_palu.attention import ops, reference
from vllm_palu.attention.flash_prefill import FlashPrefill
from vllm_palu.attention.latent_quant import dequantize_rows, pages_to_rows, quantize_rows, row_bytes, rows_to_pages
from vllm_palu.attention.ops import KernelConfig

BANDWIDTH = 4.3e12  # bytes/s, measured device copy on the H200
MATMUL = 790e12  # bf16 FLOP/s, measured
LATENTS = ("auto", "fp8", "int4")


@dataclass
class Case:
    model: str
    heads: int
    kv_heads: int
    head_dim: int
    kv_ratio: float
    group_size: int
    batch: int
    context: int
    query_len: int = 1
    k_fraction: float = 0.3125
    latent_layout: str = "split"  # or "shared": one latent of the split row's width, both K and V
    # K rank rounded to this (half up): 16 gives tile-exact ranks (Llama-3-8B kv 0.5: 48 / 80); 8 the converter's
    # default --rank-multiple, i.e. the served benchmark's checkpoints (40 / 88, which the kernel pads to 48 / 96).
    rank_multiple: int = 16

    @property
    def ranks(self) -> tuple[int, int]:
        width = self.group_size * self.head_dim
        total = self.kv_ratio * 2 * width
        if self.latent_layout == "shared":
            return int(total), int(total)
        multiple = self.rank_multiple
        rank_k = max(multiple, int(total * self.k_fraction / multiple + 0.5) * multiple)
        return rank_k, int(total - rank_k)

    @property
    def name(self) -> str:
        layout = " shared" if self.latent_layout == "shared" else ""
        ranks = "" if self.rank_multiple == 16 else " ranks {}/{}".format(*self.ranks)
        return (f"{self.model} kv {self.kv_ratio} gs {self.group_size}{layout} b{self.batch} "
                f"{self.context // 1024}K{ranks}")

    def palu_bytes(self, latent: str = "auto") -> float:
        rank_k, rank_v = self.ranks
        groups = self.kv_heads // self.group_size
        cached = self.batch * self.context * groups * row_bytes(rank_k, rank_v, latent,
                                                                latent_layout=self.latent_layout)
        up = self.kv_heads * self.head_dim * rank_k * 2
        return cached + up + 2 * self.batch * self.query_len * self.heads * (self.head_dim + rank_v) * 2

    def palu_flops(self) -> float:
        rank_k, rank_v = self.ranks
        tokens = self.batch * self.context
        rebuild = 2 * tokens * self.kv_heads * self.head_dim * rank_k
        attend = 2 * tokens * self.heads * self.query_len * (self.head_dim + rank_v)
        return rebuild + attend

    def dense_bytes(self) -> float:
        return self.batch * self.context * self.kv_heads * self.head_dim * 2 * 2

    def dense_flops(self) -> float:
        return 4 * self.batch * self.context * self.heads * self.query_len * self.head_dim


def floor_us(nbytes: float, flops: float) -> float:
    return max(nbytes / BANDWIDTH, flops / MATMUL) * 1e6


def build_inputs(case: Case, dtype, device, latent: str = "auto") -> dict:
    """The arguments of ``ops.paged_latent_attention`` for ``case``: a paged latent cache in a shuffled block
    order, random queries and up-projection, a Llama-3 rotary table in the model dtype (as vLLM holds it)."""
    rank_k, rank_v = case.ranks
    groups = case.kv_heads // case.group_size
    block_size = 16
    blocks_per_seq = case.context // block_size
    generator = torch.Generator(device=device).manual_seed(0)
    layout = case.latent_layout
    row = rank_k if layout == "shared" else rank_k + rank_v
    cache = torch.randn(case.batch * blocks_per_seq, groups, block_size, row, device=device, dtype=dtype,
                        generator=generator)
    if latent != "auto":  # the same latents as fp8/int4 rows (quantized in slices: bounded temporaries)
        cache = torch.cat([rows_to_pages(quantize_rows(part[..., :rank_k], part[..., rank_k:], latent, layout),
                                         rank_k, latent, layout) for part in cache.split(4096)])
    block_table = torch.randperm(case.batch * blocks_per_seq, device=device, generator=generator
                                 ).view(case.batch, blocks_per_seq).to(torch.int32)
    query = torch.randn(case.batch * case.query_len, case.heads, case.head_dim, device=device, dtype=dtype,
                        generator=generator)
    k_up = (torch.randn(groups, case.group_size * case.head_dim, rank_k, device=device, dtype=torch.float32,
                        generator=generator) / math.sqrt(rank_k)).to(dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, case.head_dim, 2, device=device) / case.head_dim)
    angles = torch.arange(case.context, device=device)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
    query_start = torch.arange(case.batch + 1, device=device, dtype=torch.int32) * case.query_len
    seq_lens = torch.full((case.batch,), case.context, device=device, dtype=torch.int32)
    return dict(query=query, kv_cache=cache, k_up=k_up, k_bias=None, cos_sin_cache=cos_sin, is_neox_style=True,
                query_start_loc=query_start, seq_lens=seq_lens, block_table=block_table,
                scale=case.head_dim ** -0.5, latent_format=latent, latent_layout=layout)


def plan_case(case: Case, inputs: dict, config: KernelConfig = KernelConfig()) -> ops.LayerPlan:
    """The layer plan serving would make for ``case``'s ``inputs`` under ``config``."""
    return ops.plan_layer(inputs["k_up"], None, inputs["cos_sin_cache"], True, case.heads, case.ranks[1],
                          inputs["scale"], inputs["latent_format"], config, inputs["latent_layout"])


def palu_call(case: Case, inputs: dict, config: KernelConfig = KernelConfig(), num_splits: int | None = None):
    """``(call, out)``: a zero-argument call of the Palu kernels on ``inputs`` as serving runs them (the layer
    planned once, the split count of the batch size, scratch allocated once; decode for one-token queries, else the
    prefill path), and the output it writes."""
    rank_v = case.ranks[1]
    plan = plan_case(case, inputs, config)
    out = inputs["query"].new_empty(inputs["query"].shape[0], case.heads, rank_v)
    args = (plan, inputs["query"], inputs["kv_cache"], inputs["query_start_loc"], inputs["seq_lens"],
            inputs["block_table"], out)
    if case.query_len > 1:  # the prefill path serving takes: vLLM's FlashAttention where it runs
        prefill = FlashPrefill.for_plan(plan) or ops.prefill_attention
        batch = ops.PrefillBatch(0, case.batch, 0, case.query_len, case.context - case.query_len)
        return (lambda: prefill(*args, batch)), out
    splits = num_splits or plan.decode_splits(case.batch)
    scratch = ops.DecodeScratch.allocate(case.batch * splits, case.heads, rank_v, case.batch * plan.kv_heads,
                                         out.device)
    return (lambda: ops.decode_attention(*args, case.batch, splits, scratch)), out


def refcheck(case: Case, device, latent: str = "auto", config: KernelConfig = KernelConfig(),
             num_splits: int | None = None) -> float:
    """Relative error of the bf16 kernels vs the fp32 reference (on the dequantized latents), on a cut-down copy
    of the case, called exactly as the benchmark times them (:func:`palu_call`)."""
    small = Case(**{**asdict(case), "batch": min(case.batch, 2), "context": min(case.context, 4096)})
    inputs = build_inputs(small, torch.bfloat16, device, latent)
    oracle = dict(inputs, latent_format="auto")
    if latent != "auto":
        rows = pages_to_rows(inputs["kv_cache"], small.ranks[0], latent, small.latent_layout)
        latents = dequantize_rows(rows, *small.ranks, latent, small.latent_layout)
        oracle["kv_cache"] = latents[0] if small.latent_layout == "shared" else torch.cat(latents, dim=-1)
    expected = reference.paged_latent_attention(**oracle)
    call, out = palu_call(small, inputs, config, num_splits)
    out.fill_(float("nan"))
    call()
    return float((out.float() - expected).norm() / expected.norm())
