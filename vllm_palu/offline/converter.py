"""Dense HF checkpoint -> Palu checkpoint (low-rank k/v projections whose latents are what serving caches)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_palu.config import DTYPE_BYTES, LATENT_ROTATIONS, PALU_ARCHITECTURES, PaluConfig, head_dim_of
from vllm_palu.errors import PaluError
from vllm_palu.offline import calibration
from vllm_palu.offline.allocation import ALLOCATIONS, LayerLayout, RankBudget
from vllm_palu.offline.allocation.base import total_budget
from vllm_palu.offline.checkpoint import (atomic_directory, base_architecture, check_output_path,
                                          copy_auxiliary_files, load_dense_model, read_config)
from vllm_palu.offline.decompositions import DECOMPOSITIONS, Factorization, relative_error
from vllm_palu.offline.lowrank import LowRankProjection
from vllm_palu.offline.rotation import rotate_factors
from vllm_palu.offline.smollm2 import resolve_model

# Share of the latent budget given to keys. Keys compress better than values (docs/RESULTS.md, k-fraction sweep).
DEFAULT_K_FRACTION = 0.3125
SUMMARY_FILE = "PALU_SUMMARY.md"


@dataclass
class ConvertOptions:
    model: str
    output: Path
    kv_ratio: float = 0.5
    k_fraction: float = DEFAULT_K_FRACTION
    group_size: str = "all"  # KV heads per latent group: an integer, or "all" (one joint group)
    rank_multiple: int = 8
    rank_alloc: str = "uniform"
    decomposition: str = "whitened_svd"
    # Off by default: on SmolLM2 its effect on int4 latents was small and not consistent (docs/RESULTS.md, "Latent rotation").
    latent_rotation: str = "none"
    calib: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    force: bool = False


def parse_group_size(value: str, num_kv_heads: int) -> int:
    if value == "all":
        return num_kv_heads
    try:
        group_size = int(value)
    except ValueError:
        raise PaluError(f"--group-size must be a positive integer or 'all', got {value!r}") from None
    if group_size < 1 or num_kv_heads % group_size:
        raise PaluError(f"--group-size {group_size} must divide the model's {num_kv_heads} KV heads")
    return group_size


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise PaluError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PaluError(f"--device {name}: no CUDA device available")
    return device


def convert(options: ConvertOptions) -> Path:
    """Validate everything cheap first, then calibrate and decompose layer by layer into a staging directory that
    replaces ``options.output`` only when complete."""
    started = time.monotonic()
    source = resolve_model(options.model)
    config = read_config(source)
    architecture = base_architecture(config)
    if "palu" in config:
        raise PaluError(f"{source} is already a Palu checkpoint")
    budget = RankBudget(options.kv_ratio, options.k_fraction, options.rank_multiple)
    num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = head_dim_of(config)
    group_size = parse_group_size(str(options.group_size), num_kv_heads)
    if options.decomposition not in DECOMPOSITIONS:
        raise PaluError(f"unknown --decomposition {options.decomposition!r}; choose from {', '.join(DECOMPOSITIONS)}")
    if options.rank_alloc not in ALLOCATIONS:
        raise PaluError(f"unknown --rank-alloc {options.rank_alloc!r}; choose from {', '.join(ALLOCATIONS)}")
    if options.latent_rotation not in LATENT_ROTATIONS:
        raise PaluError(f"unknown --latent-rotation {options.latent_rotation!r}; "
                        f"choose from {', '.join(LATENT_ROTATIONS)}")
    if options.calib is not None and not Path(options.calib).is_file():
        raise PaluError(f"calibration file not found: {options.calib}")
    device = resolve_device(options.device)
    output = Path(options.output)
    check_output_path(output, options.force)

    layout = LayerLayout(config["num_hidden_layers"], num_kv_heads // group_size, group_size * head_dim)
    strategy = ALLOCATIONS[options.rank_alloc]()
    if not strategy.needs_sensitivity:
        k_ranks, v_ranks = strategy.allocate(layout, budget)
    else:  # fail on a bad budget before the calibration work
        total_budget(layout, budget)

    from transformers import AutoTokenizer

    model = load_dense_model(source)
    save_dtype = _checkpoint_dtype(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if options.calib is not None:
        calib = calibration.windows_from_text(tokenizer, options.calib, options.calib_samples,
                                              options.calib_seq_len, options.seed)
    else:
        calib = calibration.self_generated_windows(model, options.calib_samples, options.calib_seq_len,
                                                   options.seed, device)

    allocation_seconds = 0.0
    if strategy.needs_sensitivity:
        sensitivity, allocation_seconds = strategy.measure(model, calib.windows, layout, device,
                                                           options.decomposition, key=str(source))
        k_ranks, v_ranks = strategy.allocate(layout, budget, sensitivity)

    with atomic_directory(output, options.force) as staging:
        errors = decompose_model(model, calib.windows, k_ranks, v_ranks, layout, options, device)
        palu = PaluConfig(
            base_architecture=architecture, num_kv_heads=num_kv_heads, head_dim=head_dim, group_size=group_size,
            k_ranks=k_ranks, v_ranks=v_ranks, weight_dtype=_dtype_name(save_dtype), rotation=options.latent_rotation,
            kv_bias=model.model.layers[0].self_attn.k_proj.up.bias is not None,
            method={"decomposition": options.decomposition, "rank_alloc": options.rank_alloc,
                    "kv_ratio": options.kv_ratio,
                    "k_fraction": options.k_fraction if strategy.uses_k_fraction else None,
                    "rank_multiple": options.rank_multiple,
                    "allocation_seconds": round(allocation_seconds, 1)},
            calibration=calib.describe(options.seed), reconstruction_error=errors)
        model.to(save_dtype).save_pretrained(staging)
        # save_pretrained names the architecture after the Python class: rename it and add the palu section.
        config_file = staging / "config.json"
        saved = json.loads(config_file.read_text())
        saved["architectures"] = [PALU_ARCHITECTURES[architecture]]
        saved["palu"] = palu.to_dict()
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
        copy_auxiliary_files(source, staging)
        (staging / SUMMARY_FILE).write_text(summary(palu, source, time.monotonic() - started))
    return output


def decompose_model(model: nn.Module, windows: torch.Tensor, k_ranks: list[int], v_ranks: list[int],
                    layout: LayerLayout, options: ConvertOptions, device: torch.device) -> dict[str, list[float]]:
    """Replace every layer's k_proj / v_proj by its factorization, in place; returns per-layer relative errors."""
    method = DECOMPOSITIONS[options.decomposition]()
    errors: dict[str, list[float]] = {"k": [], "v": []}
    batches = calibration.first_layer_inputs(model, windows, options.batch_size, device)
    for index, layer, gram in calibration.iterate_layers(model, batches, device):
        prepared = method.prepare(gram)
        for kind, rank in (("k", k_ranks[index]), ("v", v_ranks[index])):
            dense: nn.Linear = getattr(layer.self_attn, f"{kind}_proj")
            weight = dense.weight.detach().double().view(layout.num_groups, layout.group_width, -1)
            factors = method.factorize(weight, prepared, rank)
            if options.latent_rotation != "none":  # exact: the error below is unchanged
                factors = Factorization(*rotate_factors(factors.down, factors.up, options.latent_rotation))
            errors[kind].append(round(relative_error(weight, factors, gram), 6))
            setattr(layer.self_attn, f"{kind}_proj",
                    LowRankProjection.from_factors(dense, factors.down, factors.up, device))
    return errors


