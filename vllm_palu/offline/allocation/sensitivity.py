"""Calibration statistics for the sensitivity-based allocations, measured layer by layer.

One forward pass walks the decoder layers in order (one layer on the device at a time, as the converter does),
keeping every layer boundary's activations on the CPU and the Gram matrix of the k/v input; the whitened SVD of
k_proj / v_proj gives each projection's spectrum. Then a backward pass walks the layers in reverse, one on the
device at a time: it recomputes the layer from its stored input, back-propagates the gradient of the LM loss
(mean cross-entropy of each calibration window, one window at a time so that squared gradients are per sample),
and accumulates the squared gradients of the k/v weights (Palu's Fisher score) and of the k/v outputs (the
diagonal output Fisher that weights the SVD tails). Only k_proj / v_proj weights ever require gradients; no
optimizer state, no whole-model graph: device memory is one layer plus one window's activations, so 7B-8B models
fit one GPU. CPU memory holds ``num_layers + 1`` boundaries of ``samples x seq_len x hidden`` floats.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vllm_palu.offline import calibration
from vllm_palu.offline.allocation.base import LayerLayout, Sensitivity
from vllm_palu.offline.decompositions.whitened_svd import whitening_factor

KINDS = ("k", "v")
# In-process memo: a frontier sweep converts the same model with the same calibration windows many times.
_MEMO: dict[tuple, tuple[Sensitivity, float]] = {}


def measure(model: nn.Module, windows: torch.Tensor, layout: LayerLayout, device: torch.device,
            key: str | None = None) -> tuple[Sensitivity, float]:
    """(statistics, seconds it took to measure them). ``key`` names the model for the in-process memo (then the
    seconds are those of the first measurement)."""
    memo_key = None
    if key is not None:
        digest = hashlib.sha1(windows.numpy().tobytes()).hexdigest()
        memo_key = (key, digest, layout, str(device))
        if memo_key in _MEMO:
            return _MEMO[memo_key]
    started = time.monotonic()
    stats = _measure(model, windows, layout, device)
    result = (stats, time.monotonic() - started)
    if memo_key is not None:
        _MEMO[memo_key] = result
    return result


def _measure(model: nn.Module, windows: torch.Tensor, layout: LayerLayout, device: torch.device) -> Sensitivity:
    layers = model.model.layers
    batches = calibration.first_layer_inputs(model, windows, 1, device)  # one window per batch: per-sample grads
    inputs = [[b.hidden.cpu() for b in batches]]
    spectra: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for index, layer, gram in calibration.iterate_layers(model, batches, device, desc="sensitivity: forward"):
        inputs.append([b.hidden.cpu() for b in batches])
        factor = whitening_factor(gram)
        spectra.append({})
        for kind in KINDS:
            weight = getattr(layer.self_attn, f"{kind}_proj").weight.detach().double()
            u, sigma, _ = torch.linalg.svd(weight.view(layout.num_groups, layout.group_width, -1) @ factor,
                                           full_matrices=False)
            spectra[-1][kind] = (u.cpu(), sigma.cpu())
    tokens = windows.numel()

    weight_sq = {kind: [None] * len(layers) for kind in KINDS}
    output_sq = {kind: [None] * len(layers) for kind in KINDS}
    with torch.enable_grad():
        grads = _loss_gradients(model, inputs[-1], windows, device)
        for index in tqdm(reversed(range(len(layers))), total=len(layers), desc="sensitivity: backward",
                          unit="layer"):
            layer = layers[index].to(device)
            grads = _layer_backward(layer, index, inputs[index], grads, batches, weight_sq, output_sq, device)
            layers[index] = layer.to("cpu")
            inputs[index + 1] = None  # free the boundary we no longer need

    fisher: dict[str, list[float]] = {kind: [] for kind in KINDS}
    curves: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}
    samples = windows.shape[0]
    for index in range(len(layers)):
        for kind in KINDS:
            fisher[kind].append(float((weight_sq[kind][index] / samples).sqrt().mean()))
            u, sigma = spectra[index][kind]
            out_fisher = (output_sq[kind][index] / tokens).view(layout.num_groups, layout.group_width, 1)
            # Loss share of singular direction i of group g: sigma_i^2 * sum_o F_o U_oi^2.
            weights = (sigma ** 2) * (out_fisher * u ** 2).sum(dim=1)  # [groups, width]
            per_rank = weights.sum(dim=0) / tokens
            tail = torch.flip(torch.cumsum(torch.flip(per_rank, [0]), 0), [0])  # tail[r] = sum_{i>=r}
            curves[kind].append([float(x) for x in tail] + [0.0])
    return Sensitivity(fisher=fisher, loss_curves=curves)


def _loss_gradients(model: nn.Module, hidden: list[torch.Tensor], windows: torch.Tensor,
                    device: torch.device) -> list[torch.Tensor]:
    """Gradient of each window's mean next-token cross-entropy w.r.t. the last decoder layer's output."""
    norm, head = model.model.norm.to(device), model.get_output_embeddings().to(device)
    params = [p for module in (norm, head) for p in module.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    grads = []
    try:
        for h, ids in zip(hidden, windows):
            h = h.to(device).requires_grad_(True)
            logits = head(norm(h))[0, :-1].float()
            F.cross_entropy(logits, ids[1:].to(device)).backward()
            grads.append(h.grad.cpu())
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        model.model.norm.to("cpu")
        model.get_output_embeddings().to("cpu")
    return grads


def _layer_backward(layer: nn.Module, index: int, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    batches: list[calibration.LayerBatch], weight_sq: dict, output_sq: dict,
                    device: torch.device) -> list[torch.Tensor]:
    """Recompute one layer per window and back-propagate; accumulates squared k/v weight and output gradients.
    Returns the gradients w.r.t. the layer's inputs."""
    params = list(layer.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    projections = {kind: getattr(layer.self_attn, f"{kind}_proj") for kind in KINDS}
    for kind, proj in projections.items():
        proj.weight.requires_grad_(True)
        weight_sq[kind][index] = torch.zeros_like(proj.weight, dtype=torch.float64)
        output_sq[kind][index] = torch.zeros(proj.out_features, dtype=torch.float64, device=device)

    def output_hook(kind):
        def accumulate(grad: torch.Tensor) -> None:
            output_sq[kind][index].add_(grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0))

        def hook(module, args, output):
            output.register_hook(accumulate)
        return hook

    handles = [proj.register_forward_hook(output_hook(kind)) for kind, proj in projections.items()]
    new_grads = []
    try:
        for h, g, batch in zip(inputs, grads, batches):
            h = h.to(device).requires_grad_(True)
            out = layer(h, **batch.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(g.to(device))
            for kind, proj in projections.items():
                weight_sq[kind][index] += proj.weight.grad.double().pow(2)
                proj.weight.grad = None
            new_grads.append(h.grad.cpu())
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    for kind in KINDS:
        weight_sq[kind][index] = weight_sq[kind][index].cpu()
        output_sq[kind][index] = output_sq[kind][index].cpu()
    return new_grads
