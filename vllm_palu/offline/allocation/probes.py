"""Measured sensitivity: the actual damage of truncating one projection, one forward pass per probe.

For every layer and each of k_proj / v_proj, the projection (all groups of the layer) is replaced by its
factorization at a few probe ranks while the rest of the model stays at full precision, and the calibration
loss increase is measured on a few probe windows. The signal is the KL divergence from the original model's
next-token distribution (the expected loss increase under the original model's predictions): it is never
negative and far less noisy on a few thousand tokens than the difference of two cross-entropies, whose first-order
term has zero mean but large variance. The cross-entropy increase is kept alongside for the record.

Between probes the curve is interpolated in the projection's activation-weighted truncation error (a KL is
second order in the output perturbation, so to first approximation linear in that error energy): the spectrum
gives the shape, the probes the scale. Full rank is 0 by construction.

Layer-wise like the converter: the Gram pass walks the layers one on the device at a time; the probe of layer l
runs layers l..L-1 from the stored input of layer l (moved to the device one at a time) plus the LM head. Memory
beyond the converter's: the probe windows' current layer boundary and the original log-probabilities of the probe
tokens (Llama-3-8B, 4 x 512 probe tokens: 2,048 x 128,256 fp32 = 1.05 GB CPU). Cost: ``len(probe ranks) x 2 x
num_layers`` partial forwards of the probe tokens (SmolLM2: 240 of 2,048 tokens; Llama-3-8B: 256, each the rest of
the model's weights once through the device when they do not fit it).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vllm_palu.offline import calibration
from vllm_palu.offline.allocation.base import LayerLayout, Sensitivity
from vllm_palu.offline.decompositions import DECOMPOSITIONS, relative_error

KINDS = ("k", "v")
PROBE_SAMPLES = 4  # calibration windows scored by every probe (the first ones of the calibration set)
# Probe ranks as fractions of the group width (SmolLM2 joint, width 192: 16, 32, 64, 128), rounded to PROBE_STEP.
PROBE_FRACTIONS = (1 / 12, 1 / 6, 1 / 3, 2 / 3)
PROBE_STEP = 8  # the truncation error is evaluated on this rank grid, linear in between
GRAM_BATCH = 8  # calibration windows per forward in the Gram pass (the converter's default --batch-size)
_MEMO: dict[tuple, tuple[Sensitivity, float]] = {}


@dataclass
class ProbeRecord:
    """What one projection's probes measured: rank -> (KL, cross-entropy increase), and its truncation error."""

    kl: dict[int, float]
    ce: dict[int, float]
    error: list[float]  # squared relative truncation error for every rank 0..width


def probe_ranks(width: int) -> list[int]:
    step = PROBE_STEP if width > 2 * PROBE_STEP else 1
    ranks = {max(step, int(width * f / step + 0.5) * step) for f in PROBE_FRACTIONS}
    return sorted(r for r in ranks if 0 < r < width)


def measure(model: nn.Module, windows: torch.Tensor, layout: LayerLayout, device: torch.device,
            decomposition: str = "whitened_svd", key: str | None = None) -> tuple[Sensitivity, float]:
    """(measured loss curves, seconds the probes took); memoized within the process when ``key`` names the model,
    so a sweep over kv-ratios probes once."""
    memo_key = None
    if key is not None:
        digest = hashlib.sha1(windows.numpy().tobytes()).hexdigest()
        memo_key = (key, digest, layout, str(device), decomposition)
        if memo_key in _MEMO:
            return _MEMO[memo_key]
    started = time.monotonic()
    records = probe(model, windows, layout, device, decomposition)
    curves = {kind: [curve_from_probes(r, layout.group_width) for r in records[kind]] for kind in KINDS}
    result = (Sensitivity(fisher={}, loss_curves=curves, probes=records), time.monotonic() - started)
    if memo_key is not None:
        _MEMO[memo_key] = result
    return result


def curve_from_probes(record: ProbeRecord, width: int) -> list[float]:
    """Loss increase for every rank 0..width: piecewise linear in the truncation error between probes (and full
    rank, 0), extrapolated below the smallest probe along the steeper of its segment and the ratio to its error;
    then made non-increasing in rank."""
    points = sorted(record.kl.items()) + [(width, 0.0)]
    error = record.error
    curve = []
    for r in range(width + 1):
        upper = next(i for i, (p, _) in enumerate(points) if p >= r)
        if points[upper][0] == r:
            curve.append(points[upper][1])
            continue
        if upper == 0:  # below the smallest probe
            (a, la), (b, lb) = points[0], points[1]
            slope = (la - lb) / max(error[a] - error[b], 1e-30)
            by_slope = la + slope * (error[r] - error[a])
            by_ratio = la * error[r] / max(error[a], 1e-30)
            curve.append(max(by_slope, by_ratio))
            continue
        (a, la), (b, lb) = points[upper - 1], points[upper]
        span = error[a] - error[b]
        t = (error[a] - error[r]) / span if span > 1e-30 else (r - a) / (b - a)
        curve.append(la + (lb - la) * min(max(t, 0.0), 1.0))
    for r in range(width - 1, -1, -1):  # non-increasing: more rank never costs more
        curve[r] = max(curve[r], curve[r + 1])
    return curve


