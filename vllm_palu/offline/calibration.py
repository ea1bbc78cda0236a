"""Calibration data and the layer-by-layer activation pass.

Only one decoder layer's worth of work is on the device at a time, and the activations in memory are those of one
layer boundary (``samples x seq_len x hidden``), never the whole model's: the converter scales to 7B-8B models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_palu.errors import PaluError


@dataclass
class CalibrationSet:
    windows: torch.Tensor  # [samples, seq_len] token ids
    source: str  # a file path, or "self-generated"

    def describe(self, seed: int) -> dict[str, Any]:
        samples, seq_len = self.windows.shape
        return {"source": self.source, "samples": samples, "seq_len": seq_len, "seed": seed,
                "tokens": samples * seq_len}


def windows_from_text(tokenizer, text_file: str | Path, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """``samples`` distinct non-overlapping ``seq_len``-token windows of a text file, chosen by ``seed``."""
    _check_sizes(samples, seq_len)
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PaluError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PaluError(f"cannot read calibration file {path}: {error}") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    slots = ids.numel() // seq_len
    if slots < samples:
        raise PaluError(f"calibration text too short: {path} has {ids.numel()} tokens, need "
                        f"{samples * seq_len} (--calib-samples {samples} x --calib-seq-len {seq_len})")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=generator)[:samples].sort().values
    windows = ids[: slots * seq_len].view(slots, seq_len)[chosen]
    return CalibrationSet(windows=windows, source=str(path))


@torch.no_grad()
def self_generated_windows(model: nn.Module, samples: int, seq_len: int, seed: int,
                           device: torch.device, batch_size: int = 16) -> CalibrationSet:
    """The no-file default: text sampled from the model itself (temperature 1, no truncation), each sequence
    started from a token drawn uniformly from the vocabulary. Deterministic for a seed on a given device, needs
    no data and no network; costs some accuracy against in-domain text (see README)."""
    _check_sizes(samples, seq_len)
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (samples, 1), generator=generator)
    model.to(device)
    chunks = []
    for start in tqdm(range(0, samples, batch_size), desc="sampling calibration text", unit="batch"):
        prompt = first[start:start + batch_size].to(device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                             pad_token_id=0)
        chunks.append(out[:, :seq_len].cpu())
    model.to("cpu")
    return CalibrationSet(windows=torch.cat(chunks), source="self-generated")


def _check_sizes(samples: int, seq_len: int) -> None:
    if samples < 1 or seq_len < 2:
        raise PaluError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2 (got {samples}, {seq_len})")


class _Captured(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs and stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.hidden, self.kwargs = hidden_states, kwargs
        raise _Captured


@dataclass
class LayerBatch:
    hidden: torch.Tensor  # [batch, seq_len, hidden] on the device
    kwargs: dict[str, Any]  # position embeddings, mask...: what the base model passes every layer
    # With record_attention: the current layer's self_attn call on this batch (its input, keyword arguments and
    # output in the original model).
    attention_input: torch.Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None
    attention_output: torch.Tensor | None = None


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                       device: torch.device) -> list[LayerBatch]:
    """Run embeddings (and rotary tables, masks) on the device and capture the inputs of decoder layer 0."""
    base = model.model
    layers = base.layers
    first_layer = layers[0]
    catcher = _InputCatcher()
    layers[0] = catcher
    base.embed_tokens.to(device)
    base.rotary_emb.to(device)
    batches = []
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                base(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
            batches.append(LayerBatch(catcher.hidden, catcher.kwargs))
    finally:
        layers[0] = first_layer
        base.embed_tokens.to("cpu")
        base.rotary_emb.to("cpu")
    return batches


class GramAccumulator:
    """Accumulates ``X^T X`` (float64) of a module's input while registered as a forward pre-hook."""

    def __init__(self, features: int, device: torch.device, layer: int) -> None:
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        if not bool(torch.isfinite(x).all()):
            raise PaluError(f"layer {self.layer}: calibration activations contain NaN or Inf")
        self.gram += (x.T @ x).double()
        self.tokens += x.shape[0]


def iterate_layers(model: nn.Module, batches: list[LayerBatch], device: torch.device,
                   desc: str = "calibrating + decomposing",
                   record_attention: bool = False) -> Iterator[tuple[int, nn.Module, torch.Tensor]]:
    """Walk the decoder layers in order, one on the device at a time.

    For each layer, runs the *original* layer over every calibration batch while accumulating the Gram matrix of
    the k/v projections' input, then yields ``(index, layer, gram)``; the caller may replace the layer's
    projections before the loop moves on. The next layer sees the original layer's outputs, as in Palu.
    ``record_attention`` keeps each batch's self_attn input and output of the pass in its :class:`LayerBatch`.
    """
    layers = model.model.layers
    for index in tqdm(range(len(layers)), desc=desc, unit="layer"):
        layer = layers[index].to(device)
        accumulator = GramAccumulator(layer.self_attn.k_proj.in_features, device, index)
        handles = [layer.self_attn.k_proj.register_forward_pre_hook(accumulator)]
        current: list[LayerBatch] = []

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            batch = current[0]
            batch.attention_kwargs = dict(kwargs)
            batch.attention_input = args[0] if args else batch.attention_kwargs.pop("hidden_states")
            batch.attention_output = output[0] if isinstance(output, tuple) else output

        if record_attention:
            handles.append(layer.self_attn.register_forward_hook(record, with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in batches:
                    current[:] = [batch]
                    out = layer(batch.hidden, **batch.kwargs)
                    batch.hidden = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in handles:
                handle.remove()
        yield index, layer, accumulator.gram
        for batch in batches:  # one layer's recordings at a time
            batch.attention_input = batch.attention_kwargs = batch.attention_output = None
        layers[index] = layer.to("cpu")
