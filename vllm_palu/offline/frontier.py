"""Perplexity vs KV bytes per token: Palu checkpoints (allocation x kv-ratio x latent format) against dense
KV-quantization baselines, on the PyTorch reference model (``python -m vllm_palu.eval frontier``).

Converted checkpoints and every perplexity are cached under ``cache_dir``: a re-run only computes what is missing
(a checkpoint is reused when its ``palu.method`` and calibration match; a perplexity when model, quantization and
evaluation protocol match). Outputs (JSON rows, markdown table, PNG plot) are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vllm_palu.config import LatentFormat, LatentLayout, PaluConfig, head_dim_of
from vllm_palu.errors import PaluError
from vllm_palu.offline.converter import DEFAULT_KEY_WEIGHT, DEFAULT_REFINE_STEPS

DEFAULT_ALLOCATIONS = ("uniform", "measured", "fisher", "flrc")
DEFAULT_KV_RATIOS = (0.75, 0.5, 0.375, 0.25)
DEFAULT_KV_QUANTS = ("none", "int8", "fp8", "int4", "int3", "int2")


@dataclass
class FrontierOptions:
    model: str
    data: str
    output: Path
    cache_dir: Path
    calib: str | None = None
    allocations: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOCATIONS))
    kv_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_KV_RATIOS))
    kv_quants: list[str] = field(default_factory=lambda: list(DEFAULT_KV_QUANTS))
    latent_formats: list[LatentFormat] = field(default_factory=lambda: [LatentFormat.AUTO])
    latent_layouts: list[LatentLayout] = field(default_factory=lambda: [LatentLayout.SPLIT])
    group_size: str = "all"
    key_weight: float = DEFAULT_KEY_WEIGHT  # shared layouts' (converter --key-weight)
    refine_steps: int = DEFAULT_REFINE_STEPS
    seq_len: int = 1024
    max_tokens: int | None = None
    calib_samples: int = 32
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    plot: Path | None = None


def validate(options: FrontierOptions) -> None:
    from vllm_palu.offline.allocation import ALLOCATIONS
    from vllm_palu.offline.kv_quant import KV_QUANT_MODES

    for name in options.allocations:
        if name not in ALLOCATIONS:
            raise PaluError(f"unknown allocation {name!r}; choose from {', '.join(ALLOCATIONS)}")
    for mode in options.kv_quants:
        if mode not in KV_QUANT_MODES:
            raise PaluError(f"unknown KV quantization {mode!r}; choose from {', '.join(KV_QUANT_MODES)}")
    for latent_format in options.latent_formats:
        LatentFormat.parse(latent_format)
    for latent_layout in options.latent_layouts:
        LatentLayout.parse(latent_layout)
    for ratio in options.kv_ratios:
        if not 0 < ratio <= 1:
            raise PaluError(f"kv-ratio {ratio} outside (0, 1]")
    if not Path(options.data).is_file():
        raise PaluError(f"evaluation text not found: {options.data}")
    if options.calib is not None and not Path(options.calib).is_file():
        raise PaluError(f"calibration file not found: {options.calib}")


def run_frontier(options: FrontierOptions) -> list[dict]:
    from transformers import AutoTokenizer

    from vllm_palu.offline.checkpoint import read_config
    from vllm_palu.offline.perplexity import tokenize_file
    from vllm_palu.offline.smollm2 import resolve_model

    validate(options)
    source = resolve_model(options.model)
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    options.output.mkdir(parents=True, exist_ok=True)
    ids = tokenize_file(AutoTokenizer.from_pretrained(source), options.data, options.max_tokens)
    config = read_config(source)
    head_dim = head_dim_of(config)

    rows: list[dict] = []
    for mode in options.kv_quants:
        rows.append(_dense_point(source, mode, head_dim, ids, options))
        write_outputs(rows, options)  # after every point: a long sweep shows its progress and survives a crash
    for ratio in options.kv_ratios:
        for latent_layout in map(LatentLayout.parse, options.latent_layouts):
            for allocation in options.allocations:
                checkpoint, convert_seconds = _checkpoint(source, allocation, latent_layout, ratio, options)
                for latent_format in options.latent_formats:
                    rows.append(_palu_point(checkpoint, allocation, ratio, LatentFormat.parse(latent_format),
                                            convert_seconds, ids, options))
                    write_outputs(rows, options)
    return rows


def _protocol(options: FrontierOptions, ids: torch.Tensor) -> dict:
    return {"data": str(Path(options.data).resolve()), "seq_len": options.seq_len, "tokens": int(ids.numel())}


def _cached_ppl(name: str, protocol: dict, options: FrontierOptions,
                compute: Callable[[], dict]) -> dict:
    path = options.cache_dir / "ppl" / f"{name}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("protocol") == protocol:
            return cached
    row = {**compute(), "protocol": protocol}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(row, indent=2) + "\n")
    return row


def _evaluate(model: nn.Module, ids: torch.Tensor, options: FrontierOptions, desc: str) -> dict:
    from vllm_palu.offline.converter import resolve_device
    from vllm_palu.offline.perplexity import perplexity

    result = perplexity(model, ids, options.seq_len, resolve_device(options.device), desc=desc)
    return {"ppl": round(result.ppl, 3), "scored_tokens": result.scored_tokens}


def _dense_point(source: Path, mode: str, head_dim: int, ids: torch.Tensor, options: FrontierOptions) -> dict:
    from vllm_palu.offline.checkpoint import load_dense_model
    from vllm_palu.offline.kv_quant import bytes_vs_bf16, set_kv_quant

    def compute() -> dict:
        model = load_dense_model(source)
        set_kv_quant(model, mode)
        return _evaluate(model, ids, options, f"dense kv={mode}")

    row = _cached_ppl(f"dense-{mode}", _protocol(options, ids), options, compute)
    label = "original" if mode == "none" else f"dense {mode} KV"
    return {"kind": "dense", "label": label, "allocation": None, "kv_ratio": None, "latent_format": None,
            "kv_quant": mode, "kv_bytes_vs_bf16": round(bytes_vs_bf16(mode, head_dim), 4), "ppl": row["ppl"],
            "scored_tokens": row["scored_tokens"], "checkpoint": str(source)}


def _checkpoint_name(allocation: str, latent_layout: LatentLayout, ratio: float, options: FrontierOptions) -> str:
    name = f"palu-{allocation}-r{ratio:g}-g{options.group_size}"
    if latent_layout == LatentLayout.SHARED:
        name += f"-shared-kw{options.key_weight:g}"
    return name + (f"-refine{options.refine_steps}" if options.refine_steps else "")


def _checkpoint(source: Path, allocation: str, latent_layout: LatentLayout, ratio: float,
                options: FrontierOptions) -> tuple[Path, float | None]:
    """The cached converted checkpoint, or a fresh conversion; (path, conversion seconds or None if cached)."""
    from vllm_palu.offline.converter import ConvertOptions, convert

    path = options.cache_dir / _checkpoint_name(allocation, latent_layout, ratio, options)
    wanted_calib = {"samples": options.calib_samples, "seq_len": options.calib_seq_len, "seed": options.seed,
                    "source": str(options.calib) if options.calib else "self-generated"}
    config_file = path / "config.json"
    if config_file.is_file():
        palu = json.loads(config_file.read_text()).get("palu", {})
        method, calib = palu.get("method", {}), palu.get("calibration", {})
        if (method.get("rank_alloc") == allocation and method.get("kv_ratio") == ratio
                and palu.get("latent_layout", "split") == latent_layout
                and method.get("refine_steps", 0) == options.refine_steps
                and all(calib.get(k) == v for k, v in wanted_calib.items())):
            return path, None
    started = time.monotonic()
    convert(ConvertOptions(model=str(source), output=path, kv_ratio=ratio, group_size=options.group_size,
                           latent_layout=str(latent_layout), key_weight=options.key_weight,
                           refine_steps=options.refine_steps, rank_alloc=allocation, calib=options.calib,
                           calib_samples=options.calib_samples, calib_seq_len=options.calib_seq_len,
                           seed=options.seed, device=options.device, force=True))
    return path, round(time.monotonic() - started, 1)


def _palu_point(checkpoint: Path, allocation: str, ratio: float, latent_format: LatentFormat,
                convert_seconds: float | None, ids: torch.Tensor, options: FrontierOptions) -> dict:
    """A Palu checkpoint's perplexity with its latents stored in ``latent_format`` (fake-quantized exactly as the
    paged cache stores them), and its bytes as the served cache rows count them, scales included."""
    from vllm_palu.offline.checkpoint import load_palu_model, read_config
    from vllm_palu.offline.lowrank import set_latent_format

    palu = PaluConfig.of(read_config(checkpoint))
    protocol = {**_protocol(options, ids), "k_ranks": palu.k_ranks, "v_ranks": palu.v_ranks}

    def compute() -> dict:
        model = load_palu_model(checkpoint)
        set_latent_format(model, latent_format)
        return _evaluate(model, ids, options, f"{checkpoint.name} latents {latent_format}")

    row = _cached_ppl(f"{checkpoint.name}-latent-{latent_format}", protocol, options, compute)
    kv_bytes = palu.latent_bytes_per_token(latent_format=latent_format) / palu.dense_kv_bytes_per_token(2)
    label = (f"Palu {allocation}" + (" shared" if palu.shared else "")
             + ("" if latent_format == LatentFormat.AUTO else f" + {latent_format} latents"))
    return {"kind": "palu", "label": label, "allocation": allocation, "kv_ratio": ratio,
            "latent_layout": palu.latent_layout, "latent_format": str(latent_format), "kv_quant": None,
            "kv_bytes_vs_bf16": round(kv_bytes, 4), "key_rebuild_flops": key_rebuild_flops(palu),
            "ppl": row["ppl"], "scored_tokens": row["scored_tokens"], "checkpoint": str(checkpoint),
            "k_ranks": palu.k_ranks, "v_ranks": palu.v_ranks,
            "allocation_seconds": palu.method.get("allocation_seconds"), "convert_seconds": convert_seconds}


def key_rebuild_flops(palu: PaluConfig) -> float:
    """FLOPs to rebuild one cached token's keys at decode, averaged over layers: ``2 r_k g d`` per group (a shared
    latent's r_k is its whole width): the work the decode kernel does per token beyond reading it."""
    per_layer = [2 * rank * palu.group_size * palu.head_dim * palu.num_groups for rank in palu.k_ranks]
    return sum(per_layer) / len(per_layer)