@torch.no_grad()
def probe(model: nn.Module, windows: torch.Tensor, layout: LayerLayout, device: torch.device,
          decomposition: str) -> dict[str, list[ProbeRecord]]:
    """Walk the layers with the converter's Gram pass; at each, probe k_proj and v_proj at every probe rank."""
    method = DECOMPOSITIONS[decomposition]()
    samples = windows[:PROBE_SAMPLES]
    (batch,) = calibration.first_layer_inputs(model, samples, samples.shape[0], device)
    reference = _log_probs(model, _rest(model, 0, batch), device)
    targets = samples[:, 1:].reshape(-1).to(device)
    reference_ce = float(F.nll_loss(reference, targets))
    ranks = probe_ranks(layout.group_width)
    records: dict[str, list[ProbeRecord]] = {kind: [] for kind in KINDS}
    calib_batches = calibration.first_layer_inputs(model, windows, GRAM_BATCH, device)
    layers = model.model.layers
    progress = tqdm(total=len(layers) * len(KINDS) * len(ranks), desc="measured: probes", unit="probe")
    for index, layer, gram in calibration.iterate_layers(model, calib_batches, device, desc="measured: layers"):
        prepared = method.prepare(gram)
        for kind in KINDS:
            proj: nn.Linear = getattr(layer.self_attn, f"{kind}_proj")
            dense = proj.weight.data
            weight = dense.double().view(layout.num_groups, layout.group_width, -1)
            record = ProbeRecord(kl={}, ce={}, error=_error_grid(method, weight, prepared, gram, layout.group_width))
            for rank in ranks:
                factors = method.factorize(weight, prepared, rank)
                proj.weight.data = (factors.up @ factors.down).reshape(dense.shape).to(dense.dtype)
                try:
                    log_probs = _log_probs(model, _rest(model, index, batch), device)
                finally:
                    proj.weight.data = dense
                kl = F.kl_div(log_probs, reference, log_target=True, reduction="sum") / reference.shape[0]
                record.kl[rank] = max(float(kl), 0.0)
                record.ce[rank] = float(F.nll_loss(log_probs, targets)) - reference_ce
                progress.update()
            records[kind].append(record)
        out = layer(batch.hidden, **batch.kwargs)  # the probe windows move on through the original layer
        batch.hidden = out[0] if isinstance(out, tuple) else out
    progress.close()
    return records


def _error_grid(method, weight: torch.Tensor, prepared, gram: torch.Tensor, width: int) -> list[float]:
    """Squared relative truncation error at every rank, factorized on a PROBE_STEP grid and linear in between."""
    grid = sorted(set(range(0, width, PROBE_STEP)) | {width})
    values = [1.0 if r == 0 else relative_error(weight, method.factorize(weight, prepared, r), gram) ** 2
              for r in grid]
    errors = []
    for r in range(width + 1):
        upper = next(i for i, p in enumerate(grid) if p >= r)
        if grid[upper] == r:
            errors.append(values[upper])
        else:
            a, b = grid[upper - 1], grid[upper]
            errors.append(values[upper - 1] + (values[upper] - values[upper - 1]) * (r - a) / (b - a))
    return errors


def _rest(model: nn.Module, start: int, batch: calibration.LayerBatch) -> torch.Tensor:
    """Run decoder layers ``start..`` on the batch's hidden states (the caller has layer ``start`` on the device
    when it is the layer being decomposed; the others come to the device one at a time and go back)."""
    hidden = batch.hidden
    device = hidden.device
    for index, layer in enumerate(model.model.layers[start:], start):
        home = next(layer.parameters()).device
        layer.to(device)
        out = layer(hidden, **batch.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        layer.to(home)
    return hidden


def _log_probs(model: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Next-token log-probabilities of every scored position, ``[tokens, vocab]`` fp32."""
    norm, head = model.model.norm, model.get_output_embeddings()
    norm.to(device)
    head.to(device)
    try:
        logits = head(norm(hidden))[:, :-1].float()
    finally:
        norm.to("cpu")
        head.to("cpu")
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
