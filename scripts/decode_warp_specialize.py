"""Experiment: Triton's automatic warp specialization (tl.range(..., warp_specialize=True)) on the decode loop.

    PYTHONPATH=. python scripts/decode_warp_specialize.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from triton.testing import do_bench

from scripts.kernel_anatomy import ablated_kernel
from vllm_palu.attention import ops
from vllm_palu.bench import Case, build_inputs, floor_us, refcheck


def rewritten_kernel(directory: Path, **range_options):
    """The decode kernel with its main KV loop (the full tiles) as ``tl.range(first, full_last, **range_options)``."""
    options = ", ".join(f"{key}={value}" for key, value in range_options.items())
    edit = ("for kv_tile in range(first, full_last):", f"for kv_tile in tl.range(first, full_last, {options}):")
    return ablated_kernel(options, [edit], directory)


def main() -> None:
    device = torch.device("cuda")
    case = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
    floor = floor_us(case.palu_bytes(), case.palu_flops())
    inputs = build_inputs(case, torch.bfloat16, device)
    original = ops.paged_latent_attention_kernel
    with tempfile.TemporaryDirectory() as tmp:
        for options in ({}, {"warp_specialize": True}, {"warp_specialize": True, "num_stages": 2},
                        {"loop_unroll_factor": 2}, {"flatten": True}):
            for tuning in ({}, {"num_warps": 4}, {"num_warps": 4, "block_n": 128}):
                try:
                    ops.paged_latent_attention_kernel = rewritten_kernel(Path(tmp), **options) if options else original
                    error = refcheck(case, device, "auto", tuning)
                    us = do_bench(lambda: ops.paged_latent_attention(**inputs, max_query_len=1,
                                                                     max_seq_len=case.context, tuning=dict(tuning)),
                                  return_mode="median") * 1e3
                    print(f"{options} {tuning}: {us:.1f} us {floor / us:.1%} of floor err {error:.1e} "
                          f"regs {ops.last_kernel.n_regs}", flush=True)
                except Exception as failure:  # noqa: BLE001
                    print(f"{options} {tuning}: failed {str(failure).splitlines()[0][:160]}", flush=True)
    ops.paged_latent_attention_kernel = original


if __name__ == "__main__":
    main()
