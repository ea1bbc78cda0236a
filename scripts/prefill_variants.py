"""Time the prefill path's tiles side by side with the fused kernel and dense SDPA (one GPU call), each variant
checked against the fp32 reference first.

    python scripts/prefill_variants.py [--quick]

Case: the benchmark's prefill chunk (2048 new tokens at the end of a 32K context, Llama-3-8B attention, kv-ratio
0.5). Tiles are the ``prefill_*`` keys of ``ops.paged_latent_attention``'s tuning. Used for docs/KERNEL_NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from vllm_palu.attention import ops
from vllm_palu.bench import Case, build_inputs, floor_us, refcheck

TILES = [  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2),
    (128, 64, 8, 4), (256, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2),
]
CASES = [Case("llama3-8b", 32, 8, 128, 0.5, 1, 1, 32768, query_len=2048),
         Case("llama2-7b", 32, 32, 128, 0.5, 1, 1, 32768, query_len=2048)]


def dense_us(case: Case, device) -> dict:
    q = torch.randn(case.batch, case.heads, case.query_len, case.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(case.batch, case.kv_heads, case.context, case.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(case.query_len, case.context)
    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                times[name] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                              enable_gqa=True),
                                       return_mode="median") * 1e3
        except RuntimeError as failure:
            print(f"  {name}: {str(failure).splitlines()[0][:100]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the first tiles only")
    args = parser.parse_args()
    device = torch.device("cuda")
    for case in CASES:
        floor = floor_us(case.palu_bytes(), case.palu_flops())
        dense = dense_us(case, device)
        print(f"{case.model} kv {case.kv_ratio} ranks {case.ranks} q {case.query_len} ctx {case.context}: "
              f"floor {floor:.0f} us, " + ", ".join(f"{k} {v:.0f} us" for k, v in dense.items()), flush=True)
        inputs = build_inputs(case, torch.bfloat16, device)
        variants = [("fused", {"prefill": "fused"})] + [
            (f"workspace M{m} N{n} w{w} s{s}", dict(prefill_block_m=m, prefill_block_n=n, prefill_warps=w,
                                                     prefill_stages=s))
            for m, n, w, s in (TILES[:3] if args.quick else TILES)]
        for name, tuning in variants:
            try:
                error = refcheck(case, device, "auto", tuning)
                us = do_bench(lambda: ops.paged_latent_attention(**inputs, max_query_len=case.query_len,
                                                                 max_seq_len=case.context, tuning=dict(tuning)),
                              return_mode="median") * 1e3
            except Exception as failure:  # noqa: BLE001 - out of resources etc.: record and go on
                print(f"  {name}: failed {str(failure).splitlines()[0][:100]}", flush=True)
                continue
            best = min(dense.values()) if dense else float("nan")
            print(f"  {name:32s} {us:8.1f} us  {best / us:5.2f}x best dense  {floor / us:5.1%} of floor  "
                  f"err {error:.1e}", flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
