"""Factors fitted to what attention sees (``--refine-steps``).

The whitened SVD minimizes each projection's error on the layer input, ``||(W - UD) X^T||``, for K and V
separately. What the model consumes is the attention output: keys only matter through the softmax of
``q . RoPE(k)``, values through the attention-weighted sum. Starting from the SVD factors, Adam fits every factor of
one layer's K/V path (down- and up-projections and biases; the shared latent's one down-projection) to
``||attn(x) - attn_original(x)||^2 / ||attn_original(x)||^2`` over the calibration batches, in fp32, with the rest
of the model frozen. Layer by layer, on the device that holds the layer: the memory is one layer and its
calibration activations (``record_attention`` of :func:`vllm_palu.offline.calibration.iterate_layers`).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_palu.offline.calibration import LayerBatch

LEARNING_RATE = 1e-4  # Adam's step, relative to factor entries of ~1e-2 to 1e-1


def attention_error(attention: nn.Module, batches: list[LayerBatch]) -> float:
    """Relative attention-output error over the batches (the refinement's objective)."""
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            output = attention(batch.attention_input, **batch.attention_kwargs)[0]
            num += float((output - batch.attention_output).square().sum())
            den += float(batch.attention_output.square().sum())
    return (num / den) ** 0.5


def refine_attention(attention: nn.Module, batches: list[LayerBatch], steps: int,
                     learning_rate: float = LEARNING_RATE) -> tuple[float, float]:
    """Fit ``attention.k_proj`` / ``v_proj``'s factors for ``steps`` Adam steps, cycling through ``batches``;
    returns the relative attention-output error before and after."""
    factors = list(attention.k_proj.parameters()) + list(attention.v_proj.parameters())
    frozen = [param for param in attention.parameters() if all(param is not f for f in factors)]
    before = attention_error(attention, batches)
    start = [param.detach().clone() for param in factors]
    optimizer = torch.optim.Adam(factors, lr=learning_rate)
    states = [param.requires_grad for param in frozen]
    for param in frozen:
        param.requires_grad_(False)
    try:
        with torch.enable_grad():
            for param in factors:
                param.requires_grad_(True)
            for step in range(steps):
                batch = batches[step % len(batches)]
                target = batch.attention_output
                output = attention(batch.attention_input, **batch.attention_kwargs)[0]
                loss = (output - target).square().sum() / target.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for param, state in zip(frozen, states):
            param.requires_grad_(state)
        for param in factors:
            param.requires_grad_(False)
    after = attention_error(attention, batches)
    if after > before:  # never return worse factors than the SVD's
        with torch.no_grad():
            for param, value in zip(factors, start):
                param.copy_(value)
        after = before
    return before, after
