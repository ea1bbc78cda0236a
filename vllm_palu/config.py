"""The ``palu`` section of a converted checkpoint's config.json, and the latent format.

A Palu checkpoint is the base model's HF checkpoint with, in every layer, ``k_proj`` and ``v_proj`` replaced by a
down-projection (hidden -> latent, the part that is cached) and a per-group up-projection (latent -> the group's
heads). This module only describes that format; it imports neither vLLM nor transformers, so the serving plugin,
the converter and the benchmarks can all read it. :meth:`PaluConfig.of` is the one reader of the section.

The **latent layout** (:class:`LatentLayout`) is what a (token, group) row of the cache holds: ``split``, a K latent
and a V latent (``rank_k + rank_v`` values, Palu); ``shared``, one latent of ``r`` values that both the keys and the
values are rebuilt from (SkipCat's shared projection applied to ``[W_k; W_v]``: ``z = A x``, ``K = B_K z`` before
RoPE, ``V = B_V z``; ``k_ranks == v_ranks == r``). It is a property of the checkpoint.

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

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from vllm_palu.errors import PaluError

# Version 2 renamed the weight dtype field ``latent_dtype`` -> ``weight_dtype``; version 3 added ``latent_layout``
# (earlier checkpoints are all ``split``). Versions 1 and 2 are still read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

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


class _Choice(str, Enum):
    """A named choice that is also its ``str`` (``LatentFormat.FP8 == "fp8"``), parsed with a one-line error."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str):
        """The member called ``name``; PaluError naming the members otherwise."""
        try:
            return cls(name)
        except ValueError:
            label = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # LatentFormat -> "latent format"
            raise PaluError(f"unknown {label} {name!r}; choose from {', '.join(m.value for m in cls)}") from None


class LatentFormat(_Choice):
    """How the paged cache stores latents."""

    AUTO = "auto"
    FP8 = "fp8"
    INT4 = "int4"


class LatentLayout(_Choice):
    """What one (token, group) cache row holds (module doc)."""

    SPLIT = "split"
    SHARED = "shared"


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

    ``k_ranks[i]`` / ``v_ranks[i]`` are the latent widths of *each group* of layer ``i``; a ``split`` layer caches
    ``num_groups * (k_ranks[i] + v_ranks[i])`` values per token, a ``shared`` one ``num_groups * k_ranks[i]`` (its
    one latent is both the K and the V latent: ``k_ranks == v_ranks``). All groups of a layer share one rank, which
    is what the paged kernels need.
    """

    base_architecture: str
    num_kv_heads: int
    head_dim: int
    group_size: int  # KV heads per latent group
    k_ranks: list[int]
    v_ranks: list[int]
    latent_layout: str = LatentLayout.SPLIT.value
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

    @property
    def shared(self) -> bool:
        return self.latent_layout == LatentLayout.SHARED

    def latent_width(self, layer: int) -> int:
        """Values cached per token in layer ``layer``, over its groups."""
        per_group = self.k_ranks[layer] if self.shared else self.k_ranks[layer] + self.v_ranks[layer]
        return self.num_groups * per_group

    def dense_kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def latent_bytes_per_token(self, dtype_bytes: int | None = None,
                               latent_format: LatentFormat = LatentFormat.AUTO) -> int:
        """Cache bytes per token over all layers; quantized latents (fp8, int4) count their scales. ``dtype_bytes``:
        of an unquantized latent (default: the weight dtype's)."""
        from vllm_palu.attention.latent_quant import row_bytes  # imports torch: not at module level

        per_value = DTYPE_BYTES[self.weight_dtype] if dtype_bytes is None else dtype_bytes
        return sum(self.num_groups * row_bytes(self.k_ranks[i], self.v_ranks[i], latent_format, per_value,
                                               self.latent_layout) for i in range(self.num_layers))

    def latent_format_problem(self, latent_format: LatentFormat) -> str | None:
        """Why this checkpoint's ranks cannot be cached in ``latent_format``, or None."""
        from vllm_palu.attention.latent_quant import check_ranks

        for layer in range(self.num_layers):
            problem = check_ranks(self.k_ranks[layer], self.v_ranks[layer], latent_format, self.latent_layout)
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
        LatentLayout.parse(self.latent_layout)
        if self.shared and self.k_ranks != self.v_ranks:
            raise PaluError("a shared latent is both the K and the V latent: k_ranks and v_ranks must be equal")
        # A shared latent rebuilds the group's K and V rows: up to twice the group width is useful.
        widest = 2 * self.group_width if self.shared else self.group_width
        for name, ranks in (("k", self.k_ranks), ("v", self.v_ranks)):
            for layer, rank in enumerate(ranks):
                if not 1 <= rank <= widest:
                    raise PaluError(f"layer {layer}: {name} rank {rank} outside [1, {widest}]")
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
        if section.get("format_version") in (1, 2):  # split latents, the only layout then
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
