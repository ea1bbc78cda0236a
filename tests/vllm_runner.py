"""Run vLLM's offline ``LLM`` in a fresh process (as a user's script would) and print one JSON line of results.

    python tests/vllm_runner.py '{"model": DIR, "llm": {...}, "prompts": [...], "max_tokens": 32, ...}'

Keys: ``prompts`` (strings or token-id lists), ``max_tokens``, ``prompt_logprobs`` (int), ``logprobs`` (top-n of each
generated token), ``repeat`` (generate the same prompts again: prefix-cache hits), ``corrupt_cache`` (fill every KV
cache with noise before repeating), ``score`` (token-id sequences, or "own" for each prompt followed by its greedy
continuation: the logprob of every token after the first, teacher-forced), ``inspect`` (report the KV-cache tensors
and the CUDA-graph mode). Engine core runs in-process so the worker's caches are reachable.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")


def describe_caches(worker):
    from vllm_palu.attention.layer import PaluAttentionLayer

    context = worker.vllm_config.compilation_config.static_forward_context
    rows = []
    for name, layer in sorted(context.items()):
        cache = getattr(layer, "kv_cache", None)
        if cache is None or cache.numel() == 0:
            continue
        rows.append({"name": name, "palu": isinstance(layer, PaluAttentionLayer), "shape": list(cache.shape),
                     "dtype": str(cache.dtype), "page_bytes": cache[0].numel() * cache.element_size()})
    return rows


def corrupt_caches(worker):
    import torch

    generator = torch.Generator().manual_seed(0)
    for layer in worker.vllm_config.compilation_config.static_forward_context.values():
        cache = getattr(layer, "kv_cache", None)
        if cache is not None and cache.numel():
            cache.copy_(torch.randn(cache.shape, generator=generator, dtype=torch.float32).to(cache.dtype))
    return True


def describe_engine(worker):
    """How the worker runs the model: the CUDA-graph mode vLLM settled on and the graphs it captured."""
    from vllm.compilation.counter import compilation_counter

    return {"cudagraph_mode": str(worker.vllm_config.compilation_config.cudagraph_mode),
            "cudagraphs_captured": compilation_counter.num_cudagraph_captured}


def main(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **{"disable_log_stats": False, **spec.get("llm", {})})
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in spec["prompts"]]
    params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0.0, ignore_eos=True,
                            prompt_logprobs=spec.get("prompt_logprobs"), logprobs=spec.get("logprobs"))

    def generate():
        return llm.generate(prompts, params, use_tqdm=False)

    first = generate()
    cache_config = llm.llm_engine.vllm_config.cache_config
    result = {"tokens": [list(o.outputs[0].token_ids) for o in first],
              "num_blocks": cache_config.num_gpu_blocks, "block_size": cache_config.block_size}
    result["capacity_tokens"] = result["num_blocks"] * result["block_size"]
    if spec.get("logprobs") is not None:
        result["logprobs"] = [[{str(token): entry.logprob for token, entry in step.items()}
                               for step in o.outputs[0].logprobs] for o in first]
    if spec.get("score") is not None:
        sequences = spec["score"]
        if sequences == "own":
            sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in first]
        scored = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences],
                              SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        result["scores"] = [[entry[token].logprob for token, entry in zip(o.prompt_token_ids[1:],
                                                                          o.prompt_logprobs[1:])] for o in scored]
        result["scored_sequences"] = sequences
    if spec.get("prompt_logprobs") is not None:
        result["prompt_logprobs"] = [
            [None if entry is None else entry[token].logprob for token, entry in zip(o.prompt_token_ids,
                                                                                      o.prompt_logprobs)]
            for o in first]
        result["prompt_token_ids"] = [list(o.prompt_token_ids) for o in first]
    if spec.get("inspect"):
        result["caches"] = llm.collective_rpc(describe_caches)[0]
        result["engine"] = llm.collective_rpc(describe_engine)[0]
    if spec.get("corrupt_cache"):
        llm.collective_rpc(corrupt_caches)
    if spec.get("repeat") or spec.get("corrupt_cache"):
        result["repeat_tokens"] = [list(o.outputs[0].token_ids) for o in generate()]
    stats = {metric.name: getattr(metric, "value", None) for metric in llm.get_metrics()}
    result["preemptions"] = stats.get("vllm:num_preemptions")
    result["prefix_cache_hits"] = stats.get("vllm:prefix_cache_hits")
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine
