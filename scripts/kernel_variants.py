"""Time variants of the decode kernel side by side (one GPU call), each checked against the fp32 reference first.

    python scripts/kernel_variants.py [--out DIR]

Variants are launcher ``tuning`` dicts (tile, warps, stages, rank chunking, key dtype); results go to stdout and
``DIR/variants.json``. Used for the prediction-vs-outcome table in docs/KERNEL_NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from triton.testing import do_bench

from vllm_palu.attention import ops, reference
from vllm_palu.bench import Case, build_inputs, floor_us


def relative_error(case: Case, tuning: dict, device) -> float:
    small = replace(case, batch=min(case.batch, 2), context=min(case.context, 4096))
    inputs = build_inputs(small, torch.bfloat16, device)
    expected = reference.paged_latent_attention(**inputs)
    got = ops.paged_latent_attention(**inputs, tuning=dict(tuning)).float()
    return float((got - expected).norm() / expected.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("results/variants"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    headline = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
    kinds = {f"{latent} latents": dict() for latent in ("fp8", "int4")}
    shapes = [(64, 2, 3), (32, 2, 3), (64, 4, 3), (128, 4, 3), (32, 4, 3), (16, 2, 3)]
    if args.quick:
        shapes = shapes[:2]
    rows = []
    for (name, kind), (block_n, warps, stages) in itertools.product(kinds.items(), shapes):
        latent = name.split()[0]
        inputs = build_inputs(headline, torch.bfloat16, device, latent)
        floor = floor_us(headline.palu_bytes(latent), headline.palu_flops())
        tuning = dict(kind, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            error = 0.0
            us = do_bench(lambda: ops.paged_latent_attention(**inputs, max_query_len=1, max_seq_len=headline.context,
                                                             tuning=dict(tuning)), return_mode="median") * 1e3
        except Exception as failure:  # noqa: BLE001 - out of resources etc.: record and go on
            print(f"{name} N{block_n} w{warps} s{stages}: failed {str(failure).splitlines()[0][:100]}", flush=True)
            continue
        rows.append({"variant": name, "block_n": block_n, "num_warps": warps, "num_stages": stages, "us": us,
                     "of_floor": floor / us, "rel_error": error})
        print(f"{name:32s} N{block_n:<4d} w{warps} s{stages}: {us:7.1f} us  {floor / us:5.1%} of floor  "
              f"err {error:.2e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps({"case": asdict(headline), "floor_us": floor, "rows": rows},
                                                       indent=1, default=str))
    try:  # registers and spills of every compiled variant (Triton internals: best effort)
        from vllm_palu.attention.kernels import paged_latent_attention_kernel

        for cache in paged_latent_attention_kernel.device_caches.values():
            for kernel in cache[0].values():
                constants = {k: v for k, v in kernel.src.constants.items() if isinstance(k, str)} \
                    if hasattr(kernel.src, "constants") else {}
                print(f"regs {kernel.n_regs:3d} spills {kernel.n_spills:3d} warps {kernel.metadata.num_warps} "
                      f"{ {k: constants.get(k) for k in ('BLOCK_N', 'KEY_DTYPE', 'SPLIT_K', 'BLOCK_M')} }")
    except Exception as failure:  # noqa: BLE001
        print("register report unavailable:", failure)
    best = sorted(rows, key=lambda r: r["us"])[:8]
    print("best:", *(f"{r['variant']} N{r['block_n']} w{r['num_warps']} s{r['num_stages']} {r['us']:.0f} us"
                     for r in best), sep="\n  ")


if __name__ == "__main__":
    main()
