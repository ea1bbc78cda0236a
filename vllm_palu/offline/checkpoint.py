"""Checkpoint I/O: read HF checkpoints with clear errors, write Palu checkpoints atomically, load them back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vllm_palu.config import BASE_ARCHITECTURES, PALU_ARCHITECTURES, PaluConfig
from vllm_palu.errors import PaluError
from vllm_palu.offline.lowrank import GroupedUpProjection, LowRankProjection, SharedValueProjection, set_latent_format

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LAYER_PREFIX = "model.layers"  # state-dict prefix of the decoder layers in all supported architectures
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise PaluError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PaluError(f"not an HF checkpoint: {config_file} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PaluError(f"corrupt checkpoint: {config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise PaluError(f"corrupt checkpoint: {config_file} is not a JSON object")
    return config


def base_architecture(config: dict[str, Any]) -> str:
    """The supported base architecture of a dense or Palu config.json; PaluError naming the supported ones."""
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in PALU_ARCHITECTURES:
            return arch
        if arch in BASE_ARCHITECTURES:
            return BASE_ARCHITECTURES[arch]
    raise PaluError(f"unsupported architecture {architectures or 'unknown'}; supported: "
                    f"{', '.join(PALU_ARCHITECTURES)}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    # Missing/unexpected-key reports are expected while swapping k/v projections; we check keys ourselves.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _from_pretrained(path, architecture: str, dtype: torch.dtype, what: str,
                     allowed_missing=lambda key: False, **kwargs) -> nn.Module:
    """transformers' loader for ``architecture``, with load failures and missing weights as one-line errors;
    ``allowed_missing(key)`` marks weights the caller supplies itself (the factorized k/v projections)."""
    import transformers

    with _quiet_transformers():
        try:
            model, info = getattr(transformers, architecture).from_pretrained(
                path, dtype=dtype, output_loading_info=True, low_cpu_mem_usage=True, **kwargs)
        except Exception as error:  # noqa: BLE001 - any loader failure means a broken checkpoint
            raise PaluError(f"cannot load {what} {path}: {_first_line(error)}") from None
    missing = [key for key in info.get("missing_keys", []) if not allowed_missing(key)]
    if missing:
        raise PaluError(f"corrupt {what} {path}: missing weights {sorted(missing)[:4]}")
    return model


def check_finite(model: nn.Module, what: str) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PaluError(f"{what}: weight {name} contains NaN or Inf")


def load_dense_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a dense HF checkpoint of a supported architecture on CPU, refusing partial or non-finite weights."""
    config = read_config(path)
    architecture = base_architecture(config)
    if "palu" in config:
        raise PaluError(f"{path} is already a Palu checkpoint")
    if not any(p.suffix == ".safetensors" for p in Path(path).iterdir()):
        raise PaluError(f"no *.safetensors weights in {path}")
    model = _from_pretrained(path, architecture, dtype, "checkpoint")
    check_finite(model, f"checkpoint {path}")
    return model.eval()


def load_palu_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    latent_format: str = "auto") -> nn.Module:
    """The reference model of a Palu checkpoint: the base transformers model with every ``k_proj`` / ``v_proj``
    replaced by its factorization (:mod:`vllm_palu.offline.lowrank`: split, K = RoPE(up_k(down_k x)) and
    V = up_v(down_v x); shared, one latent z = down(x), K = RoPE(up_k z), V = up_v z).
    ``latent_format`` (auto, fp8, int4) fake-quantizes the latents as serving's paged cache stores them."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = read_config(path)
    palu = PaluConfig.of(config)
    hf_config = AutoConfig.from_pretrained(path)
    hf_config.architectures = [palu.base_architecture]
    model = _from_pretrained(path, palu.base_architecture, dtype, "Palu checkpoint", config=hf_config,
                             allowed_missing=_is_kv_key)
    layers = decoder_layers(model)
    if len(layers) != palu.num_layers:
        raise PaluError(f"palu section lists {palu.num_layers} layers, the model has {len(layers)}")

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys() if _is_kv_key(k)})
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        keys = LowRankProjection(attention.k_proj.in_features, palu.num_groups, palu.k_ranks[index],
                                 palu.group_width, palu.kv_bias, dtype=dtype)
        if palu.shared:  # v_proj has no down-projection: its latent is k_proj's
            values = SharedValueProjection(keys, GroupedUpProjection(palu.num_groups, palu.v_ranks[index],
                                                                     palu.group_width, palu.kv_bias, dtype=dtype))
        else:
            values = LowRankProjection(attention.v_proj.in_features, palu.num_groups, palu.v_ranks[index],
                                       palu.group_width, palu.kv_bias, dtype=dtype)
        for kind, projection in (("k", keys), ("v", values)):
            prefix = f"{LAYER_PREFIX}.{index}.self_attn.{kind}_proj."
            for name, param in projection.named_parameters():
                key = prefix + name
                if key not in tensors:
                    raise PaluError(f"layer {index}: {key} missing from the checkpoint")
                if tensors[key].shape != param.shape:
                    raise PaluError(f"layer {index}: {key} has shape {tuple(tensors[key].shape)} but the palu "
                                    f"section ({palu.latent_layout} layout, {kind} rank {projection.rank}, "
                                    f"{palu.num_groups} groups) implies {tuple(param.shape)}")
                param.data.copy_(tensors[key])
        attention.k_proj, attention.v_proj = keys, values
    check_finite(model, f"Palu checkpoint {path}")
    model.config.palu = palu.to_dict()
    set_latent_format(model, latent_format)
    return model.eval()


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dense or Palu, whichever ``path`` holds."""
    return load_palu_model(path, dtype) if "palu" in read_config(path) else load_dense_model(path, dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _is_kv_key(key: str) -> bool:
    return ".self_attn.k_proj." in key or ".self_attn.v_proj." in key


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def copy_auxiliary_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config, chat template...: everything except weights and config.json."""
    for item in source.iterdir():
        if (item.is_file() and item.name != "config.json" and item.suffix not in WEIGHT_SUFFIXES
                and item.name not in WEIGHT_INDEXES):
            shutil.copy2(item, target / item.name)


def check_output_path(output: Path, force: bool) -> None:
    """Fail before any heavy work if the output cannot be written."""
    if output.exists() and not force:
        raise PaluError(f"output {output} already exists (pass --force to replace it)")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise PaluError(f"output parent directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PaluError(f"output path not writable: {parent}")


@contextlib.contextmanager
def atomic_directory(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; it replaces ``output`` only if the block finishes.

    Any exception (KeyboardInterrupt included) removes the temporary directory, so no half-written checkpoint is
    ever visible at ``output``.
    """
    output = Path(output)
    check_output_path(output, force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.resolve().parent))
    except OSError as error:
        raise PaluError(f"output path not writable: {error}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    try:
        yield staging
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=staging.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
