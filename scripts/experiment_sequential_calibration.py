"""Experiment (docs/RESULTS.md section 4), not part of the converter: sequential, error-correcting calibration.

Runs `python -m vllm_palu.eval ARGS` with the converter's decomposition pass replaced: every layer is calibrated on
the activations of the already-compressed layers before it (X~), and k/v are fitted to the original outputs:
W' = W C G~^-1 with C = X^T X~, G~ = X~^T X~, then whitened SVD of W' with G~ (optimal for ||X W^T - X~ W'_r^T||).
Use a separate --output (the checkpoint names are the converter's).
"""
import sys, torch
torch.set_num_threads(2)
from torch import nn
from vllm_palu import eval as ev
from vllm_palu.offline import converter, calibration
from vllm_palu.offline.decompositions import DECOMPOSITIONS, relative_error
from vllm_palu.offline.lowrank import LowRankProjection


@torch.no_grad()
def decompose_seq(model, windows, k_ranks, v_ranks, layout, options, device):
    method = DECOMPOSITIONS[options.decomposition]()
    errors = {"k": [], "v": []}
    orig = calibration.first_layer_inputs(model, windows, options.batch_size, device)
    comp = calibration.first_layer_inputs(model, windows, options.batch_size, device)
    layers = model.model.layers
    for index in range(len(layers)):
        layer = layers[index].to(device)
        n = layer.self_attn.k_proj.in_features
        gram_c = torch.zeros(n, n, dtype=torch.float64); cross = torch.zeros_like(gram_c)
        for b, c in zip(orig, comp):
            x = layer.input_layernorm(b.hidden).reshape(-1, n).double()
            xc = layer.input_layernorm(c.hidden).reshape(-1, n).double()
            gram_c += xc.T @ xc; cross += x.T @ xc
        for b in orig:  # original stream through the dense layer
            out = layer(b.hidden, **b.kwargs); b.hidden = out[0] if isinstance(out, tuple) else out
        prepared = method.prepare(gram_c)
        ridge = 1e-6 * gram_c.diagonal().mean() * torch.eye(n, dtype=torch.float64)
        correction = torch.linalg.solve(gram_c + ridge, cross.T).T  # C G~^-1
        for kind, rank in (("k", k_ranks[index]), ("v", v_ranks[index])):
            dense = getattr(layer.self_attn, f"{kind}_proj")
            weight = dense.weight.detach().double()
            target = (weight @ correction).view(layout.num_groups, layout.group_width, -1)
            factors = method.factorize(target, prepared, rank)
            errors[kind].append(round(relative_error(target, factors, gram_c), 6))
            setattr(layer.self_attn, f"{kind}_proj",
                    LowRankProjection.from_factors(dense, factors.down, factors.up, device))
        for c in comp:  # compressed stream through the compressed layer
            out = layer(c.hidden, **c.kwargs); c.hidden = out[0] if isinstance(out, tuple) else out
        layers[index] = layer.to("cpu")
    return errors


converter.decompose_model = decompose_seq
sys.exit(ev.main(sys.argv[1:]))
