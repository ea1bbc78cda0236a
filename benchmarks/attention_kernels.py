"""Kernel benchmark: Palu's paged latent attention vs dense attention on identical shapes, on an NVIDIA GPU without
vLLM (a diagnostic: the product's numbers are the served model's, benchmarks/serve.py).

    python -m benchmarks.attention_kernels kernels [--quick] [--out DIR]  every case: JSON, markdown, PNG
    python -m benchmarks.attention_kernels headline [--repeats 6]  the headline shape, Palu and dense alternating
    python -m benchmarks.attention_kernels tune [--deadline S]     tile / warp / stage / heads-per-program variants

Per case: median time (CUDA events, ``triton.testing.do_bench``), effective bandwidth, the roofline floor
(benchmarks/kernel_cases.py) and the SM clock of each timing (benchmarks/gpu_clock.py). Every Palu configuration is
checked against the fp32 reference before it is timed. Baselines: torch SDPA with the flash and cuDNN backends on
contiguous K/V, the public Palu approach (rebuild all keys, then attend), and FlashInfer's paged decode with bf16 and
fp8 pages where FlashInfer is importable (benchmarks/flashinfer_decode.py). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import flashinfer_decode
from benchmarks.gpu_clock import ClockMonitor, timed_with_clock
from benchmarks.kernel_cases import LATENTS, Case, build_inputs, floor_us, palu_call, plan_case, refcheck
from vllm_palu.attention.ops import KernelConfig


def headline(device, repeats: int, out_dir: Path) -> list[dict] | None:
    """Llama-3-8B kv 0.5 gs 1, batch 16, 32K context: Palu (bf16, fp8, int4 latents) and flash / cuDNN SDPA
    timed in alternation ``repeats`` times, each timing with its SM clock; prints and writes each round's
    speed-ups over the best dense time of the same round. None (nothing timed) if a kernel fails its reference
    check."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
    errors = {latent: refcheck(case, device, latent) for latent in LATENTS}
    if not max(errors.values()) < 2e-2:
        print(f"error: refcheck failed for {case}: relative errors {errors}", file=sys.stderr)
        return None
    inputs = {latent: build_inputs(case, torch.bfloat16, device, latent) for latent in LATENTS}
    q = torch.randn(case.batch, case.heads, 1, case.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(case.batch, case.kv_heads, case.context, case.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def palu(latent):
        return palu_call(case, inputs[latent])[0]

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run

    kernels = {"palu": palu("auto"), "palu_fp8": palu("fp8"), "palu_int4": palu("int4"),
               "flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    rounds = []
    with ClockMonitor() as monitor:
        for index in range(repeats):
            timings = {name: timed_with_clock(fn, monitor) for name, fn in kernels.items()}
            best_dense = min(timings["flash"]["us"], timings["cudnn"]["us"])
            rounds.append({"round": index, **timings,
                           **{f"speedup{name[4:]}": best_dense / timings[name]["us"]
                              for name in ("palu", "palu_fp8", "palu_int4")}})
            mhz = lambda t: f"{t['sm_mhz']:.0f} MHz" if "sm_mhz" in t else "clock n/a"  # noqa: E731
            print(f"round {index}: palu {timings['palu']['us']:.0f} us ({mhz(timings['palu'])}), "
                  f"cudnn {timings['cudnn']['us']:.0f} us ({mhz(timings['cudnn'])}), flash "
                  f"{timings['flash']['us']:.0f} us: {rounds[-1]['speedup']:.2f}x; fp8 "
                  f"{rounds[-1]['speedup_fp8']:.2f}x, int4 {rounds[-1]['speedup_int4']:.2f}x", flush=True)
    floor = floor_us(case.palu_bytes(), case.palu_flops())
    speedups = [r["speedup"] for r in rounds]
    print(f"bf16 latents: median {statistics.median(speedups):.2f}x (range {min(speedups):.2f}-{max(speedups):.2f}x) "
          f"the best dense decode; median {statistics.median(floor / r['palu']['us'] for r in rounds):.0%} of the "
          f"{floor:.0f} us floor")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "headline.json").write_text(json.dumps({"case": asdict(case), "floor_us": floor,
                                                       "refcheck_error": errors, "rounds": rounds}, indent=1))
    plot_headline(rounds, out_dir / "headline.png")
    return rounds


def plot_headline(rounds: list[dict], path: Path) -> None:
    """Time against the SM clock of each timing: Palu's points fall as the clock rises, dense decode stays flat."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("palu", "Palu bf16 latents"), ("palu_fp8", "Palu fp8 latents"),
                        ("palu_int4", "Palu int4 latents"), ("flash", "flash SDPA"), ("cudnn", "cuDNN SDPA")):
        points = [(r[name]["sm_mhz"], r[name]["us"]) for r in rounds if "sm_mhz" in r[name]]
        if points:
            ax.scatter(*zip(*points), label=label, s=18)
    ax.set_xlabel("median SM clock during the timing (MHz)")
    ax.set_ylabel("µs per layer (Llama-3-8B kv 0.5, b16, 32K)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def time_case(case: Case, device, monitor: ClockMonitor | None = None) -> dict:
    row = {**asdict(case), "rank_k": case.ranks[0], "rank_v": case.ranks[1],
           "dense_floor_us": floor_us(case.dense_bytes(), case.dense_flops())}
    for latent in LATENTS if case.query_len == 1 else ("auto",):
        inputs = build_inputs(case, torch.bfloat16, device, latent)
        timing = timed_with_clock(palu_call(case, inputs)[0], monitor or ClockMonitor())
        us = timing["us"]
        suffix = "" if latent == "auto" else f"_{latent}"
        row[f"palu{suffix}_us"] = us
        row[f"palu{suffix}_sm_mhz"] = timing.get("sm_mhz")
        row[f"palu{suffix}_floor_us"] = floor_us(case.palu_bytes(latent), case.palu_flops())
        row[f"palu{suffix}_roofline_fraction"] = row[f"palu{suffix}_floor_us"] / us
        row[f"palu{suffix}_bandwidth_tbs"] = case.palu_bytes(latent) / us / 1e6
        del inputs

    row.update(dense_us(case, device, monitor))
    if case.query_len == 1:
        if case.group_size == 1:
            row["palu_unfused_us"] = unfused_palu_us(case, device)
        row.update(flashinfer_decode.decode_us(case, device))
    # Best dense bf16 decode: flash, cuDNN, or FlashInfer with bf16 pages (fp8 pages are a separate column).
    dense = [row[key] for key in ("flash_us", "cudnn_us", "flashinfer_us") if row.get(key)]
    row["best_dense_us"] = min(dense) if dense else None
    for suffix in ("", "_fp8", "_int4"):
        if f"palu{suffix}_us" in row:
            row[f"speedup{suffix}_vs_best_dense"] = row["best_dense_us"] / row[f"palu{suffix}_us"] if dense else None
    return row


def dense_us(case: Case, device, monitor: ClockMonitor | None = None) -> dict:
    """Dense attention of the case's shape on contiguous bf16 K/V: torch SDPA's flash and cuDNN backends."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    row = {}
    q = torch.randn(case.batch, case.heads, case.query_len, case.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(case.batch, case.kv_heads, case.context, case.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    # A prefill chunk sits at the end of its context: causal, aligned bottom-right.
    mask = causal_lower_right(case.query_len, case.context) if case.query_len > 1 else None
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                timing = timed_with_clock(lambda: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, enable_gqa=True), monitor or ClockMonitor())
                row[f"{name}_us"] = timing["us"]
                row[f"{name}_sm_mhz"] = timing.get("sm_mhz")
        except RuntimeError as error:
            row[f"{name}_us"] = None
            row[f"{name}_error"] = str(error).splitlines()[0][:120]
    del q, k, v
    torch.cuda.empty_cache()
    return row


def unfused_palu_us(case: Case, device) -> float:
    """The public Palu code's way (groups of one head): rebuild every key from contiguous latents, rotate, then
    SDPA with V latents as values. Full keys are materialized each step, so it moves more bytes than dense."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    rank_k, rank_v = case.ranks
    shape = (case.batch, case.kv_heads, case.context)
    k_latent = torch.randn(*shape, rank_k, device=device, dtype=torch.bfloat16)
    v_latent = torch.randn(*shape, rank_v, device=device, dtype=torch.bfloat16)
    k_up = torch.randn(case.kv_heads, rank_k, case.head_dim, device=device, dtype=torch.bfloat16) / rank_k ** 0.5
    angles = torch.arange(case.context, device=device)[:, None] * torch.rand(case.head_dim // 2, device=device)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    query = torch.randn(case.batch, case.heads, 1, case.head_dim, device=device, dtype=torch.bfloat16)

    def attend():
        keys = torch.einsum("bhsr,hrd->bhsd", k_latent, k_up)
        first, second = keys.chunk(2, dim=-1)
        keys = keys * cos + torch.cat([-second, first], dim=-1) * sin
        return F.scaled_dot_product_attention(query, keys, v_latent, enable_gqa=True)

    us = do_bench(attend, return_mode="median") * 1e3
    del k_latent, v_latent
    torch.cuda.empty_cache()
    return us


# The accurate layouts (split with joint keys over groups of 2, Llama-2-7B's groups of 4; shared latents per head),
# batch 16 x 32K: the decode kernel's variants, each with the KV heads per program it can take. Groups of 4 and 8 at
# Llama-3-8B and shared latents over 2 heads were timed under triton 3.6 (docs/RESULTS.md): 0.07-0.40x dense, a
# structure away from the targets, so they are left out of the rounds.
TUNE_CASES = [Case("llama3-8b", 32, 8, 128, 0.5, 2, 16, 32768), Case("llama2-7b", 32, 32, 128, 0.5, 4, 16, 32768),
              Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768, latent_layout="shared")]
TUNE_TILES = [(64, 4, 2), (64, 4, 1), (32, 2, 2), (32, 4, 2), (16, 1, 3)]  # keys, warps, stages
TUNE_UP_BYTES = 64 * 1024  # heads per program whose up-projections exceed this cannot fit beside the tiles
# Split counts the wave model ranks equal to the builder's (fewer) at batch 16 x 32K, among them the count before it
# (a power of two filling 8 KV heads a multiprocessor: 16 at batch 16).
TUNE_SPLITS = [dict(num_splits=2), dict(num_splits=4), dict(num_splits=8), dict(num_splits=16)]
# Per head split, bf16 latents: the plan's default tile (registers capped: 9 programs a multiprocessor), at the
# builder's split count and TUNE_SPLITS, against the tile uncapped (8 programs) and capped at 192. Measured 12-04
# 18:40 (uncapped): 16 x 1 x 4 327 us, 32 x 2 x 3 507, against the default's 335 and 322 of the same SASS under
# another name (per head sums in fp16, so paired conversions change nothing): differences under ~4% are noise.
TUNE_BASELINE_CASE = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
TUNE_BASELINE_VARIANTS = [{}, *TUNE_SPLITS, dict(decode_registers=255), dict(decode_registers=192)]


# fp8 latents per head: today's dequantizing tiles against keys rebuilt on fp8 tensor cores (four-warp tiles
# reach fp8 wgmma, QGMMA.64x128x32 in benchmarks/compile_sm90.py --latent fp8 --fp8-mma --tiles 64:4:2).
TUNE_FP8_CASE = TUNE_BASELINE_CASE
# Dequantizing 32 x 2 tiles: no spill (164-168 registers against the 64 x 2 default's 255 and 24 B of stack), about
# the default's instructions per key (triton 3.8 SASS, compile_sm90 --latent fp8 --tiles 32:2:2,32:2:3).
TUNE_FP8_VARIANTS = [{}, dict(decode_block_n=64, decode_warps=4, decode_stages=2),
                     dict(decode_block_n=32, decode_warps=2, decode_stages=2),
                     dict(decode_block_n=32, decode_warps=2, decode_stages=3),
                     dict(fp8_mma=True, decode_block_n=64, decode_warps=4, decode_stages=2),
                     dict(fp8_mma=True, decode_block_n=128, decode_warps=4, decode_stages=2),
                     dict(fp8_mma=True, decode_block_n=64, decode_warps=4, decode_stages=3)]


# The served capacity run's decode steps (docs/RESULTS.md: 86 requests of 4-6K tokens, groups of 2): the builder's
# split count for an eager batch of 86 (3: ops.decode_splits, docs/KERNEL_NOTES.md) against others; in FULL CUDA
# graphs vLLM pads 86 requests to the graph of 128, whose count is 5 (2: the count before the wave model).
TUNE_SERVED_CASE = Case("llama3-8b", 32, 8, 128, 0.5, 2, 86, 5120)
TUNE_SERVED_VARIANTS = [{}, dict(num_splits=1), dict(num_splits=2), dict(num_splits=4), dict(num_splits=5),
                        dict(num_splits=6), dict(paired_cvt=False)]
# The served long decode per head (docs/RESULTS.md: 16 x 16.4K, 8 splits, 178 us a layer in serving; 167 here at
# 75% of its floor on 12-04 18:40, with ranks 48 / 80; its target needs ~5% off), at the served checkpoint's ranks
# (40 / 88: 451 SASS instructions a tile against 433) and at 48 / 80: the default (registers capped at 208: 9
# programs a multiprocessor) against the tile uncapped (8, the default until 2026-12-04 evening) and capped at 192
# (the same code), two stages at 192 (10 programs of 22,016 B, one tile in flight each: SASS 430 instructions, no
# spill), each at the builder's split count, and 16 x 1 x 4 (12-04 18:40: equal to 16 x 1 x 3 uncapped).
TUNE_LONG_CASE = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 16384, rank_multiple=8)
TUNE_LONG_TILE_EXACT_CASE = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 16384)
TUNE_LONG_VARIANTS = [{}, dict(decode_registers=255), dict(decode_registers=192), dict(num_splits=8),
                      dict(decode_block_n=16, decode_warps=1, decode_stages=2, decode_registers=192),
                      dict(decode_block_n=16, decode_warps=1, decode_stages=4)]


def tune_variants(case: Case) -> list[dict]:
    """The plan's default first, then each tile with each number of KV heads per program that can fit."""
    rank_k = case.ranks[0]
    heads = [h for h in range(case.group_size, 0, -1)
             if case.group_size % h == 0 and h * case.head_dim * rank_k * 2 <= TUNE_UP_BYTES] or [1]
    variants = [{}] + [dict(decode_block_n=n, decode_warps=w, decode_stages=st, decode_heads=h)
                       for h in heads for n, w, st in TUNE_TILES]
    # The default tiles with the other rebuild operands (bf16 as stored: version 4.3; fp16: converted, before it),
    # the other score dots (one over both rotary halves, or one per half) and the keys converted one at a time, as
    # triton emits it (version 4.5); the tune drops the one that is the default already; TUNE_SPLITS.
    choices = [dict(rebuild_dtype=torch.float16), dict(rebuild_dtype=torch.bfloat16), dict(join_halves=True),
               dict(join_halves=False), dict(paired_cvt=False), *TUNE_SPLITS]
    return variants[:1] + choices + variants[1:]


def tune(device, deadline: float, only: list[str] | None = None) -> list[dict]:
    """Time decode-kernel variants (tile, warps, stages, KV heads per program; split counts at the served shape) on
    TUNE_CASES, the per-head and fp8 baselines and TUNE_SERVED_CASE until ``deadline`` seconds have passed, in
    rounds (every case's plan default, then every case's next variant, ...) so that a deadline cuts each case
    alike; dense decode of each model shape and of the served shapes first. Prints each case's variants best
    first. Every variant is reference-checked first; one that does not compile or launch (shared memory) is
    recorded and skipped. ``only``: the cases whose names contain one of these (:func:`tune_runs`)."""
    import itertools
    import time

    start = time.monotonic()
    rows = []
    runs = tune_runs(only)
    with ClockMonitor() as monitor:  # each timing carries the SM clock it ran at
        dense_cases = {shape(case.name): case for case in (run[0][0] for run in runs)}  # dense decode of each shape
        for case in dense_cases.values():
            row = {"case": f"{case.model} dense b{case.batch} {case.context // 1024}K"}
            rows.append({**row, **dense_us(case, device, monitor)})
            print(json.dumps(rows[-1]), flush=True)
        inputs = {(case.name, latent): build_inputs(case, torch.bfloat16, device, latent)
                  for case, latent, _ in (run[0] for run in runs)}
        defaults = {}
        for case, latent, variant in (item for round_ in itertools.zip_longest(*runs) for item in round_ if item):
            if time.monotonic() - start > deadline:
                break
            splits = variant.get("num_splits")  # the builder's choice (plan.decode_splits) unless given
            config = KernelConfig(**{k: v for k, v in variant.items() if k != "num_splits"})
            plan = plan_case(case, inputs[case.name, latent], config)
            if variant and splits is None and plan.decode == defaults.get((case.name, latent)):
                continue  # the plan's default under another name
            builder_splits = plan.decode_splits(case.batch)
            if splits == builder_splits:
                continue  # the builder's split count: the default already
            defaults.setdefault((case.name, latent), plan.decode)
            name = case.name + ("" if latent == "auto" else f" {latent} latents")
            floor = floor_us(case.palu_bytes(latent), case.palu_flops())
            # fp8 tensor cores also round k_up to e4m3: 2-3% on these random inputs (tests/test_kernels.py).
            tolerance = 5e-2 if config.fp8_mma else 2e-2
            try:
                error = refcheck(case, device, latent, config, splits)
                if not error < tolerance:
                    raise AssertionError(f"reference check failed: relative error {error:.2e}")
                timing = timed_with_clock(palu_call(case, inputs[case.name, latent], config, splits)[0], monitor)
            except Exception as failure:  # noqa: BLE001 - out of resources etc.: record and go on
                rows.append({"case": name, **variant, "error": str(failure).splitlines()[0][:100]})
                print(json.dumps(rows[-1], default=str), flush=True)
                continue
            us = timing["us"]
            rows.append({"case": name, **(variant or {"default": True}), "us": us, "of_floor": floor / us,
                         "floor_us": floor, "refcheck_error": error, "splits": splits or builder_splits,
                         "sm_mhz": timing.get("sm_mhz")})
            print(json.dumps(rows[-1], default=str), flush=True)
    for name in dict.fromkeys(r["case"] for r in rows if "us" in r):
        timed = sorted((r for r in rows if r["case"] == name and "us" in r), key=lambda r: r["us"])
        for row in timed[:8]:
            variant = (f"plan default ({row['splits']} splits)" if row.get("default") else
                       "default tiles" if "decode_block_n" not in row else
                       f"N{row['decode_block_n']} w{row['decode_warps']} s{row['decode_stages']} "
                       f"heads {row.get('decode_heads', 1)}")
            variant += (" fp8 MMA" if row.get("fp8_mma") else "") + (
                f" rebuild {row['rebuild_dtype']}" if row.get("rebuild_dtype") else "") + (
                {True: " one score dot", False: " a score dot per half"}.get(row.get("join_halves"), "")) + (
                " unpaired cvt" if row.get("paired_cvt") is False else "") + (
                f" {row['decode_registers']} registers" if row.get("decode_registers") else "") + (
                f" {row['num_splits']} splits" if row.get("num_splits") else "")
            clock = f", {row['sm_mhz']:.0f} MHz" if row.get("sm_mhz") else ""
            print(f"{name}: {variant}: {row['us']:.0f} us ({row['of_floor']:.0%} of the {row['floor_us']:.0f} "
                  f"us floor{clock})")
    return rows


def tune_runs(only: list[str] | None = None) -> list[list[tuple[Case, str, dict]]]:
    """The tune's cases, each a list of (case, latent format, variant), its plan default first; ``only``: the cases
    whose names (with " fp8 latents" for the fp8 one) contain one of these strings."""
    runs = [[(case, "auto", v) for v in tune_variants(case)] for case in TUNE_CASES]
    runs.append([(TUNE_BASELINE_CASE, "auto", v) for v in TUNE_BASELINE_VARIANTS])
    runs.append([(TUNE_FP8_CASE, "fp8", v) for v in TUNE_FP8_VARIANTS])
    runs.append([(TUNE_SERVED_CASE, "auto", v) for v in TUNE_SERVED_VARIANTS])
    runs.append([(TUNE_LONG_CASE, "auto", v) for v in TUNE_LONG_VARIANTS])
    runs.append([(TUNE_LONG_TILE_EXACT_CASE, "auto", v) for v in TUNE_LONG_VARIANTS])
    if only:
        runs = [run for run in runs
                if any(part in run[0][0].name + ("" if run[0][1] == "auto" else " fp8 latents") for part in only)]
        if not runs:
            raise ValueError(f"no tune case matches {only}")
    return runs


def shape(name: str) -> str:
    """A tune row's model and batch x context (``llama3-8b b16 32K``): what a dense row and a Palu case share."""
    return f"{name.split(' ')[0]} {re.search(r'b[0-9]+ [0-9]+K', name).group()}"


def plot_tune(rows: list[dict], path: Path) -> None:
    """Each tuned case's plan default and best variant against its dense decode and its floor (µs, log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dense = {shape(row["case"]): min(row[k] for k in ("flash_us", "cudnn_us") if row.get(k))
             for row in rows if " dense " in row["case"]}
    cases = list(dict.fromkeys(row["case"] for row in rows if "us" in row))
    timed = {case: [row for row in rows if row["case"] == case and "us" in row] for case in cases}
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 2, 4.5))
    x = range(len(cases))
    defaults = [next((r["us"] for r in timed[c] if r.get("default")), float("nan")) for c in cases]
    best = [min(r["us"] for r in timed[c]) for c in cases]
    ax.bar([i - 0.3 for i in x], [dense.get(shape(c), float("nan")) for c in cases], 0.3,
           label="best dense (SDPA flash / cuDNN)")
    ax.bar(x, defaults, 0.3, label="Palu, plan default")
    ax.bar([i + 0.3 for i in x], best, 0.3, label="Palu, best variant")
    ax.scatter(list(x), [timed[c][0]["floor_us"] for c in cases], color="k", marker="_", s=300, label="Palu floor")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [c.replace(" b16 32K", "").replace(" latents", "") for c in cases], fontsize=7,
                  rotation=15)
    ax.set_ylabel("µs per layer (batch 16 x 32K unless named)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def default_cases() -> list[Case]:
    cases = []
    for model, heads, kv_heads in (("llama3-8b", 32, 8), ("llama2-7b", 32, 32)):
        for kv_ratio in (0.5, 0.25):
            for batch, context in ((1, 4096), (1, 16384), (1, 65536), (1, 131072), (16, 4096), (16, 16384),
                                   (16, 32768), (16, 65536), (64, 4096), (64, 16384)):
                if kv_heads == 32 and batch * context > 16 * 32768:
                    continue  # dense MHA K/V of that size does not fit beside the rest
                cases.append(Case(model, heads, kv_heads, 128, kv_ratio, 1, batch, context))
    cases += TUNE_CASES  # the accurate layouts: joint key groups, shared latents
    cases.append(Case("llama3-8b", 32, 8, 128, 0.5, 1, 1, 32768, query_len=2048))  # prefill chunks
    cases.append(Case("llama2-7b", 32, 32, 128, 0.5, 1, 1, 32768, query_len=2048))
    return cases


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | kv ratio | gs | batch | ctx | q | ranks k/v | best dense µs (flash / cudnn / flashinfer) | "
             "flashinfer fp8 KV µs | dense floor µs | palu bf16 µs (floor, of floor, speed-up) | fp8 latents | "
             "int4 latents | SM MHz palu / cudnn |", "|" + "---|" * 14]

    def palu(r: dict, suffix: str) -> str:
        if f"palu{suffix}_us" not in r:
            return "–"
        speedup = r.get(f"speedup{suffix}_vs_best_dense")
        return (f"{r[f'palu{suffix}_us']:.0f} ({r[f'palu{suffix}_floor_us']:.0f}, "
                f"{r[f'palu{suffix}_roofline_fraction']:.0%}, {'–' if speedup is None else f'{speedup:.2f}x'})")

    for r in rows:
        fmt = lambda x: "–" if x is None else f"{x:.0f}"  # noqa: E731
        shared = " shared" if r.get("latent_layout") == "shared" else ""
        lines.append(f"| {r['model']} | {r['kv_ratio']} | {r['group_size']}{shared} | {r['batch']} | {r['context']} | "
                     f"{r['query_len']} | {r['rank_k']}/{r['rank_v']} | {fmt(r['best_dense_us'])} "
                     f"({fmt(r['flash_us'])} / {fmt(r['cudnn_us'])} / {fmt(r.get('flashinfer_us'))}) | "
                     f"{fmt(r.get('flashinfer_fp8_us'))} | {r['dense_floor_us']:.0f} | {palu(r, '')} | "
                     f"{palu(r, '_fp8')} | {palu(r, '_int4')} | {fmt(r.get('palu_sm_mhz'))} / "
                     f"{fmt(r.get('cudnn_sm_mhz'))} |")
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(14, 5))
    labels = [f"{r['model']} r{r['kv_ratio']} gs{r['group_size']}{' sh' * (r.get('latent_layout') == 'shared')}"
              f"\nb{r['batch']} {r['context'] // 1024}K"
              + (f" q{r['query_len']}" if r["query_len"] > 1 else "") for r in rows]
    x = range(len(rows))
    series = [("best_dense_us", "best dense bf16 (flash / cuDNN / FlashInfer)"),
              ("flashinfer_fp8_us", "dense fp8 KV (FlashInfer)"), ("palu_us", "Palu bf16 latents"),
              ("palu_fp8_us", "Palu fp8 latents"), ("palu_int4_us", "Palu int4 latents")]
    series = [(key, label) for key, label in series if any(r.get(key) for r in rows)]
    width = 0.8 / len(series)
    for offset, (key, label) in enumerate(series):
        ax.bar([i - 0.4 + width * (offset + 0.5) for i in x], [r.get(key) or 0 for r in rows], width, label=label)
    ax.scatter(list(x), [r["palu_floor_us"] for r in rows], color="k", marker="_", s=200, label="Palu floor (bf16)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=6, rotation=90)
    ax.set_ylabel("µs per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "kernels.png", dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_kernels")
    parser.add_argument("what", choices=["kernels", "tune", "headline"])
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--quick", action="store_true", help="only the headline cases")
    parser.add_argument("--repeats", type=int, default=6, help="headline: rounds of alternating timings")
    parser.add_argument("--deadline", type=float, default=480, help="tune: seconds before no new variant starts")
    parser.add_argument("--cases", help="tune: only the cases whose names contain one of these (comma-separated, "
                        "e.g. 'gs 1 b16 16K,gs 2 b86')")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.what == "headline":
        return 0 if headline(device, args.repeats, args.out) is not None else 1
    if args.what == "tune":
        args.out.mkdir(parents=True, exist_ok=True)
        rows = tune(device, args.deadline, args.cases.split(",") if args.cases else None)
        (args.out / "tune.json").write_text(json.dumps(rows, indent=1, default=str))
        plot_tune(rows, args.out / "tune.png")
        return 0
    cases = default_cases()
    if args.quick:
        cases = [c for c in cases if c.context == 32768]
    rows = []
    with ClockMonitor() as monitor:
        for case in tqdm(cases, desc="kernel benchmark"):
            errors = {latent: refcheck(case, device, latent) for latent in LATENTS}
            if not max(errors.values()) < 2e-2:
                print(f"error: refcheck failed for {case}: relative errors {errors}", file=sys.stderr)
                return 1
            rows.append({**time_case(case, device, monitor), "refcheck_error": errors})
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "kernels.json").parent.mkdir(parents=True, exist_ok=True)
            (args.out / "kernels.json").write_text(json.dumps(rows, indent=1))  # partial results survive a timeout
    write_outputs(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
