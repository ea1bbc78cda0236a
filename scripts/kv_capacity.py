"""KV-cache capacity in tokens that vLLM allocates for a model at a fixed KV memory (VLLM_CPU_KVCACHE_SPACE GiB
on CPU). Usage: python scripts/kv_capacity.py [--kv-cache-dtype DTYPE] MODEL_DIR [MODEL_DIR ...]
-> one JSON line per model. ``--kv-cache-dtype fp8`` / ``int4_per_token_head`` store Palu latents quantized."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def capacity(model: str, kv_cache_dtype: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read the engine's cache config in this process
    from vllm import LLM

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=2048, kv_cache_dtype=kv_cache_dtype)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"model": model, "kv_cache_dtype": kv_cache_dtype,
            "kv_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]), "blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size, "tokens": cache.num_gpu_blocks * cache.block_size}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print("CAPACITY " + json.dumps(capacity(sys.argv[2], sys.argv[3])), flush=True)
        os._exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    for model in args.models:  # a fresh process per model: engines do not release memory reliably
        out = subprocess.run([sys.executable, __file__, "--one", model, args.kv_cache_dtype], capture_output=True,
                             text=True)
        lines = [line[9:] for line in out.stdout.splitlines() if line.startswith("CAPACITY ")]
        print(lines[0] if lines else f"{model}: failed\n{out.stderr[-2000:]}", flush=True)
