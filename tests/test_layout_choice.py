"""The converter's default layout (``--latent-layout auto``, ``--group-size auto``): the measured preference order,
bounded by the key-rebuild work the decode kernel served at dense speed on the H200."""

import json

import pytest

from helpers import convert_tiny
from vllm_palu.config import LatentLayout
from vllm_palu.offline.converter import DEFAULT_REFINE_STEPS
from vllm_palu.offline.layout_choice import KEY_REBUILD_FLOPS_PER_BYTE, choose_layout, key_rebuild_flops

SHARED, SPLIT = LatentLayout.SHARED, LatentLayout.SPLIT


def test_issue_figures_at_llama3_8b_shapes():
    """The key-rebuild work of the layouts the accuracy issue names (8 KV heads, head dim 128, kv 0.5), and the
    bound: split over groups of 2, the widest layout the H200 decoded at dense speed."""
    assert key_rebuild_flops(SHARED, 8, 8, 128, 0.5, 0.3125) == 2 ** 21  # 2.1 MFLOP
    assert key_rebuild_flops(SHARED, 2, 8, 128, 0.5, 0.3125) == 2 ** 19  # 0.5 MFLOP
    assert key_rebuild_flops(SPLIT, 8, 8, 128, 0.5, 0.3125) == 655360  # 0.66 MFLOP (r_k 320): 0.07x dense
    assert key_rebuild_flops(SPLIT, 2, 8, 128, 0.5, 0.3125) == KEY_REBUILD_FLOPS_PER_BYTE * 4096 == 163840


@pytest.mark.parametrize("heads, head_dim, kv_ratio, asked, expected", [
    (3, 64, 0.5, ("auto", None), (SPLIT, 3)),      # SmolLM2: joint keys over its 3 heads (shared: 96 FLOP/B)
    (3, 64, 0.25, ("auto", None), (SPLIT, 3)),
    (8, 128, 0.5, ("auto", None), (SPLIT, 2)),     # Llama-3-8B: joint keys over 8 heads are 0.66 MFLOP, over 2 0.16
    (8, 128, 0.25, ("auto", None), (SPLIT, 4)),    # half the ranks: groups of 4 cost what groups of 2 did
    (8, 128, 0.9, ("auto", None), (SPLIT, 1)),     # even joint keys of 2 heads are too wide at kv 0.9
    (32, 128, 0.5, ("auto", None), (SPLIT, 2)),    # Llama-2-7B (MHA)
    (8, 128, 0.5, ("shared", None), (SHARED, 1)),  # shared asked for: the widest servable group
    (8, 128, 0.5, ("auto", 1), (SPLIT, 1)),        # a fixed group size: per head, shared is over the bound
    (2, 32, 0.5, ("auto", None), (SHARED, 2)),     # a tiny model: a shared latent over both heads is cheap enough
    (8, 128, 0.5, ("shared", 8), (SHARED, 8)),     # explicit and over the bound: the user's choice stands
    (8, 128, 0.5, ("split", None), (SPLIT, 2)),
])
def test_choice(heads, head_dim, kv_ratio, asked, expected):
    assert choose_layout(heads, head_dim, kv_ratio, 0.3125, *asked) == expected


def test_converter_default_is_the_choice(tiny_llama, calib_file, tmp_path):
    """The converter's defaults: the tiny Llama (2 KV heads, head dim 32) gets one shared latent over both heads,
    the default key weight and refinement, and the summary says so."""
    output = convert_tiny(tiny_llama, tmp_path / "palu", calib_file, kv_ratio=0.5, latent_layout="auto",
                          group_size="auto", refine_steps=DEFAULT_REFINE_STEPS)
    palu = json.loads((output / "config.json").read_text())["palu"]
    assert (palu["latent_layout"], palu["group_size"]) == ("shared", 2)
    assert palu["k_ranks"] == palu["v_ranks"] == [64, 64] and palu["method"]["key_weight"] == 0.5
    assert palu["method"]["refine_steps"] == 100 and palu["reconstruction_error"]["attention"]
    assert "Shared layout: one latent per group" in (output / "PALU_SUMMARY.md").read_text()
