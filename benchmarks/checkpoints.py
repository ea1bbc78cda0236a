"""Config-only checkpoints for serving benchmarks: a dense model or its Palu conversion, no weights (vLLM serves
them with ``--load-format dummy``), and a word-level tokenizer under which random token ids round-trip exactly
through decode and encode (vLLM's random dataset decodes random ids to text and re-encodes them).

    python -m benchmarks.checkpoints --shape llama3-8b --out DIR [--kv-ratio 0.5] [--dtype bfloat16]

The Palu ranks are those ``python -m vllm_palu.convert --rank-alloc uniform`` would store for the same budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: the repository root goes first on the path (the benchmarks import each other as
    # benchmarks.*), not benchmarks/ itself, whose module names could shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from vllm_palu.config import DTYPE_BYTES, PALU_ARCHITECTURES, PaluConfig
from vllm_palu.offline.allocation.base import LayerLayout, RankBudget
from vllm_palu.offline.allocation.uniform import UniformAllocation
from vllm_palu.offline.checkpoint import atomic_directory
from vllm_palu.offline.converter import DEFAULT_K_FRACTION

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    dtype: str
    rope_scaling: dict | None = None  # transformers' rope_parameters beyond rope_type default

    def dense_kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        per_value = DTYPE_BYTES[self.dtype] if dtype_bytes is None else dtype_bytes
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * per_value


SHAPES = {
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128, 128256, 131072, 500000.0, "bfloat16",
                       {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}),
    "llama2-7b": Shape(4096, 11008, 32, 32, 32, 128, 32000, 32768, 10000.0, "bfloat16"),
    # CPU tests: the smallest Llama vLLM's CPU attention runs (head_dim >= 32); float32 on CPU.
    "tiny": Shape(128, 256, 2, 4, 2, 32, 1024, 4096, 10000.0, "float32"),
}


def get_shape(name: str, dtype: str | None = None) -> Shape:
    if name not in SHAPES:
        raise SystemExit(f"error: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    shape = SHAPES[name]
    if dtype is not None:
        if dtype not in DTYPE_BYTES:
            raise SystemExit(f"error: unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
        shape = replace(shape, dtype=dtype)
    return shape


def checkpoint_root(shape_name: str, dtype: str, root: Path | None = None) -> Path:
    """Where the benchmarks keep their config-only checkpoints: outside the results (the llama3-8b tokenizer alone
    is 3 MB) unless a root is given."""
    import tempfile

    return (root or Path(tempfile.gettempdir()) / "palu-bench-checkpoints") / f"{shape_name}-{dtype}"


def tokenizer_words(shape: Shape) -> int:
    """Plain words of the tokenizer: the whole model vocabulary minus the special tokens, so every id the model
    can generate also decodes (the HTTP server detokenizes what it returns)."""
    return shape.vocab_size - len(SPECIAL_TOKENS)


def palu_config(shape: Shape, kv_ratio: float, group_size: int = 1, k_fraction: float = DEFAULT_K_FRACTION,
                rank_multiple: int = 8) -> PaluConfig:
    """The palu section the converter would write for this shape with --rank-alloc uniform."""
    if group_size < 1 or shape.num_kv_heads % group_size:
        raise SystemExit(f"error: group size {group_size} must divide the {shape.num_kv_heads} KV heads")
    layout = LayerLayout(shape.num_layers, shape.num_kv_heads // group_size, group_size * shape.head_dim)
    budget = RankBudget(kv_ratio, k_fraction, rank_multiple)
    k_ranks, v_ranks = UniformAllocation().allocate(layout, budget)
    return PaluConfig(
        base_architecture="LlamaForCausalLM", num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        group_size=group_size, k_ranks=k_ranks, v_ranks=v_ranks, weight_dtype=shape.dtype,
        method={"decomposition": "none (dummy weights, config only)", "rank_alloc": "uniform", "kv_ratio": kv_ratio,
                "k_fraction": k_fraction, "rank_multiple": rank_multiple, "allocation_seconds": 0.0})


def hf_config(shape: Shape, bos_id: int, eos_id: int, directory: Path) -> dict:
    """config.json as transformers saves it (what a real checkpoint of this shape carries)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    rope.update(shape.rope_scaling or {})
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=1e-5, rope_parameters=rope,
        bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False, dtype=shape.dtype)
    config.save_pretrained(directory)
    return json.loads((directory / "config.json").read_text())


def write_tokenizer(shape: Shape, directory: Path):
    """Word-level vocabulary "w0".."w{N-1}" then the special tokens; whitespace-split, so decode(ids) is the words
    joined by spaces and encode gives the same ids back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = tokenizer_words(shape)
    if words < 2:
        raise SystemExit(f"error: vocabulary {shape.vocab_size} too small for a tokenizer")
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({token: words + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_max_length=shape.max_position_embeddings)
    fast.save_pretrained(directory)
    return fast


def build(shape: str | Shape, directory: str | Path, kv_ratio: float | None = None, group_size: int = 1,
          k_fraction: float = DEFAULT_K_FRACTION, rank_multiple: int = 8, dtype: str | None = None) -> Path:
    """Write a config-only checkpoint (replacing ``directory`` atomically): dense when ``kv_ratio`` is None, else a
    Palu checkpoint at that ratio. Prints one PALU_SUMMARY line."""
    shape = get_shape(shape, dtype) if isinstance(shape, str) else shape
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    palu = None if kv_ratio is None else palu_config(shape, kv_ratio, group_size, k_fraction, rank_multiple)
    with atomic_directory(directory, force=True) as staging:
        tokenizer = write_tokenizer(shape, staging)
        config = hf_config(shape, tokenizer.bos_token_id, tokenizer.eos_token_id, staging)
        config["architectures"] = ["LlamaForCausalLM" if palu is None else PALU_ARCHITECTURES["LlamaForCausalLM"]]
        if palu is not None:
            config["palu"] = palu.to_dict()
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(summary_line(shape, directory, palu), flush=True)
    return directory


def summary_line(shape: Shape, directory: Path, palu: PaluConfig | None) -> str:
    dense = shape.dense_kv_bytes_per_token()
    if palu is None:
        return f"PALU_SUMMARY {directory.name}: dense, {dense} KV bytes/token ({shape.dtype})"
    latent = palu.latent_bytes_per_token()
    return (f"PALU_SUMMARY {directory.name}: kv-ratio {palu.kv_ratio:.4f}, group size {palu.group_size}, "
            f"ranks k {sorted(set(palu.k_ranks))} v {sorted(set(palu.v_ranks))}, {latent} latent bytes/token vs "
            f"{dense} dense ({shape.dtype}; {dense / latent:.2f}x tokens in the same memory)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kv-ratio", type=float, default=None, help="omit for the dense model")
    parser.add_argument("--group-size", type=int, default=1)
    parser.add_argument("--k-fraction", type=float, default=DEFAULT_K_FRACTION)
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="default: the shape's (bfloat16; tiny: float32)")
    args = parser.parse_args(argv)
    build(args.shape, args.out, args.kv_ratio, args.group_size, args.k_fraction, args.rank_multiple, args.dtype)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # noqa: BLE001 - one line for the user, not a traceback
        sys.exit(f"error: {error}")