def _checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPE_BYTES:
        raise PaluError(f"unsupported checkpoint dtype {name!r}; supported: {', '.join(DTYPE_BYTES)}")
    return getattr(torch, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summary(palu: PaluConfig, source: Path, seconds: float) -> str:
    """The human-readable PALU_SUMMARY.md written next to the weights."""
    dtype_bytes = DTYPE_BYTES[palu.weight_dtype]
    dense = palu.dense_kv_bytes_per_token(dtype_bytes)
    latent = palu.latent_bytes_per_token()
    rows = "\n".join(
        f"| {i} | {palu.k_ranks[i]} | {palu.v_ranks[i]} | {palu.reconstruction_error['k'][i]:.4f} | "
        f"{palu.reconstruction_error['v'][i]:.4f} |" for i in range(palu.num_layers))
    return f"""# Palu checkpoint

Converted from `{source}` ({palu.base_architecture}) in {seconds:.0f} s.

| KV cache per token, all layers ({palu.weight_dtype}) | bytes |
|---|---|
| dense K+V | {dense:,} |
| Palu latents | {latent:,} |
| ratio | {latent / dense:.3f} ({dense / latent:.2f}x more tokens in the same memory) |

{palu.num_groups} latent group(s) of {palu.group_size} KV head(s) per layer; ranks are per group.
Method: `{json.dumps(palu.method)}`; latent rotation: {palu.rotation}
Calibration: `{json.dumps(palu.calibration)}`

| layer | K rank | V rank | K rel. error | V rel. error |
|---|---|---|---|---|
{rows}
"""
