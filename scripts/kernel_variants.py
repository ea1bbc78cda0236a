"""Time variants of the decode kernel side by side (one GPU call), each checked against the fp32 reference first.

    python scripts/kernel_variants.py [--out DIR] [--quick]

A variant is a latent format plus a launcher ``tuning`` dict (tile, warps, stages, rank chunking, key dtype, ...;
see ``ops.paged_latent_attention``); edit ``VARIANTS`` / ``TILES`` for the question at hand. Results go to stdout
and ``DIR/variants.json``; registers and ablations: scripts/kernel_anatomy.py. Used for the prediction-vs-outcome
table in docs/KERNEL_NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch
from triton.testing import do_bench

from vllm_palu.attention import ops
from vllm_palu.bench import Case, build_inputs, floor_us, refcheck

VARIANTS = {  # name: (latent format, tuning)
    "bf16 latents": ("auto", {}),
    "bf16 latents, rotary table per tile (v3.3)": ("auto", {"rope_shift": False}),
    "bf16 latents, padded ranks": ("auto", {"split_ranks": False}),
    "bf16 latents, fp32 rebuild accumulation": ("auto", {"acc_dtype": torch.float32}),
    "bf16 latents, 16-row query tile (v3)": ("auto", {"min_rows": 16}),
    "bf16 latents, 8-row query tile": ("auto", {"min_rows": 8}),
    "bf16 latents, 16 programs per SM": ("auto", {"programs_per_sm": 16}),
    "fp8 latents": ("fp8", {}),
    "fp8 latents, 16-row query tile (v3)": ("fp8", {"min_rows": 16}),
    "int4 latents": ("int4", {}),
}
TILES = [(16, 1, 3), (32, 1, 3), (64, 2, 3), (64, 2, 2), (128, 4, 3)]  # (block_n, num_warps, num_stages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("results/variants"))
    parser.add_argument("--quick", action="store_true", help="the default tile only")
    parser.add_argument("--only", help="variant names separated by ';' (default: all of VARIANTS)")
    parser.add_argument("--tiles", help="block_n:warps:stages,... instead of TILES")
    args = parser.parse_args()
    device = torch.device("cuda")
    headline = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
    rows = []
    variants = {name: spec for name, spec in VARIANTS.items() if args.only is None or name in args.only.split(";")}
    tiles = [tuple(map(int, tile.split(":"))) for tile in args.tiles.split(",")] if args.tiles else TILES
    for (name, (latent, kind)), (block_n, warps, stages) in itertools.product(variants.items(),
                                                                               tiles[:1] if args.quick else tiles):
        tuning = dict(kind, block_n=block_n, num_warps=warps, num_stages=stages)
        floor = floor_us(headline.palu_bytes(latent), headline.palu_flops())
        try:
            error = refcheck(headline, device, latent, tuning)
            inputs = build_inputs(headline, torch.bfloat16, device, latent)
            us = do_bench(lambda: ops.paged_latent_attention(**inputs, max_query_len=1, max_seq_len=headline.context,
                                                             tuning=dict(tuning)), return_mode="median") * 1e3
            del inputs
        except Exception as failure:  # noqa: BLE001 - out of resources etc.: record and go on
            print(f"{name} N{block_n} w{warps} s{stages}: failed {str(failure).splitlines()[0][:100]}", flush=True)
            continue
        rows.append({"variant": name, "latent": latent, "block_n": block_n, "num_warps": warps,
                     "num_stages": stages, "us": us, "floor_us": floor, "of_floor": floor / us, "rel_error": error})
        print(f"{name:40s} N{block_n:<4d} w{warps} s{stages}: {us:7.1f} us  {floor / us:5.1%} of floor  "
              f"err {error:.2e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps({"case": asdict(headline), "rows": rows}, indent=1,
                                                       default=str))
    print("best:", *(f"{r['variant']} N{r['block_n']} w{r['num_warps']} s{r['num_stages']} {r['us']:.0f} us"
                     for r in sorted(rows, key=lambda r: r["us"])[:8]), sep="\n  ")


if __name__ == "__main__":
    main()
