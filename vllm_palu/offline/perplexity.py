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
