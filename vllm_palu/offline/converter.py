"""Dense HF checkpoint -> Palu checkpoint (low-rank k/v projections whose latents are what serving caches)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vllm_palu.config import (DTYPE_BYTES, LATENT_ROTATIONS, PALU_ARCHITECTURES, LatentLayout, PaluConfig,
                              head_dim_of)
from vllm_palu.errors import PaluError
from vllm_palu.offline import calibration
from vllm_palu.offline.allocation import ALLOCATIONS, LayerLayout, RankBudget
from vllm_palu.offline.allocation.base import total_budget
from vllm_palu.offline.checkpoint import (atomic_directory, base_architecture, check_output_path,
                                          copy_auxiliary_files, load_dense_model, read_config)
from vllm_palu.offline.decompositions import DECOMPOSITIONS, Factorization, relative_error
from vllm_palu.offline.block_skip import skip_block
from vllm_palu.offline.layout_choice import choose_layout
from vllm_palu.offline.lowrank import LowRankProjection, SharedValueProjection
from vllm_palu.offline.refine import refine_attention
from vllm_palu.offline.rotation import rotate_factors
from vllm_palu.offline.smollm2 import resolve_model

# Share of the latent budget given to keys. Keys compress better than values (docs/RESULTS.md, k-fraction sweep).
DEFAULT_K_FRACTION = 0.3125
# Shared layout: keys weighted down in the stacked factorization (docs/RESULTS.md, "Latent layout and refinement").
DEFAULT_KEY_WEIGHT = 0.5
# Adam steps per layer fitting the K/V factors to the attention output: on SmolLM2 at kv 0.5 (shared), 100 steps
# cut the held-out perplexity gap from +15.9% to +5.9% for 4.6x the conversion time (docs/RESULTS.md).
DEFAULT_REFINE_STEPS = 100
SUMMARY_FILE = "PALU_SUMMARY.md"


@dataclass
class ConvertOptions:
    model: str
    output: Path
    kv_ratio: float = 0.5
    k_fraction: float = DEFAULT_K_FRACTION
    group_size: str = "auto"  # KV heads per latent group: an integer, "all" (one joint group) or "auto"
    latent_layout: str = "auto"  # split, shared, or auto (vllm_palu.offline.layout_choice)
    # Shared layout: the keys' weight in the stacked [key_weight * W_k; W_v] factorization.
    key_weight: float = DEFAULT_KEY_WEIGHT
    block_skip: bool = False
    refine_steps: int = DEFAULT_REFINE_STEPS  # Adam steps per layer on the attention output (0: SVD factors)
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


def parse_group_size(value: str, num_kv_heads: int) -> int | None:
    """KV heads per group, or None for "auto" (:func:`vllm_palu.offline.layout_choice.choose_layout`)."""
    if value == "auto":
        return None
    if value == "all":
        return num_kv_heads
    try:
        group_size = int(value)
    except ValueError:
        raise PaluError(f"--group-size must be a positive integer, 'all' or 'auto', got {value!r}") from None
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
    latent_layout, group_size = choose_layout(num_kv_heads, head_dim, options.kv_ratio, options.k_fraction,
                                              options.latent_layout,
                                              parse_group_size(str(options.group_size), num_kv_heads))
    options = replace(options, latent_layout=str(latent_layout), group_size=str(group_size))  # "auto" resolved
    if options.decomposition not in DECOMPOSITIONS:
        raise PaluError(f"unknown --decomposition {options.decomposition!r}; choose from {', '.join(DECOMPOSITIONS)}")
    if options.rank_alloc not in ALLOCATIONS:
        raise PaluError(f"unknown --rank-alloc {options.rank_alloc!r}; choose from {', '.join(ALLOCATIONS)}")
    if options.latent_rotation not in LATENT_ROTATIONS:
        raise PaluError(f"unknown --latent-rotation {options.latent_rotation!r}; "
                        f"choose from {', '.join(LATENT_ROTATIONS)}")
    shared = latent_layout == LatentLayout.SHARED
    if not options.key_weight > 0:
        raise PaluError(f"--key-weight must be positive, got {options.key_weight}")
    if options.refine_steps < 0:
        raise PaluError(f"--refine-steps must be >= 0, got {options.refine_steps}")
    if options.block_skip and options.latent_rotation != "none":
        raise PaluError("--block-skip re-bases each latent on input channels, which undoes --latent-rotation: "
                        "pass one of them")
    if options.calib is not None and not Path(options.calib).is_file():
        raise PaluError(f"calibration file not found: {options.calib}")
    device = resolve_device(options.device)
    output = Path(options.output)
    check_output_path(output, options.force)

    layout = LayerLayout(config["num_hidden_layers"], num_kv_heads // group_size, group_size * head_dim)
    strategy = ALLOCATIONS[options.rank_alloc]()
    if not strategy.needs_sensitivity:
        k_ranks, v_ranks = _layer_ranks(strategy.allocate(layout, budget), shared, config["hidden_size"])
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
        k_ranks, v_ranks = _layer_ranks(strategy.allocate(layout, budget, sensitivity), shared,
                                        config["hidden_size"])

    with atomic_directory(output, options.force) as staging:
        errors, skip_conditions = decompose_model(model, calib.windows, k_ranks, v_ranks, layout, options, device)
        method = {"decomposition": options.decomposition, "rank_alloc": options.rank_alloc,
                  "kv_ratio": options.kv_ratio,
                  "k_fraction": options.k_fraction if strategy.uses_k_fraction and not shared else None,
                  "rank_multiple": options.rank_multiple, "allocation_seconds": round(allocation_seconds, 1)}
        if shared:
            method["key_weight"] = options.key_weight
        if options.block_skip:  # per layer: the largest condition number of a skipped block A1
            method["block_skip_condition"] = skip_conditions
        if options.refine_steps:
            method["refine_steps"] = options.refine_steps
        palu = PaluConfig(
            base_architecture=architecture, num_kv_heads=num_kv_heads, head_dim=head_dim, group_size=group_size,
            k_ranks=k_ranks, v_ranks=v_ranks, latent_layout=str(latent_layout),
            weight_dtype=_dtype_name(save_dtype), rotation=options.latent_rotation,
            kv_bias=model.model.layers[0].self_attn.k_proj.up.bias is not None, method=method,
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


def _layer_ranks(ranks: tuple[list[int], list[int]], shared: bool, hidden_size: int) -> tuple[list[int], list[int]]:
    """A strategy's K and V ranks as the layout stores them: a shared latent gets each layer's K + V budget."""
    k_ranks, v_ranks = ranks
    if not shared:
        return k_ranks, v_ranks
    ranks = [min(k + v, hidden_size) for k, v in zip(k_ranks, v_ranks)]  # a latent wider than x adds nothing
    return ranks, list(ranks)


def decompose_model(model: nn.Module, windows: torch.Tensor, k_ranks: list[int], v_ranks: list[int],
                    layout: LayerLayout, options: ConvertOptions,
                    device: torch.device) -> tuple[dict[str, list[float]], list[float]]:
    """Replace every layer's k_proj / v_proj by its factorization, in place. Returns per-layer relative errors
    (K and V on the calibration inputs; with ``--refine-steps`` also the attention output's), and with
    ``--block-skip`` per-layer condition numbers of the skipped blocks (else empty)."""
    method = DECOMPOSITIONS[options.decomposition]()
    shared = options.latent_layout == LatentLayout.SHARED
    # With --refine-steps, also the relative attention-output error of the SVD factors and of the refined ones.
    errors: dict[str, list[float]] = {"k": [], "v": []} | ({"attention_svd": [], "attention": []}
                                                          if options.refine_steps else {})
    conditions: list[float] = []
    batches = calibration.first_layer_inputs(model, windows, options.batch_size, device)
    for index, layer, gram in calibration.iterate_layers(model, batches, device,
                                                         record_attention=options.refine_steps > 0):
        attention = layer.self_attn
        weights = {kind: getattr(attention, f"{kind}_proj").weight.detach().double()
                   .view(layout.num_groups, layout.group_width, -1) for kind in "kv"}
        factors = _factorize_layer(method, weights, method.prepare(gram), k_ranks[index], v_ranks[index], options)
        keys = LowRankProjection.from_factors(attention.k_proj, factors["k"].down, factors["k"].up, device)
        values = (SharedValueProjection.from_factors(keys, attention.v_proj, factors["v"].up, device) if shared
                  else LowRankProjection.from_factors(attention.v_proj, factors["v"].down, factors["v"].up, device))
        attention.k_proj, attention.v_proj = keys, values
        if options.refine_steps:
            before, after = refine_attention(attention, batches, options.refine_steps)
            errors["attention_svd"].append(round(before, 6))
            errors["attention"].append(round(after, 6))
        if options.block_skip:  # after refining: skipping is exact, refining would undo its identity block
            conditions.append(round(_skip_blocks(attention), 2))
        for kind in "kv":
            errors[kind].append(round(relative_error(weights[kind], _installed_factors(attention, kind), gram), 6))
    return errors, conditions


def _factorize_layer(method, weights: dict[str, torch.Tensor], prepared, rank_k: int, rank_v: int,
                     options: ConvertOptions) -> dict[str, Factorization]:
    """K and V factors of one layer (float64): separate (split) or one latent for both (shared: [key_weight * W_k;
    W_v] factorized, then the weight undone on K's rows); rotated if asked (exact)."""
    if options.latent_layout == LatentLayout.SHARED:
        stacked = torch.cat((options.key_weight * weights["k"], weights["v"]), dim=1)
        both = _rotated(method.factorize(stacked, prepared, rank_k), options)
        width = weights["k"].shape[1]
        return {"k": Factorization(both.down, both.up[:, :width] / options.key_weight),
                "v": Factorization(both.down, both.up[:, width:])}
    return {kind: _rotated(method.factorize(weights[kind], prepared, rank), options)
            for kind, rank in (("k", rank_k), ("v", rank_v))}


def _rotated(factors: Factorization, options: ConvertOptions) -> Factorization:
    if options.latent_rotation == "none":
        return factors
    return Factorization(*rotate_factors(factors.down, factors.up, options.latent_rotation))


def _latent_sources(attention: nn.Module) -> list[tuple[LowRankProjection, list[nn.Module]]]:
    """Each down-projection of a layer with the up-projections that read its latent."""
    if isinstance(attention.v_proj, SharedValueProjection):
        return [(attention.k_proj, [attention.k_proj.up, attention.v_proj.up])]
    return [(attention.k_proj, [attention.k_proj.up]), (attention.v_proj, [attention.v_proj.up])]


def _installed_factors(attention: nn.Module, kind: str) -> Factorization:
    """The factors of k_proj or v_proj as installed (float64, per group)."""
    projection = getattr(attention, f"{kind}_proj")
    source = attention.k_proj if isinstance(projection, SharedValueProjection) else projection
    groups, _, rank = projection.up.weight.shape
    return Factorization(source.down.weight.detach().double().view(groups, rank, -1),
                         projection.up.weight.detach().double())


@torch.no_grad()
def _skip_blocks(attention: nn.Module) -> float:
    """Block skipping applied in place to each latent of the layer; returns the largest condition number."""
    worst = 0.0
    for source, ups in _latent_sources(attention):
        groups, _, rank = ups[0].weight.shape
        down = source.down.weight.double().view(groups, rank, -1)
        skipped = skip_block(Factorization(down, torch.cat([up.weight.double() for up in ups], dim=1)))
        source.down.weight.copy_(skipped.factors.down.reshape(source.down.weight.shape))
        for up, part in zip(ups, skipped.factors.up.split([up.weight.shape[1] for up in ups], dim=1)):
            up.weight.copy_(part)
        worst = max(worst, skipped.condition)
    return worst


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
    layout = ("Shared layout: one latent per group, both K and V rebuilt from it (K rank = V rank = its width)."
              if palu.shared else "Split layout: a K latent and a V latent per group.")
    return f"""# Palu checkpoint

Converted from `{source}` ({palu.base_architecture}) in {seconds:.0f} s.

| KV cache per token, all layers ({palu.weight_dtype}) | bytes |
|---|---|
| dense K+V | {dense:,} |
| Palu latents | {latent:,} |
| ratio | {latent / dense:.3f} ({dense / latent:.2f}x more tokens in the same memory) |

{palu.num_groups} latent group(s) of {palu.group_size} KV head(s) per layer; ranks are per group. {layout}
Method: `{json.dumps(palu.method)}`; latent rotation: {palu.rotation}
Calibration: `{json.dumps(palu.calibration)}`

| layer | K rank | V rank | K rel. error | V rel. error |
|---|---|---|---|---|
{rows}
"""
