"""The replicas' server class: the workflow's ``LLMServer`` (``patches/ray_serve_llm_server.py``: one
load per adapter and replica, adapters of a local folder loaded where they are, the adapter read from
the request body without Ray's router) with the API key check around its app and the adapters by
listed name.

With direct streaming the replica's app is the ingress: ``KeyGuard`` (``serving/guard.py``) wraps it
outermost, with the key's digest, the body limit and the CORS origins from the cluster's environment
(``serving.app.direct_streaming_env``). An adapter is resolved only if the adapters folder lists it
under a plain folder name (``adapter_store.AdapterCatalogue``). Inside the key check, the per-adapter
metrics (``serving/metrics.py``) record every completion and answer ``GET <route>/metrics``. ``serving.app`` names this class in
``server_cls`` only on the Ray versions its base was tested on (``SERVER_TESTED`` there). Only the Ray
replicas import this module.
"""

from __future__ import annotations

import os

from ..patches import ray_serve_llm_server
from . import adapter_fit, guard, metrics
from .adapter_store import AdapterCatalogue

# The body limit where the cluster's environment names none (ServeConfig.max_request_bytes' default).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def _guarded_metrics(app, **guard_options):
    """The key check around the per-adapter metrics (``GET <route>/metrics``) around the replica's app."""

    async def load_text() -> bytes:
        return metrics.load_metrics().text()

    return guard.KeyGuard(metrics.MetricsMiddleware(app, metrics=metrics.request_metrics(), more_text=load_text),
                          **guard_options)


class LLMServer(ray_serve_llm_server.LLMServer):
    def outer_middleware(self) -> tuple[type, dict]:
        """Outermost: nothing reads the body or resolves an adapter before the key is checked."""
        origins = [o for o in os.environ.get(guard.CORS_ENV, "").split(",") if o]
        return _guarded_metrics, {"api_key_sha256": os.environ.get(guard.DIGEST_ENV) or None,
                                  "max_body_bytes": int(os.environ.get(guard.MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES),
                                  "cors_preflight": bool(origins)}

    def adapter_misfit(self, name: str, folder, config: dict, llm_config) -> str | None:
        """An adapter whose rank or base model does not fit the served one is refused at its first request."""
        return adapter_fit.misfit(name, folder, config, max_lora_rank=llm_config.engine_kwargs.get("max_lora_rank"),
                                  model_source=llm_config.model_loading_config.model_source)

    def adapter_loaded(self, model_id: str, seconds: float) -> None:
        metrics.load_metrics().loaded(model_id, seconds)

    def adapter_load_metrics(self) -> bytes:
        """This replica's adapter load metrics (Prometheus text), for the ingress's ``/metrics``."""
        return metrics.load_metrics().text()

    def adapter_catalogue(self, adapters_uri: str) -> AdapterCatalogue:
        return AdapterCatalogue(adapters_uri)

    def asgi_routes(self) -> list[tuple[str, list[str]]]:
        """The routes of the app this replica serves (direct streaming), for a deployment handle's caller."""
        return guard.route_table(self.asgi_app)
