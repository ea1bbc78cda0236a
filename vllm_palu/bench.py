"""``python -m vllm_palu.bench kernels``: Palu's paged latent attention vs dense attention on identical shapes.

Runs on an NVIDIA GPU without vLLM. Per case: median time (CUDA events, ``triton.testing.do_bench``), effective
bandwidth, and the roofline floor ``max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s)`` (the H200's measured ceilings;
FLOPs include key reconstruction). Baselines: torch SDPA with the flash and cuDNN backends on contiguous K/V, and the
public Palu approach (rebuild all keys, then attend), and FlashInfer's paged decode with bf16 and fp8 pages where
FlashInfer is importable (``vllm_palu.bench_flashinfer``). Writes JSON, a markdown table and a PNG plot.

``python -m vllm_palu.bench headline --repeats 6``: the headline decode shape only, Palu and the dense kernels
timed in alternation with the SM clock sampled during each timing (``ClockMonitor``). The Palu decode kernels are
compute-bound and follow the SM clock, which the H200 lowers under its power cap, while memory-bound dense decode
does not slow down: a single pair of timings can land anywhere in that range, the alternation shows it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_palu import bench_flashinfer

BANDWIDTH = 4.3e12  # bytes/s, measured device copy on the H200
MATMUL = 790e12  # bf16 FLOP/s, measured


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

    @property
    def ranks(self) -> tuple[int, int]:
        width = self.group_size * self.head_dim
        total = self.kv_ratio * 2 * width
        rank_k = max(16, int(total * self.k_fraction / 16 + 0.5) * 16)
        return rank_k, int(total - rank_k)

    def palu_bytes(self, latent: str = "auto") -> float:
        from vllm_palu.attention.latent_quant import row_bytes

        rank_k, rank_v = self.ranks
        groups = self.kv_heads // self.group_size
        cached = self.batch * self.context * groups * row_bytes(rank_k, rank_v, latent)
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


def build_inputs(case: Case, dtype, device, latent: str = "auto"):
    import torch

    from vllm_palu.attention.latent_quant import quantize_rows, rows_to_pages

    rank_k, rank_v = case.ranks
    groups = case.kv_heads // case.group_size
    block_size = 16
    blocks_per_seq = case.context // block_size
    generator = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(case.batch * blocks_per_seq, groups, block_size, rank_k + rank_v, device=device,
                        dtype=dtype, generator=generator)
    if latent != "auto":  # the same latents as fp8/int4 rows (quantized in slices: bounded temporaries)
        cache = torch.cat([rows_to_pages(quantize_rows(part[..., :rank_k], part[..., rank_k:], latent), latent)
                           for part in cache.split(4096)])
    block_table = torch.randperm(case.batch * blocks_per_seq, device=device, generator=generator
                                 ).view(case.batch, blocks_per_seq).to(torch.int32)
    query = torch.randn(case.batch * case.query_len, case.heads, case.head_dim, device=device, dtype=dtype,
                        generator=generator)
    k_up = (torch.randn(groups, case.group_size * case.head_dim, rank_k, device=device, dtype=torch.float32,
                        generator=generator) / math.sqrt(rank_k)).to(dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, case.head_dim, 2, device=device) / case.head_dim)
    angles = torch.arange(case.context, device=device)[:, None] * inv_freq[None, :]
    # In serving, vLLM's rotary module casts its cos/sin table to the model dtype on first use: time that.
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
    query_start = torch.arange(case.batch + 1, device=device, dtype=torch.int32) * case.query_len
    seq_lens = torch.full((case.batch,), case.context, device=device, dtype=torch.int32)
    inputs = dict(query=query, kv_cache=cache, k_up=k_up, k_bias=None, cos_sin_cache=cos_sin, is_neox_style=True,
                  query_start_loc=query_start, seq_lens=seq_lens, block_table=block_table,
                  scale=case.head_dim ** -0.5)
    return inputs if latent == "auto" else dict(inputs, latent_dtype=latent)


LATENTS = ("auto", "fp8", "int4")


def refcheck(case: Case, device, latent: str = "auto", tuning: dict | None = None) -> float:
    """Relative error of the bf16 kernel vs the fp32 reference (on the dequantized latents) on a cut-down copy."""
    import torch

    from vllm_palu.attention import ops, reference
    from vllm_palu.attention.latent_quant import dequantize_rows, pages_to_rows

    small = Case(**{**asdict(case), "batch": min(case.batch, 2), "context": min(case.context, 4096)})
    inputs = build_inputs(small, torch.bfloat16, device, latent)
    oracle = dict(inputs)
    if latent != "auto":
        del oracle["latent_dtype"]
        rows = pages_to_rows(inputs["kv_cache"], latent)
        oracle["kv_cache"] = torch.cat(dequantize_rows(rows, *small.ranks, latent), dim=-1)
    expected = reference.paged_latent_attention(**oracle)
    got = ops.paged_latent_attention(**inputs, tuning=dict(tuning or {})).float()
    return float((got - expected).norm() / expected.norm())


SMI_QUERY = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
POWER_CAP_REASON = 0x4  # nvidia-smi's "SW power cap" throttle reason bit


def parse_smi_sample(line: str) -> tuple[float, float, float, int] | None:
    """One line of ``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits``: (unix time, SM MHz,
    watts, throttle reasons); None for lines that are not samples (errors, "[N/A]")."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1]), float(parts[2]), int(parts[3], 16)
    except ValueError:
        return None


