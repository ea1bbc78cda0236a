"""vllm-palu: low-rank (Palu) KV-cache compression for vLLM.

Importing this package is cheap (no torch, no vLLM): vLLM calls :func:`register` in every process it starts.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """vLLM general-plugin entry point (group ``vllm.general_plugins``, name ``palu``).

    Idempotent and free of CUDA initialisation. The Palu model classes and the ``PALU`` attention backend are
    registered here once they exist (serving issue); for now it only announces the plugin.
    """
    global _registered
    if _registered:
        return
    _registered = True
    logger.info("vllm-palu %s plugin registered", __version__)


def is_registered() -> bool:
    return _registered
