"""vllm-palu: low-rank (Palu) KV-cache compression for vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``: ``palu``)."""
