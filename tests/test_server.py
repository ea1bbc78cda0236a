"""`vllm serve` with the PALU backend as users start it: real HTTP on 127.0.0.1, OpenAI-compatible API."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import AutoTokenizer

from helpers import ON_GPU, convert_tiny, reference_greedy, reference_prompt_logprobs, serve_args
from server import vllm_server
from vllm_palu.offline.checkpoint import load_palu_model

PROMPTS = ["The capital of France is", "Low-rank projections compress", "A paged cache stores",
           "Rotary position embeddings rotate pairs"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def tiny_palu(tiny_checkpoints, calib_file, tmp_path_factory):
    return convert_tiny(tiny_checkpoints["llama"], tmp_path_factory.mktemp("server") / "palu-tiny", calib_file,
                        kv_ratio=0.5, group_size="1")


@pytest.fixture(scope="module")
def server(tiny_palu, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with vllm_server(tiny_palu, "--attention-backend", "PALU", *serve_args(), log=log) as url:
        yield url, log


def complete(url: str, model, **body) -> dict:
    # Greedy and past EOS, as the reference generates.
    body = {"model": str(model), "temperature": 0, "ignore_eos": True, **body}
    response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_endpoint_and_startup_log(server, tiny_palu):
    url, log = server
    assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]] == [str(tiny_palu)]
    text = log.read_text()
    assert "attention backend PALU (selected by the model)" in text and "KV cache size" in text


def test_completions_greedy_equal_reference(server, tiny_palu):
    url, _ = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_palu)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    body = complete(url, tiny_palu, prompt=prompts, max_tokens=MAX_TOKENS, return_token_ids=True,
                    prompt_logprobs=0)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    reference = load_palu_model(tiny_palu)
    assert [c["token_ids"] for c in choices] == reference_greedy(reference, prompts, MAX_TOKENS)
    for ids, choice in zip(prompts, choices):
        served = [next(iter(entry.values()))["logprob"] for entry in choice["prompt_logprobs"][1:]]
        expected = reference_prompt_logprobs(reference, ids)
        assert max(abs(a - b) for a, b in zip(served, expected)) < 2e-3


def test_streaming_and_logprobs(server, tiny_palu):
    url, _ = server
    plain = complete(url, tiny_palu, prompt=PROMPTS[0], max_tokens=16, logprobs=1)["choices"][0]
    assert len(plain["logprobs"]["token_logprobs"]) == 16
    assert all(math.isfinite(lp) and lp <= 0 for lp in plain["logprobs"]["token_logprobs"])
    with requests.post(f"{url}/v1/completions", json={"model": str(tiny_palu), "prompt": PROMPTS[0],
                                                      "max_tokens": 16, "temperature": 0, "stream": True,
                                                      "ignore_eos": True},
                       stream=True, timeout=120) as response:
        events = [line.removeprefix(b"data: ") for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    streamed = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    assert len(events) > 2 and streamed == plain["text"]


def test_chat_completions(server, tiny_palu):
    url, _ = server
    response = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": str(tiny_palu), "messages": [{"role": "user", "content": "Where is Paris?"}], "max_tokens": 12,
        "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] == 12


def test_metrics_carry_palu_gauges(server, tiny_palu):
    url, _ = server
    text = requests.get(f"{url}/metrics", timeout=30).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("palu:")}
    # tiny model, fp32: 2 layers x 2 groups x (8 + 24) latents x 4 bytes vs 2 layers x 2 x 2 heads x 32 x 4 bytes
    assert values == {"palu:latent_bytes_per_token": 512.0, "palu:dense_kv_bytes_per_token": 1024.0,
                      "palu:kv_compression_ratio": 2.0}
    assert "vllm:kv_cache_usage_perc" in text  # beside vLLM's own metrics


def test_eight_concurrent_requests(server, tiny_palu):
    url, _ = server
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(8)]
    alone = [complete(url, tiny_palu, prompt=p, max_tokens=24)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda p: complete(url, tiny_palu, prompt=p, max_tokens=24)["choices"][0]["text"],
                                 prompts))
    assert together == alone


@pytest.mark.skipif(ON_GPU and torch.cuda.device_count() < 2, reason="tensor parallelism on a GPU needs two")
@pytest.mark.parametrize("latent_layout", ["split", "shared"])
def test_tensor_parallel_two_ranks(tiny_palu, tiny_checkpoints, calib_file, tmp_path, latent_layout):
    """vLLM's own distributed engine, TP=2: each rank caches one of the two latent groups per layer (shared
    layout: each rank's one latent per group rebuilds its K and V). The build machine has one NUMA node and two
    cores, so the ranks' OpenMP threads are bound by hand."""
    model = tiny_palu if latent_layout == "split" else convert_tiny(
        tiny_checkpoints["qwen2"], tmp_path / "shared", calib_file, kv_ratio=0.5, group_size="1",
        latent_layout="shared")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    with vllm_server(model, "--tensor-parallel-size", "2", *serve_args(), log=tmp_path / "tp2.log",
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as url:
        body = complete(url, model, prompt=prompts, max_tokens=MAX_TOKENS, return_token_ids=True)
    served = [c["token_ids"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert served == reference_greedy(load_palu_model(model), prompts, MAX_TOKENS)
    assert "tensor_parallel_size=2" in (tmp_path / "tp2.log").read_text()
