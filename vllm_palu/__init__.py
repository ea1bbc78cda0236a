"""vllm-palu: low-rank (Palu) KV-cache compression for vLLM.

Importing this package is cheap (no torch, no vLLM): vLLM calls :func:`register` in every process it starts.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.palu")
_registered = False


def register() -> None:
    """vLLM general-plugin entry point (group ``vllm.general_plugins``, name ``palu``).

    Idempotent and free of CUDA initialisation: registers the Palu model architectures, the ``PALU`` attention
    backend and the start-up checks (see :mod:`vllm_palu.plugin`).
    """
    global _registered
    if _registered:
        return
    from vllm_palu.plugin import register_all

    register_all()
    _registered = True
    logger.info("vllm-palu %s plugin registered", __version__)


def is_registered() -> bool:
    return _registered
