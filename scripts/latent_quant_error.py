"""Relative error that latent quantization adds to the reconstructed keys and values of a Palu checkpoint, with
and without a latent rotation applied on the fly (a cheap proxy for the perplexity runs).
Usage: python scripts/latent_quant_error.py PALU_DIR TEXT_FILE [TOKENS]  -> one JSON line per (latent format, rotation)."""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoTokenizer

from vllm_palu.attention.latent_quant import fake_quant_latent
from vllm_palu.offline.checkpoint import load_palu_model
from vllm_palu.offline.lowrank import LowRankProjection
from vllm_palu.offline.perplexity import tokenize_file
from vllm_palu.offline.rotation import rotation_matrix


def main(model_dir: str, text: str, tokens: int = 1024) -> None:
    model = load_palu_model(model_dir)
    ids = tokenize_file(AutoTokenizer.from_pretrained(model_dir), text, tokens)
    captured: list[tuple[LowRankProjection, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, LowRankProjection):
            module.latent_hook = lambda latent, module=module: captured.append((module, latent.detach())) or latent
    with torch.no_grad():
        model(ids[None], use_cache=False)
    for latent_format in ("fp8", "int4"):
        for rotation in ("none", "hadamard", "random"):
            num = den = 0.0
            for module, latent in captured:
                groups, rank = module.up.num_groups, module.rank
                grouped = latent[0].unflatten(-1, (groups, rank)).double()
                matrix = rotation_matrix(rotation, rank)
                rotated = grouped @ matrix.T
                restored = fake_quant_latent(rotated.float(), latent_format).double() @ matrix
                # Error in the reconstructed K/V (up-projection applied), relative to the exact reconstruction.
                up = module.up.weight.detach().double()
                exact = torch.einsum("tgr,gor->tgo", grouped, up)
                num += float((torch.einsum("tgr,gor->tgo", restored - grouped, up)).square().sum())
                den += float(exact.square().sum())
            print(json.dumps({"model": model_dir, "latent_format": latent_format, "rotation": rotation,
                              "relative_kv_error": round((num / den) ** 0.5, 5)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
