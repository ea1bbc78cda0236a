"""The converter's default latent layout and group size (``--latent-layout auto``, ``--group-size auto``).

The most accurate layout whose key-rebuild work the decode kernel serves at dense attention's speed. Rebuilding
keys costs ``2 r_k g d`` FLOP per cached token and group at every decode step (a shared latent's r_k is its whole
width); dense decode reads the token's bf16 K and V. The bound is what the H200 measured (docs/KERNEL_NOTES.md
"Version 4", Llama-3-8B kv 0.5, batch 16 x 32K, against cuDNN's 490 us): split over groups of 2 heads, 164 kFLOP
per token and layer (40 FLOP per dense byte), 472 us (1.04x dense); shared per head, 262 kFLOP, 744 us (0.66x);
split over groups of 4, 328 kFLOP, 1752 us; over all 8 heads, 655 kFLOP, 6821 us (0.07x). As FLOP per dense KV
byte (``KEY_REBUILD_FLOPS_PER_BYTE``) the bound is applied to any model shape. (It was 1 MFLOP at Llama-3-8B, a
tensor-core floor, until the kernels were timed on those layouts.) Those timings ran under triton 3.6; served under
vLLM's triton 3.8 groups of 2 decoded 1.77x slower than dense (docs/RESULTS.md), so only per-head split serves
faster than dense today: `--group-size 1` where speed matters more than accuracy.

Preference order, most accurate first, from SmolLM2-135M at kv 0.5 (docs/RESULTS.md, "Latent layout and
refinement"): wider groups first (per head, split and shared were 27-37% worse in perplexity than over all heads),
and at one group size a shared latent before a split one (better at both sizes measured). So: shared over all KV heads, split with all heads in
one group, then shared and split over smaller groups. SmolLM2 has 3 KV heads, so a shared latent over part of the
heads of a wider model (Llama-3-8B: groups of 2 or 4) against joint split keys was measured only as per head
against all 3 heads, where joint split keys won (+24% against +54%).
"""

from __future__ import annotations

from vllm_palu.config import LatentLayout

# Split over groups of 2 at Llama-3-8B kv 0.5 (r_k 80): 2 * 80 * 256 * 4 FLOP per token and layer, over its
# 2 * 8 * 128 bf16 K and V values.
KEY_REBUILD_FLOPS_PER_BYTE = 2 * 80 * 256 * 4 / (2 * 8 * 128 * 2)


def key_rebuild_flops(latent_layout: LatentLayout, group_size: int, num_kv_heads: int, head_dim: int,
                      kv_ratio: float, k_fraction: float) -> float:
    """Key-rebuild FLOP per cached token and layer of a uniform allocation (before rank rounding)."""
    latent_width = kv_ratio * 2 * group_size * head_dim  # the group's K + V budget
    rank_k = latent_width if latent_layout == LatentLayout.SHARED else k_fraction * latent_width
    return 2 * rank_k * group_size * head_dim * (num_kv_heads // group_size)


def servable(latent_layout: LatentLayout, group_size: int, num_kv_heads: int, head_dim: int, kv_ratio: float,
             k_fraction: float) -> bool:
    dense_bytes = 2 * num_kv_heads * head_dim * 2
    flops = key_rebuild_flops(latent_layout, group_size, num_kv_heads, head_dim, kv_ratio, k_fraction)
    return flops <= KEY_REBUILD_FLOPS_PER_BYTE * dense_bytes


def choose_layout(num_kv_heads: int, head_dim: int, kv_ratio: float, k_fraction: float,
                  latent_layout: str = "auto", group_size: int | None = None) -> tuple[LatentLayout, int]:
    """The first servable candidate in the preference order among those the user's choices leave open
    (``latent_layout`` "auto" or fixed; ``group_size`` None for auto). Where none is servable, the last one open
    (the cheapest): an explicit choice is the user's to make."""
    layouts = list(LatentLayout) if latent_layout == "auto" else [LatentLayout.parse(latent_layout)]
    sizes = [size for size in range(num_kv_heads, 0, -1) if num_kv_heads % size == 0]
    if group_size is not None:
        sizes = [group_size]
    # Wider groups first; at one group size, shared before split.
    candidates = [(layout, size) for size in sizes for layout in (LatentLayout.SHARED, LatentLayout.SPLIT)]
    candidates = [(layout, size) for layout, size in candidates if layout in layouts]
    for layout, size in candidates:
        if servable(layout, size, num_kv_heads, head_dim, kv_ratio, k_fraction):
            return layout, size
    return candidates[-1]
