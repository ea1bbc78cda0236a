"""Markdown table + PNG plot (ppl vs KV bytes) from the JSON rows written by `python -m vllm_palu.eval ppl`.
Usage: python scripts/ppl_table.py DIR [MORE_DIRS ...]  (the plot is written into the first directory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cache_quant(row: dict) -> str:
    """The row's K/V or latent quantization ("none" for bf16); rows written before the latent-format rename name a
    Palu checkpoint's format in kv_quant."""
    name = row.get("latent_format") or row["kv_quant"]
    return "none" if name == "auto" else name


def main(*directories: str) -> None:
    out = Path(directories[0])
    rows = [row for directory in directories for path in sorted(Path(directory).glob("ppl-*.json"))
            for row in json.loads(path.read_text())]
    print("| setting | KV bytes vs bf16 | ppl | conversion time |")
    print("|---|---|---|---|")
    for row in sorted(rows, key=lambda r: -r["kv_bytes_vs_bf16"]):
        model = Path(row["model"])
        summary = model / "PALU_SUMMARY.md"
        seconds = ""
        if summary.is_file():
            seconds = next(line.split(" in ")[-1].rstrip(".") for line in summary.read_text().splitlines()
                           if line.startswith("Converted from"))
        stored = "latents" if "palu" in model.name else "KV"
        name = model.name + ("" if cache_quant(row) == "none" else f" + {cache_quant(row)} {stored}")
        print(f"| {name} | {row['kv_bytes_vs_bf16']:.3f} | {row['ppl']:.2f} | {seconds} |")
    plot(rows, out / "ppl_vs_bytes.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    def quantized_latents(kind: str, rotated: bool):
        return lambda r: ("palu" in Path(r["model"]).name and cache_quant(r) == kind
                          and ("rothadamard" in Path(r["model"]).name) == rotated)

    for label, pick, marker in (("dense + KV quantization", lambda r: "palu" not in Path(r["model"]).name, "s"),
                                ("Palu, joint group", lambda r: Path(r["model"]).name.endswith("-gall"), "o"),
                                ("Palu, per head", lambda r: Path(r["model"]).name.endswith("-g1"), "^"),
                                ("Palu joint + fp8 latents", quantized_latents("fp8", False), "D"),
                                ("Palu joint + int4 latents", quantized_latents("int4", False), "v"),
                                ("Palu joint + int4 latents, Hadamard", quantized_latents("int4", True), "x")):
        chosen = sorted((r for r in rows if pick(r)), key=lambda r: r["kv_bytes_vs_bf16"])
        if not chosen:
            continue
        ax.plot([r["kv_bytes_vs_bf16"] for r in chosen], [r["ppl"] for r in chosen], marker=marker, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes per token vs bf16")
    ax.set_ylabel("perplexity (WikiText-2 eval, 40k tokens)")
    ax.set_title("SmolLM2-135M: perplexity vs KV-cache bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