def format_table(rows: list[dict]) -> str:
    original = next((r["ppl"] for r in rows if r["kind"] == "dense" and r["kv_quant"] == "none"), None)
    lines = ["| setting | kv-ratio | KV bytes vs bf16 | ppl | vs original | K ranks (min–max) | V ranks (min–max) | "
             "allocation s |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (-r["kv_bytes_vs_bf16"], r["ppl"])):
        delta = "–" if original is None or row["ppl"] == original else f"{(row['ppl'] / original - 1) * 100:+.1f}%"
        if row["kind"] == "palu":
            k, v = row["k_ranks"], row["v_ranks"]
            ranks = f"{min(k)}–{max(k)} | {min(v)}–{max(v)}"
            seconds = row.get("allocation_seconds")
            seconds = "–" if not seconds else f"{seconds:.0f}"
            ratio = f"{row['kv_ratio']:g}"
        else:
            ranks, seconds, ratio = "– | –", "–", "–"
        lines.append(f"| {row['label']} | {ratio} | {row['kv_bytes_vs_bf16']:.3f} | {row['ppl']:.2f} | {delta} | "
                     f"{ranks} | {seconds} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = sorted((r for r in rows if r["kind"] == "dense"), key=lambda r: r["kv_bytes_vs_bf16"])
    if dense:
        ax.plot([r["kv_bytes_vs_bf16"] for r in dense], [r["ppl"] for r in dense], marker="s", color="black",
                label="dense + KV quantization")
        for r in dense:
            ax.annotate(r["kv_quant"] if r["kv_quant"] != "none" else "bf16", (r["kv_bytes_vs_bf16"], r["ppl"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    markers = iter("o^vD<>px*")
    for label in dict.fromkeys(r["label"] for r in rows if r["kind"] == "palu"):
        chosen = sorted((r for r in rows if r["label"] == label), key=lambda r: r["kv_bytes_vs_bf16"])
        ax.plot([r["kv_bytes_vs_bf16"] for r in chosen], [r["ppl"] for r in chosen], marker=next(markers, "o"),
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes per token vs bf16 dense K+V")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    os.replace(tmp.name, path)


def atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def write_outputs(rows: list[dict], options: FrontierOptions) -> None:
    atomic_write(options.output / "frontier.json", json.dumps(rows, indent=2) + "\n")
    atomic_write(options.output / "frontier.md", format_table(rows) + "\n")
    title = f"{Path(options.model).name}: perplexity vs KV bytes ({Path(options.data).name})"
    plot_path = options.plot or options.output / "frontier.png"
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path, title)
