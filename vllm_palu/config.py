"""The ``palu`` section of a converted checkpoint's config.json, and the latent format.

A Palu checkpoint is the base model's HF checkpoint with, in every layer, ``k_proj`` and ``v_proj`` replaced by a
down-projection (hidden -> latent, the part that is cached) and a per-group up-projection (latent -> the group's
heads). This module only describes that format; it imports neither vLLM nor transformers, so the serving plugin,
the converter and the benchmarks can all read it. :meth:`PaluConfig.of` is the one reader of the section.

The **latent format** (:class:`LatentFormat`) is how the paged cache stores latents: ``auto`` unquantized (the
model dtype, or the 16-bit ``--kv-cache-dtype`` given), ``fp8`` (float8 e4m3, one fp16 scale per token, group and
K/V), ``int4`` (asymmetric int4, two a byte, fp16 scale and minimum per token, group and K/V). Serving selects it
with vLLM's own ``--kv-cache-dtype`` flag (:data:`KV_CACHE_DTYPE_FORMATS`), the reference model and the eval CLI
with ``latent_format`` / ``--latent-format``.

Why vLLM's flag and not a checkpoint field: vLLM 0.32/0.33 already has per-token-head KV dtypes, and in a Palu
cache a latent group *is* the head slot of vLLM's page (``num_kv_heads = groups``), so "per token-head" is exactly
our per token-group scaling; ``fp8`` keeps the usual flag users know. The same checkpoint then serves at any
precision without reconversion, vLLM's page-size accounting sees a quantized dtype, and nothing new has to be
parsed. ``fp8_e5m2`` and the other vLLM formats (nvfp4, turboquant, int8) are refused at start-up. The layout of
a quantized row is specified in :mod:`vllm_palu.attention.latent_quant`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from vllm_palu.errors import PaluError

# Version 2 renamed the weight dtype field ``latent_dtype`` -> ``weight_dtype``; version 1 is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Base architecture -> the architecture name a converted checkpoint carries.
PALU_ARCHITECTURES = {
    "LlamaForCausalLM": "PaluLlamaForCausalLM",
    "MistralForCausalLM": "PaluMistralForCausalLM",
    "Qwen2ForCausalLM": "PaluQwen2ForCausalLM",
}
BASE_ARCHITECTURES = {palu: base for base, palu in PALU_ARCHITECTURES.items()}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Orthogonal rotations the converter can fold into each group's latent space (vllm_palu/offline/rotation.py).
LATENT_ROTATIONS = ("none", "hadamard", "random")


class LatentFormat(str, Enum):
    """How the paged cache stores latents (a ``str``: ``LatentFormat.FP8 == "fp8"``)."""

    AUTO = "auto"
    FP8 = "fp8"
    INT4 = "int4"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str) -> LatentFormat:
        """The format called ``name``; PaluError naming the formats otherwise."""
        try:
            return cls(name)
        except ValueError:
            raise PaluError(f"unknown latent format {name!r}; choose from "
                            f"{', '.join(f.value for f in cls)}") from None


# vLLM --kv-cache-dtype -> the latent format the PALU cache stores.
KV_CACHE_DTYPE_FORMATS = {"auto": LatentFormat.AUTO, "float16": LatentFormat.AUTO, "bfloat16": LatentFormat.AUTO,
                          "fp8": LatentFormat.FP8, "fp8_e4m3": LatentFormat.FP8,
                          "fp8_per_token_head": LatentFormat.FP8, "int4_per_token_head": LatentFormat.INT4}


def latent_format_for(kv_cache_dtype: str) -> LatentFormat:
    """The latent format of a ``--kv-cache-dtype``; PaluError naming the supported ones."""
    if kv_cache_dtype not in KV_CACHE_DTYPE_FORMATS:
        raise PaluError(f"--kv-cache-dtype {kv_cache_dtype} is not supported with Palu latents; supported: "
                        f"{', '.join(KV_CACHE_DTYPE_FORMATS)}")
    return KV_CACHE_DTYPE_FORMATS[kv_cache_dtype]


# The --kv-cache-dtype that serves each latent format (the first of its names).
FORMAT_KV_CACHE_DTYPES = {fmt: next(name for name, served in KV_CACHE_DTYPE_FORMATS.items() if served == fmt)
                          for fmt in LatentFormat}

# Name of the attention backend (``--attention-backend PALU``).
BACKEND_NAME = "PALU"


@dataclass
class PaluConfig:
    """Per-layer latent layout of a Palu checkpoint.

    ``k_ranks[i]`` / ``v_ranks[i]`` are the latent widths of *each group* of layer ``i``; a layer caches
    ``num_groups * (k_ranks[i] + v_ranks[i])`` values per token. All groups of a layer share one rank, which is
    what the paged kernels need.
    """

    base_architecture: str
    num_kv_heads: int
    head_dim: int
    group_size: int  # KV heads per latent group
    k_ranks: list[int]
    v_ranks: list[int]
    kv_bias: bool = False  # q/k/v projections carry biases (Qwen2); k/v biases live on the up-projections
    weight_dtype: str = "bfloat16"  # the dtype the converter wrote the weights in
    # Orthogonal rotation folded into every group's down/up projections (exact; helps quantized latents).
    rotation: str = "none"
    format_version: int = FORMAT_VERSION
    # How the ranks were obtained (decomposition, allocation, kv_ratio, k_fraction, rank_multiple).
    method: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    # Per-layer relative reconstruction error of k_proj / v_proj on the calibration activations.
    reconstruction_error: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_groups(self) -> int:
        return self.num_kv_heads // self.group_size

    @property
    def num_layers(self) -> int:
        return len(self.k_ranks)

    @property
    def group_width(self) -> int:
        """Output width of one group's up-projection (its heads' K or V dims): the largest useful rank."""
        return self.group_size * self.head_dim

    def latent_width(self, layer: int) -> int:
        return self.num_groups * (self.k_ranks[layer] + self.v_ranks[layer])

    def dense_kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def latent_bytes_per_token(self, dtype_bytes: int | None = None,
                               latent_format: LatentFormat = LatentFormat.AUTO) -> int:
        """Cache bytes per token over all layers; quantized latents (fp8, int4) count their scales. ``dtype_bytes``:
        of an unquantized latent (default: the weight dtype's)."""
        from vllm_palu.attention.latent_quant import row_bytes  # imports torch: not at module level

        per_value = DTYPE_BYTES[self.weight_dtype] if dtype_bytes is None else dtype_bytes
        return sum(self.num_groups * row_bytes(self.k_ranks[i], self.v_ranks[i], latent_format, per_value)
                   for i in range(self.num_layers))

    def latent_format_problem(self, latent_format: LatentFormat) -> str | None:
        """Why this checkpoint's ranks cannot be cached in ``latent_format``, or None."""
        from vllm_palu.attention.latent_quant import check_ranks

        for layer in range(self.num_layers):
            problem = check_ranks(self.k_ranks[layer], self.v_ranks[layer], latent_format)
            if problem:
                return f"layer {layer}: {problem}"
        return None

    @property
    def kv_ratio(self) -> float:
        """Kept latent width / original K+V width, over all layers."""
        kept = sum(self.latent_width(i) for i in range(self.num_layers))
        return kept / (self.num_layers * 2 * self.num_kv_heads * self.head_dim)

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise PaluError(f"unsupported palu format_version {self.format_version} (this build reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
        if self.base_architecture not in PALU_ARCHITECTURES:
            raise PaluError(f"unsupported base architecture {self.base_architecture!r}; "
                            f"supported: {', '.join(PALU_ARCHITECTURES)}")
        if self.group_size < 1 or self.num_kv_heads % self.group_size:
            raise PaluError(f"group_size {self.group_size} must divide num_kv_heads {self.num_kv_heads}")
        if len(self.k_ranks) != len(self.v_ranks) or not self.k_ranks:
            raise PaluError(f"k_ranks ({len(self.k_ranks)}) and v_ranks ({len(self.v_ranks)}) "
                            "must list one rank per layer")
        for name, ranks in (("k", self.k_ranks), ("v", self.v_ranks)):
            for layer, rank in enumerate(ranks):
                if not 1 <= rank <= self.group_width:
                    raise PaluError(f"layer {layer}: {name} rank {rank} outside [1, {self.group_width}]")
        if self.weight_dtype not in DTYPE_BYTES:
            raise PaluError(f"unsupported weight_dtype {self.weight_dtype!r}")
        if self.rotation not in LATENT_ROTATIONS:
            raise PaluError(f"unknown rotation {self.rotation!r}; this build knows {', '.join(LATENT_ROTATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "PaluConfig":
        """The section as written by any readable format version (older ones upgraded in memory)."""
        section = dict(section)
        if section.get("format_version") == 1:
            section["weight_dtype"] = section.pop("latent_dtype", "bfloat16")
            section["format_version"] = FORMAT_VERSION
        try:
            return cls(**section)
        except TypeError as error:
            raise PaluError(f"malformed palu config section: {error}") from None

    @classmethod
    def of(cls, config: Any) -> "PaluConfig":
        """The ``palu`` section of a config: a config.json dict or a transformers config (vLLM's hf_config);
        PaluError if the checkpoint is not a Palu one. The one reader of the section."""
        section = config.get("palu") if isinstance(config, dict) else getattr(config, "palu", None)
        if section is None:
            raise PaluError("not a Palu checkpoint: config.json has no 'palu' section "
                            "(convert it with `python -m vllm_palu.convert`)")
        return cls.from_dict(dict(section))


def head_dim_of(config: dict[str, Any]) -> int:
    """Head dim of an HF config.json dict (explicit, or hidden size / heads): the one place it is derived."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
