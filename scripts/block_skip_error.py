"""What block skipping (``--block-skip``) costs in low precision: K and V of every layer, from checkpoints converted
with and without it, against the unskipped fp32 factors, in bf16 and with fp8 latents (docs/RESULTS.md, "Latent
layout and refinement"). Both checkpoints must come from the same conversion settings otherwise.

Usage: python scripts/block_skip_error.py PLAIN_DIR SKIPPED_DIR TEXT [--tokens 1024]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from vllm_palu.config import PaluConfig
from vllm_palu.offline.checkpoint import load_palu_model, read_config
from vllm_palu.offline.lowrank import set_latent_format
from vllm_palu.offline.perplexity import tokenize_file


def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention input (what k_proj sees) on ``ids``, from ``model``."""
    inputs: list[torch.Tensor] = []
    hooks = [layer.self_attn.k_proj.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def kv(attention, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([attention.k_proj(x).float(), attention.v_proj(x).float()], dim=-1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("plain")
    parser.add_argument("skipped")
    parser.add_argument("text")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    ids = tokenize_file(AutoTokenizer.from_pretrained(args.plain), args.text, args.tokens).view(1, -1)
    models = {"plain": load_palu_model(args.plain), "skipped": load_palu_model(args.skipped)}
    inputs = layer_inputs(models["plain"], ids)
    errors = {f"{name}_{precision}": [] for name in models for precision in ("fp32", "bf16", "fp8")}
    for index, x in enumerate(tqdm(inputs, desc="layers")):
        reference = kv(models["plain"].model.layers[index].self_attn, x)
        for name, model in models.items():
            attention = model.model.layers[index].self_attn
            errors[f"{name}_fp32"].append(relative(kv(attention, x), reference))
            errors[f"{name}_bf16"].append(relative(kv(copy.deepcopy(attention).to(torch.bfloat16),
                                                      x.to(torch.bfloat16)), reference))
    # fp8: both models fake-quantize their latents; the reference stays the unskipped fp32 projections.
    plain_fp32 = load_palu_model(args.plain)
    for model in models.values():
        set_latent_format(model, "fp8")
    for index, x in enumerate(inputs):
        reference = kv(plain_fp32.model.layers[index].self_attn, x)
        for name, model in models.items():
            errors[f"{name}_fp8"].append(relative(kv(model.model.layers[index].self_attn, x), reference))
    palu = PaluConfig.of(read_config(args.skipped))
    summary = {key: round(sum(values) / len(values), 5) for key, values in errors.items()}
    summary["worst_layer_bf16"] = {name: round(max(errors[f"{name}_bf16"]), 5) for name in models}
    summary["block_skip_condition_max"] = max(palu.method.get("block_skip_condition", [0]))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
