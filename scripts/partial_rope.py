"""What the partial-RoPE approximation costs in perplexity (the decode-kernel issue's "also worth trying", after
MHA2MLA / TransMLA): RoPE pairs whose angle barely moves over the context are treated as not rotating, so their
key dimensions could be absorbed into the query (``(U_S^T q_S) . latent``) instead of being rebuilt and rotated for
every cached token. Measured here by giving the ``--pairs`` lowest-frequency pairs frequency 0 (cos 1, sin 0) in
the model's rotary embedding, dense and (``--palu DIR``) a Palu checkpoint, on non-overlapping windows of
``--seq-len`` tokens; prints a markdown table with each setting's largest dropped angle over a window and the share
of the key rebuild it would save.

Usage: python scripts/partial_rope.py --model smollm2-135m --data ../shared/data/wikitext2/eval.txt
           [--palu DIR] [--pairs 0,2,4,8,12,16] [--seq-len 1024] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from vllm_palu.offline.checkpoint import load_dense_model, load_palu_model
from vllm_palu.offline.perplexity import perplexity, tokenize_file
from vllm_palu.offline.smollm2 import resolve_model


def rotary_module(model):
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise SystemExit("error: the model has no rotary embedding with an inv_freq buffer (transformers' Llama)")
    return rotary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dense checkpoint (or smollm2-135m)")
    parser.add_argument("--palu", help="a Palu checkpoint of that model, measured the same way")
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", default="0,2,4,8,12,16", help="lowest-frequency pairs treated as not rotating")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    dense_dir = resolve_model(args.model)
    ids = tokenize_file(AutoTokenizer.from_pretrained(dense_dir), args.data, args.max_tokens)
    models = {"dense": load_dense_model(dense_dir)}
    if args.palu:
        models["palu"] = load_palu_model(args.palu)
    rows = []
    for name, model in models.items():
        rotary = rotary_module(model)
        original = rotary.inv_freq.clone()
        half = original.numel()
        for pairs in map(int, args.pairs.split(",")):
            frequencies = original.clone()
            order = torch.argsort(original)  # lowest frequencies first
            frequencies[order[:pairs]] = 0.0
            rotary.inv_freq.copy_(frequencies)
            angle = float(original[order[pairs - 1]]) * (args.seq_len - 1) if pairs else 0.0
            result = perplexity(model, ids, args.seq_len, desc=f"{name} {pairs} pairs")
            rows.append((name, pairs, angle, 2 * pairs / (2 * half), result.ppl))
            print(f"{name}: {pairs} pairs not rotating (largest angle {angle:.3f} rad over a window): "
                  f"ppl {result.ppl:.3f}", flush=True)
        rotary.inv_freq.copy_(original)
    base = {name: ppl for name, pairs, _, _, ppl in rows if pairs == 0}
    print(f"\n{len(ids)} tokens of {args.data}, windows of {args.seq_len}\n")
    print("| model | pairs not rotating | largest dropped angle over a window | key dims absorbed | ppl | vs 0 pairs |")
    print("|---|---|---|---|---|---|")
    for name, pairs, angle, share, ppl in rows:
        print(f"| {name} | {pairs} | {angle:.3f} rad | {share:.1%} | {ppl:.3f} | {ppl / base[name] - 1:+.2%} |")


if __name__ == "__main__":
    main()