class ClockMonitor:
    """SM clock and power sampled by nvidia-smi every ``period_ms`` in the background, for as long as the context
    is open; ``window(start, end)`` summarizes the samples taken between two ``time.time()`` stamps. Without
    nvidia-smi every summary is empty (the benchmark still runs)."""

    def __init__(self, period_ms: int = 50):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float, float, int]] = []
        self._process = None
        self._reader = None

    def __enter__(self) -> ClockMonitor:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits", "-lms",
                 str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            sample = parse_smi_sample(line)
            if sample is not None:
                self.samples.append(sample)

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._reader.join(timeout=1)

    def window(self, start: float, end: float) -> dict:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if not inside:
            return {}
        return {"sm_mhz": statistics.median(sample[1] for sample in inside),
                "watts": max(sample[2] for sample in inside),
                "power_capped": any(sample[3] & POWER_CAP_REASON for sample in inside)}


def timed_with_clock(fn, monitor: ClockMonitor) -> dict:
    """Median time of ``fn`` (do_bench) and the SM clock while it ran. nvidia-smi's samples arrive with a lag,
    so the window is read after a short wait."""
    from triton.testing import do_bench

    start = time.time()
    us = do_bench(fn, return_mode="median") * 1e3
    end = time.time()
    time.sleep(2.5 * monitor.period_ms / 1e3)
    return {"us": us, **monitor.window(start, end)}


