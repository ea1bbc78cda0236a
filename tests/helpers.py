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
