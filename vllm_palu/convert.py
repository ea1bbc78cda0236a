"""``python -m vllm_palu.convert``: convert an HF checkpoint into a Palu checkpoint for vLLM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_palu.errors import PaluError


def build_parser() -> argparse.ArgumentParser:
    from vllm_palu.config import LATENT_ROTATIONS
    from vllm_palu.offline.converter import DEFAULT_K_FRACTION, DEFAULT_KEY_WEIGHT, DEFAULT_REFINE_STEPS

    parser = argparse.ArgumentParser(
        prog="python -m vllm_palu.convert",
        description="Factorize k_proj/v_proj per group of KV heads (whitened SVD) so that vLLM caches latents.")
    parser.add_argument("--model", required=True,
                        help="HF checkpoint directory (Llama, Mistral, Qwen2) or 'smollm2-135m' (embedded)")
    parser.add_argument("--output", required=True, type=Path, help="output directory (written atomically)")
    parser.add_argument("--kv-ratio", type=float, default=0.5,
                        help="kept latent width / original K+V width, in (0, 1] (default 0.5)")
    parser.add_argument("--k-fraction", type=float, default=DEFAULT_K_FRACTION,
                        help=f"share of the latent budget given to keys (default {DEFAULT_K_FRACTION})")
    parser.add_argument("--latent-layout", default="auto",
                        help="split: a K latent and a V latent per token and group (Palu); shared: one latent both "
                             "are rebuilt from, factorized from [W_k; W_v] (SkipCat's shared projection), caching "
                             "each layer's K + V budget as one latent. auto (default): the most accurate layout "
                             "measured whose key-rebuild work the decode kernel ran at dense speed on an H200 "
                             "(at most 40 FLOP per dense KV byte): split with the keys of all KV heads in one "
                             "group for SmolLM2, over groups of 2 for Llama-3-8B; --group-size 1 decodes fastest")
    parser.add_argument("--group-size", default="auto",
                        help="KV heads per latent group: an integer dividing the KV heads, 'all' = joint, or "
                             "auto (default, with --latent-layout: the widest group that stays servable)")
    parser.add_argument("--key-weight", type=float, default=DEFAULT_KEY_WEIGHT,
                        help="shared layout: weight of the keys' rows in the stacked factorization "
                             f"(default {DEFAULT_KEY_WEIGHT})")
    parser.add_argument("--block-skip", action="store_true",
                        help="re-base each latent on input channels picked by pivoted QR (SkipCat's block "
                             "skipping: the latent is x_P1 + A' x_P2); exact, off by default")
    parser.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS,
                        help="Adam steps per layer fitting the K/V factors to the attention output on the "
                             f"calibration set, starting from the SVD (default {DEFAULT_REFINE_STEPS}; 0: the SVD "
                             "factors, about 4x faster to convert on a CPU)")
    parser.add_argument("--rank-multiple", type=int, default=8, help="round ranks to this multiple (default 8)")
    parser.add_argument("--rank-alloc", default="uniform",
                        help="uniform (default), measured (optimal ranks for the loss increase measured by "
                             "truncating each k/v projection alone: 8 partial forwards per layer), fisher (Palu: "
                             "ranks proportional to the k/v Fisher scores) or flrc (greedy on Fisher-weighted SVD "
                             "error; fisher/flrc add a layer-by-layer Fisher pass). All but uniform ignore "
                             "--k-fraction. measured was best on SmolLM2 but its probe pass is slow on CPU, so "
                             "uniform stays the default (docs/RESULTS.md, 'Rank allocation')")
    parser.add_argument("--decomposition", default="whitened_svd", help="whitened_svd (default) or svd")
    parser.add_argument("--latent-rotation", default="none",
                        help="orthogonal rotation folded into each group's latent space, for quantized latents: "
                             f"{', '.join(LATENT_ROTATIONS)}. none (default); hadamard: Walsh-Hadamard, ranks 2^k*m use "
                             "H kron a seeded random orthogonal m x m; random: seeded random orthogonal. Exact in "
                             "full precision")
    parser.add_argument("--calib", help="plain-text calibration file (default: text sampled from the model)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for calibration and SVD")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_palu.offline.converter import ConvertOptions, convert

    options = ConvertOptions(**{k: v for k, v in vars(args).items()})
    try:
        output = convert(options)
    except PaluError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print((output / "PALU_SUMMARY.md").read_text())
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