def headline(device, repeats: int, out_dir: Path) -> list[dict] | None:
    """Llama-3-8B kv 0.5 gs 1, batch 16, 32K context: Palu (bf16, fp8, int4 latents) and flash / cuDNN SDPA
    timed in alternation ``repeats`` times, each timing with its SM clock; prints and writes each round's
    speed-ups over the best dense time of the same round. None (nothing timed) if a kernel fails its reference
    check."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vllm_palu.attention import ops

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
        return lambda: ops.paged_latent_attention(**inputs[latent], max_query_len=1, max_seq_len=case.context)

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
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from triton.testing import do_bench

    from vllm_palu.attention import ops

    row = {**asdict(case), "rank_k": case.ranks[0], "rank_v": case.ranks[1],
           "dense_floor_us": floor_us(case.dense_bytes(), case.dense_flops())}
    for latent in LATENTS if case.query_len == 1 else ("auto",):
        inputs = build_inputs(case, torch.bfloat16, device, latent)
        timing = timed_with_clock(lambda: ops.paged_latent_attention(
            **inputs, max_query_len=case.query_len, max_seq_len=case.context), monitor or ClockMonitor())
        us = timing["us"]
        suffix = "" if latent == "auto" else f"_{latent}"
        row[f"palu{suffix}_us"] = us
        row[f"palu{suffix}_sm_mhz"] = timing.get("sm_mhz")
        row[f"palu{suffix}_floor_us"] = floor_us(case.palu_bytes(latent), case.palu_flops())
        row[f"palu{suffix}_roofline_fraction"] = row[f"palu{suffix}_floor_us"] / us
        row[f"palu{suffix}_bandwidth_tbs"] = case.palu_bytes(latent) / us / 1e6
        if case.query_len > 1:  # the prefill path's alternative: keys rebuilt per KV tile inside the loop
            row["palu_fused_us"] = do_bench(lambda: ops.paged_latent_attention(
                **inputs, max_query_len=case.query_len, max_seq_len=case.context, tuning={"prefill": "fused"}),
                return_mode="median") * 1e3
        del inputs

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
    if case.query_len == 1:
        if case.group_size == 1:
            row["palu_unfused_us"] = unfused_palu_us(case, device)
        row.update(bench_flashinfer.decode_us(case, device))
    # Best dense bf16 decode: flash, cuDNN, or FlashInfer with bf16 pages (fp8 pages are a separate column).
    dense = [row[key] for key in ("flash_us", "cudnn_us", "flashinfer_us") if row.get(key)]
    row["best_dense_us"] = min(dense) if dense else None
    for suffix in ("", "_fp8", "_int4"):
        if f"palu{suffix}_us" in row:
            row[f"speedup{suffix}_vs_best_dense"] = row["best_dense_us"] / row[f"palu{suffix}_us"] if dense else None
    return row


def unfused_palu_us(case: Case, device) -> float:
    """The public Palu code's way (groups of one head): rebuild every key from contiguous latents, rotate, then
    SDPA with V latents as values. Full keys are materialized each step, so it moves more bytes than dense."""
    import torch
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


def tune(device) -> list[dict]:
    """Time tile/warp/stage/split variants of the decode kernel on the headline shapes (prints the best first)."""
    import itertools

    import torch
    from triton.testing import do_bench

    from vllm_palu.attention import ops

    rows = []
    for case in (Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768), Case("llama3-8b", 32, 8, 128, 0.5, 2, 16, 32768),
                 Case("llama3-8b", 32, 8, 128, 0.5, 1, 1, 65536)):
        inputs = build_inputs(case, torch.bfloat16, device)
        floor = floor_us(case.palu_bytes(), case.palu_flops())
        for block_n, warps, stages, per_sm in itertools.product((16, 32, 64), (2, 4), (2, 3, 4), (4, 16)):
            tuning = dict(block_n=block_n, num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
            try:
                us = do_bench(lambda: ops.paged_latent_attention(**inputs, max_query_len=1, max_seq_len=case.context,
                                                                 tuning=tuning), return_mode="median") * 1e3
            except Exception as error:  # noqa: BLE001 - out of resources etc.: record and go on
                rows.append({"case": asdict(case), **tuning, "error": str(error).splitlines()[0][:100]})
                continue
            rows.append({"case": asdict(case), **tuning, "us": us, "of_floor": floor / us})
        del inputs
        torch.cuda.empty_cache()
    for row in sorted((r for r in rows if "us" in r), key=lambda r: (r["case"]["group_size"], r["case"]["batch"],
                                                                       r["us"]))[:60]:
        print(f"gs{row['case']['group_size']} b{row['case']['batch']} ctx{row['case']['context']} "
              f"N{row['block_n']} w{row['num_warps']} s{row['num_stages']} ps{row['programs_per_sm']}: "
              f"{row['us']:.0f} us ({row['of_floor']:.0%} of floor)")
    return rows


def default_cases() -> list[Case]:
    cases = []
    for model, heads, kv_heads in (("llama3-8b", 32, 8), ("llama2-7b", 32, 32)):
        for kv_ratio in (0.5, 0.25):
            for batch, context in ((1, 4096), (1, 16384), (1, 65536), (1, 131072), (16, 4096), (16, 16384),
                                   (16, 32768), (16, 65536), (64, 4096), (64, 16384)):
                if kv_heads == 32 and batch * context > 16 * 32768:
                    continue  # dense MHA K/V of that size does not fit beside the rest
                cases.append(Case(model, heads, kv_heads, 128, kv_ratio, 1, batch, context))
    cases.append(Case("llama3-8b", 32, 8, 128, 0.5, 2, 16, 32768))  # groups of 2 KV heads
    cases.append(Case("llama2-7b", 32, 32, 128, 0.5, 2, 16, 16384))
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
        lines.append(f"| {r['model']} | {r['kv_ratio']} | {r['group_size']} | {r['batch']} | {r['context']} | "
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
    labels = [f"{r['model']} r{r['kv_ratio']} gs{r['group_size']}\nb{r['batch']} {r['context'] // 1024}K"
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
    parser = argparse.ArgumentParser(prog="python -m vllm_palu.bench")
    parser.add_argument("what", choices=["kernels", "tune", "headline"])
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--quick", action="store_true", help="only the headline cases")
    parser.add_argument("--repeats", type=int, default=6, help="headline: rounds of alternating timings")
    args = parser.parse_args(argv)
    import torch
    from tqdm import tqdm

    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.what == "headline":
        return 0 if headline(device, args.repeats, args.out) is not None else 1
    if args.what == "tune":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune.json").write_text(json.dumps(tune(device), indent=1))
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
