"""KV-cache capacity in tokens that vLLM allocates for a model at a fixed KV memory (VLLM_CPU_KVCACHE_SPACE GiB
on CPU). Usage: python scripts/kv_capacity.py MODEL_DIR [MODEL_DIR ...]  -> one JSON line per model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def capacity(model: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read the engine's cache config in this process
    from vllm import LLM

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=2048)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"model": model, "kv_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
            "blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "tokens": cache.num_gpu_blocks * cache.block_size}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print("CAPACITY " + json.dumps(capacity(sys.argv[2])), flush=True)
        os._exit(0)
    for model in sys.argv[1:]:  # a fresh process per model: engines do not release memory reliably
        out = subprocess.run([sys.executable, __file__, "--one", model], capture_output=True, text=True)
        print(next(line[9:] for line in out.stdout.splitlines() if line.startswith("CAPACITY ")), flush=True)
