from __future__ import annotations

from pathlib import Path

import torch

from vllm_palu.offline.converter import ConvertOptions, convert


def convert_tiny(source: Path, output: Path, calib: Path | None, **overrides) -> Path:
    options = dict(model=str(source), output=output, calib=str(calib) if calib else None, calib_samples=4, calib_seq_len=32,
                   batch_size=2)
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
    return json.loads(lines[-1].removeprefix("RESULT "))


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
