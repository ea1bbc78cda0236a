from __future__ import annotations

from pathlib import Path

import torch

from vllm_palu.offline.converter import ConvertOptions, convert


def convert_tiny(source: Path, output: Path, calib: Path | None, **overrides) -> Path:
    # Split with one joint group and SVD factors unless a test asks otherwise: what most tests were written for
    # (the converter's "auto" layout and its refinement have their own tests).
    options = dict(model=str(source), output=output, calib=str(calib) if calib else None, calib_samples=4, calib_seq_len=32,
                   batch_size=2, latent_layout="split", group_size="all", refine_steps=0)
    options.update(overrides)
    return convert(ConvertOptions(**options))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_vllm(spec: dict, timeout: int = 600, env: dict[str, str] | None = None) -> dict:
    """Run tests/vllm_runner.py in a fresh process; its JSON result."""
    import json
    import os
    import subprocess
    import sys

    runner = Path(__file__).with_name("vllm_runner.py")
    result = subprocess.run([sys.executable, str(runner), json.dumps(spec)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"vLLM run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "log": (result.stdout + result.stderr)[-200_000:]}


def reference_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Argmax continuations from the PyTorch reference model (no vLLM), past EOS like ``ignore_eos``."""
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            tokens, past, step_input = [], None, torch.tensor([ids])
            for _ in range(max_tokens):
                out = model(step_input, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                tokens.append(token)
                step_input = torch.tensor([[token]])
            outputs.append(tokens)
    return outputs


def reference_prompt_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


ON_GPU = torch.cuda.is_available()
KV_CACHE_BYTES = 2 ** 30  # the KV memory of every test engine (the CPU build: VLLM_CPU_KVCACHE_SPACE=1)
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32]  # fewer CUDA graphs than vLLM's default: faster start-up


def engine_args(**overrides) -> dict:
    """vLLM engine settings of the serving tests on this machine. The CPU build runs eager. On a GPU, vLLM's
    defaults (torch.compile, FULL CUDA graphs for decode batches, piecewise graphs around attention otherwise)
    with a fixed KV memory and fewer capture sizes."""
    settings = {"dtype": "float32", "max_model_len": 512, "block_size": 32}
    if ON_GPU:
        settings.update(kv_cache_memory_bytes=KV_CACHE_BYTES,
                        compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    else:
        settings["enforce_eager"] = True
    return {**settings, **overrides}


def serve_args() -> list[str]:
    """The same settings as `vllm serve` flags."""
    import json

    args = ["--dtype", "float32", "--max-model-len", "512", "--block-size", "32"]
    if ON_GPU:
        return args + ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--compilation-config",
                       json.dumps({"cudagraph_capture_sizes": CAPTURE_SIZES})]
    return args + ["--enforce-eager"]
