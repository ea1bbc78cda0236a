"""Latent layouts on SmolLM2-135M: perplexity against KV bytes and key-rebuild work (docs/RESULTS.md, "Latent
layout"). Every choice is made on text the targets are not measured on: ``--text select`` calibrates on the first
85% of calib.txt and scores its last 15%; ``--text eval`` is the perplexity table's protocol (calibration on all of
calib.txt, scores on eval.txt).

Usage: python scripts/layout_sweep.py --out results/layouts --text select --kv-ratio 0.5 \
           --specs split-gall,shared-gall-kw1,shared-gall-kw0.5,shared-g1-kw0.5 [--latent-formats auto,fp8]
A spec is ``{split|shared}-g{all|N}`` plus optional ``-kw{key weight}``, ``-skip`` (block skipping),
``-refine{steps}``, ``-alloc{strategy}``; ``dense`` is the original model, with ``--kv-quants`` baselines. Appends one JSON line per (spec, latent format) to OUT/rows.jsonl; converted checkpoints
and the split text stay in OUT (re-runs reuse them).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

DATA = Path("../shared/data/wikitext2")
SPEC = re.compile(r"^(split|shared)-g(all|\d+)(?:-kw([\d.]+))?(-skip)?(?:-refine(\d+))?(?:-alloc(\w+))?$")


def parse_spec(spec: str) -> dict:
    match = SPEC.match(spec)
    if match is None:
        raise SystemExit(f"bad spec {spec!r}: expected e.g. shared-gall-kw0.5 (module doc)")
    layout, group, weight, skip, steps, allocation = match.groups()
    return {"latent_layout": layout, "group_size": group, "key_weight": float(weight or 1.0),
            "block_skip": bool(skip), "refine_steps": int(steps or 0), "rank_alloc": allocation or "uniform"}


def split_text(out: Path) -> tuple[Path, Path]:
    """calib.txt cut at a line boundary near 85%: (calibration part, selection part)."""
    head, tail = out / "calib-head.txt", out / "calib-tail.txt"
    if not tail.exists():
        lines = (DATA / "calib.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * 0.85)
        head.write_text("".join(lines[:cut]), encoding="utf-8")
        tail.write_text("".join(lines[cut:]), encoding="utf-8")
    return head, tail


def record(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with (out / "rows.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def dense_rows(source: Path, ids, args) -> None:
    from vllm_palu.offline.checkpoint import load_dense_model
    from vllm_palu.offline.kv_quant import bytes_vs_bf16, set_kv_quant
    from vllm_palu.offline.perplexity import perplexity

    model = load_dense_model(source)
    for mode in args.kv_quants.split(","):
        set_kv_quant(model, mode)
        result = perplexity(model, ids, 1024, desc=f"dense {mode}")
        record(args.out, {"spec": "dense", "text": args.text, "kv_quant": mode, "ppl": round(result.ppl, 3),
                          "scored_tokens": result.scored_tokens,
                          "kv_bytes_vs_bf16": round(bytes_vs_bf16(mode, model.config.head_dim), 4)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text", choices=("select", "eval"), required=True)
    parser.add_argument("--kv-ratio", type=float, required=True)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--latent-formats", default="auto")
    parser.add_argument("--kv-quants", default="none,fp8,int4", help="the dense spec's KV quantization baselines")
    parser.add_argument("--tokens", type=int, default=None, help="scored text (default: 16384 select, 40000 eval)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from vllm_palu.config import LatentFormat, PaluConfig
    from vllm_palu.offline.checkpoint import load_palu_model, read_config
    from vllm_palu.offline.converter import ConvertOptions, convert
    from vllm_palu.offline.frontier import key_rebuild_flops
    from vllm_palu.offline.lowrank import set_latent_format
    from vllm_palu.offline.perplexity import perplexity, tokenize_file
    from vllm_palu.offline.smollm2 import resolve_model

    args.out.mkdir(parents=True, exist_ok=True)
    source = resolve_model("smollm2-135m")
    if args.text == "select":
        calib, scored = split_text(args.out)
        tokens = args.tokens or 16384
    else:
        calib, scored, tokens = DATA / "calib.txt", DATA / "eval.txt", args.tokens or 40000
    ids = tokenize_file(AutoTokenizer.from_pretrained(source), scored, tokens)
    torch.set_grad_enabled(False)
    for spec in args.specs.split(","):
        if spec == "dense":
            dense_rows(source, ids, args)
            continue
        settings = parse_spec(spec)
        checkpoint = args.out / f"{args.text}-r{args.kv_ratio}-{spec}"
        started = time.monotonic()
        if not (checkpoint / "config.json").exists():
            convert(ConvertOptions(model=str(source), output=checkpoint, kv_ratio=args.kv_ratio, calib=str(calib),
                                   force=True, **settings))
        convert_seconds = round(time.monotonic() - started, 1)
        palu = PaluConfig.of(read_config(checkpoint))
        model = load_palu_model(checkpoint)
        for name in args.latent_formats.split(","):
            latent_format = LatentFormat.parse(name)
            set_latent_format(model, latent_format)
            result = perplexity(model, ids, 1024, desc=f"{spec} {latent_format}")
            row = {"spec": spec, "text": args.text, "kv_ratio": args.kv_ratio, **settings,
                   "latent_format": str(latent_format), "ppl": round(result.ppl, 3),
                   "scored_tokens": result.scored_tokens,
                   "kv_bytes_vs_bf16": round(palu.latent_bytes_per_token(2, latent_format)
                                             / palu.dense_kv_bytes_per_token(2), 4),
                   "key_rebuild_flops": key_rebuild_flops(palu), "k_ranks": palu.k_ranks[:1],
                   "v_ranks": palu.v_ranks[:1], "convert_seconds": convert_seconds,
                   "reconstruction_error": {kind: round(sum(errors) / len(errors), 4)
                                            for kind, errors in palu.reconstruction_error.items()}}
            record(args.out, row)
        del model


if __name__ == "__main__":
    main()
