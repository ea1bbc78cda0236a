"""Table and plot of a layout sweep (scripts/layout_sweep.py): perplexity against key-rebuild work, per layout.

Usage: python scripts/layout_report.py results/layouts [--text select] [--png docs/layouts_smollm2.png]
Prints a markdown table; the PNG puts every Palu row at its key-rebuild FLOP per byte of dense bf16 K+V (the
quantity the converter's default bounds: vllm_palu/offline/layout_choice.py), with the dense baselines as lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_palu.offline.layout_choice import KEY_REBUILD_FLOPS_PER_BYTE

SMOLLM2_DENSE_BYTES = 2 * 3 * 64 * 2  # bf16 K and V of one token and layer


def label(row: dict) -> str:
    name = row["spec"]
    return name if row["latent_format"] == "auto" else f"{name} {row['latent_format']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--text", default="select")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.out / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row["text"] == args.text]
    latest = {}  # a re-measured row replaces the earlier one
    for row in rows:
        latest[(row["spec"], row.get("latent_format"), row.get("kv_quant"), row.get("kv_ratio"))] = row
    dense = {row["kv_quant"]: row for row in latest.values() if row["spec"] == "dense"}
    palu = sorted((row for row in latest.values() if row["spec"] != "dense"), key=lambda row: row["ppl"])
    original = dense["none"]["ppl"]
    print("| layout | latent format | kv-ratio | KV bytes vs bf16 | ppl | vs original | key rebuild FLOP / token-layer "
          "| FLOP per dense KV byte |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, row in dense.items():
        print(f"| dense, {mode} KV | – | – | {row['kv_bytes_vs_bf16']:.3f} | {row['ppl']:.2f} | "
              f"{(row['ppl'] / original - 1) * 100:+.1f}% | – | – |")
    for row in palu:
        per_byte = row["key_rebuild_flops"] / SMOLLM2_DENSE_BYTES
        print(f"| {row['spec']} | {row['latent_format']} | {row['kv_ratio']} | {row['kv_bytes_vs_bf16']:.3f} | "
              f"{row['ppl']:.2f} | {(row['ppl'] / original - 1) * 100:+.1f}% | {row['key_rebuild_flops']:,.0f} | "
              f"{per_byte:.0f} |")
    if args.png is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for mode, row in dense.items():
        axis.axhline(row["ppl"], color="grey", linestyle=":" if mode != "none" else "-", linewidth=1)
        axis.text(0.01, row["ppl"], f"dense {mode} KV ({row['kv_bytes_vs_bf16']:.2f} B)", fontsize=8, color="grey",
                  va="bottom", transform=axis.get_yaxis_transform())
    for row in palu:
        per_byte = row["key_rebuild_flops"] / SMOLLM2_DENSE_BYTES
        color = "tab:red" if row["latent_layout"] == "shared" else "tab:blue"
        axis.scatter(per_byte, row["ppl"], color=color, marker="o" if row["latent_format"] == "auto" else "s")
        axis.annotate(label(row), (per_byte, row["ppl"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    axis.axvline(KEY_REBUILD_FLOPS_PER_BYTE, color="black", linestyle="--", linewidth=1)
    axis.annotate("servable bound (1 MFLOP at Llama-3-8B)", (KEY_REBUILD_FLOPS_PER_BYTE, axis.get_ylim()[1]),
                  fontsize=8, xytext=(-4, -12), textcoords="offset points", ha="right")
    axis.set_xscale("log")
    axis.set_xlabel("key-rebuild FLOP per cached token and layer, per byte of dense bf16 K+V")
    axis.set_ylabel(f"perplexity ({args.text} text)")
    axis.set_title("SmolLM2-135M at kv 0.5: latent layouts (red shared, blue split)")
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
