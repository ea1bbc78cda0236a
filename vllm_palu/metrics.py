"""Palu gauges on vLLM's /metrics (prometheus-client, API-server process): what the latent cache saves."""

from __future__ import annotations

_gauges: dict = {}


def _gauge(name: str, documentation: str):
    from prometheus_client import Gauge

    if name not in _gauges:
        # "max" keeps the value readable when vLLM aggregates several API-server processes.
        _gauges[name] = Gauge(name, documentation, labelnames=["model_name"], multiprocess_mode="max")
    return _gauges[name]


def publish(latent: int, dense: int, model_name: str) -> None:
    """``latent``: cache bytes per token as served (quantized latents include their scales); ``dense``: what the
    dense model would store in the model dtype."""
    _gauge("palu:latent_bytes_per_token", "KV-cache bytes per token stored by the Palu latent cache (all layers)"
           ).labels(model_name).set(latent)
    _gauge("palu:dense_kv_bytes_per_token", "KV-cache bytes per token the dense model would store (all layers)"
           ).labels(model_name).set(dense)
    _gauge("palu:kv_compression_ratio", "Dense KV bytes / Palu latent bytes per token"
           ).labels(model_name).set(dense / latent)
