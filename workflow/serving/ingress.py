"""Ray Serve LLM's OpenAI ingress, with an optional API key and OpenAI-format errors on every route.

``build_openai_app`` takes the ingress class by name (``ingress_cls_config``); this one is
``OpenAiIngress`` whose whole app is wrapped in ``KeyGuard`` (``serving/guard.py``): with
``api_key_sha256`` given, every path but Serve's health check ``/-/healthz`` needs
``Authorization: Bearer <key>``, checked before the body is read (up to ``max_body_bytes``) and
before any route runs. The replica gets the key's SHA-256 digest as an argument, never the key: the
digest is all it compares against, so the app can be deployed on any cluster (nothing in the
nodes' environment) and Serve's deployment config, the recipe and the manifests hold no key.
Ray's ingress allows every origin with credentials (CORS); here no origin is allowed unless
``cors_allow_origins`` names it. The routes turn the ``HTTPException``s that Ray raises for an
unknown model or adapter (FastAPI would answer ``{"detail": ...}``) into OpenAI's error body, and
an adapter that the adapters folder does not list is a 404 before Ray reads storage for it. The
adapters of a local folder, which Ray does not read, are listed and described from the folder's
listing (``patches/ray_serve_ingress.py``). Inside the key check, ``GET <route>/metrics`` answers the
per-adapter metrics (``serving/metrics.py``): the ingress's request metrics and the LLM replicas' load metrics.

Its base, ``patches/ray_serve_ingress.py``, subclasses a private Ray class: ``serving.app.ingress_cls_config``
names it only for the Ray versions it was tested on (``INGRESS_TESTED`` there). Only the Ray replicas import
this module.
"""

from __future__ import annotations

import functools
import inspect

from fastapi import HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

from ..patches import ray_serve_ingress
from . import metrics
from .adapter_store import AdapterCatalogue
from .guard import KeyGuard, route_table
from .llm_server import DEFAULT_MAX_BODY_BYTES


def openai_error(status_code: int, message: str, code: str | int | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return JSONResponse(status_code=status_code,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


class WorkflowIngress(ray_serve_ingress.Ingress):
    def __init__(self, *args, api_key_sha256: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 cors_allow_origins: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.api_key_sha256 = api_key_sha256
        self.max_body_bytes = max_body_bytes
        self.cors_allow_origins = list(cors_allow_origins or [])

    def adapter_catalogue(self, adapters_uri: str) -> AdapterCatalogue:
        return AdapterCatalogue(adapters_uri)

    def wrap_app(self, app):
        """The replica's app: Ray's CORS rule replaced, the whole app behind the key."""
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
        if self.cors_allow_origins:
            app.user_middleware.insert(0, Middleware(CORSMiddleware, allow_origins=self.cors_allow_origins,
                                                     allow_methods=["GET", "POST"],
                                                     allow_headers=["authorization", "content-type"]))
        self.routed_app = app
        recorded = metrics.MetricsMiddleware(app, metrics=metrics.request_metrics(), more_text=_llm_load_metrics)
        return KeyGuard(recorded, api_key_sha256=self.api_key_sha256, max_body_bytes=self.max_body_bytes,
                        cors_preflight=bool(self.cors_allow_origins))

    def asgi_routes(self) -> list[tuple[str, list[str]]]:
        """The routes of the app this replica serves, for a deployment handle's caller."""
        return route_table(self.routed_app)

    async def unknown_adapter(self, model) -> JSONResponse | None:
        """OpenAI's 404 for ``<base>:<adapter>`` unless the base model's adapters folder lists the adapter."""
        if not isinstance(model, str) or ":" not in model:
            return None
        base, _, adapter = model.partition(":")
        catalogue = self.adapter_catalogues.get(base)
        if catalogue is not None:
            await catalogue.start()
            if catalogue.knows(adapter):
                return None
        return openai_error(404, f"The model '{model}' does not exist.", "model_not_found")


async def _llm_load_metrics() -> bytes:
    """The adapter load metrics of this app's LLM deployments (one replica's each), for ``/metrics``."""
    import asyncio

    from ray import serve

    app_name = serve.get_replica_context().app_name
    status = await asyncio.to_thread(serve.status)
    texts = []
    for name in status.applications[app_name].deployments:
        if name.startswith("LLMServer"):
            texts.append(await serve.get_deployment_handle(name, app_name).adapter_load_metrics.remote())
    return b"".join(texts)


def _requested_model(kwargs: dict):
    """The model a route's arguments name: a path parameter, or the request body's ``model``."""
    if "model" in kwargs:
        return kwargs["model"]
    body = kwargs.get("body")
    return getattr(body, "model", None)


def _guarded(method):
    """``method`` with OpenAI-format errors and the adapter check, with a ``request`` parameter FastAPI fills in."""
    sig = inspect.signature(method, eval_str=True)
    adds_request = "request" not in sig.parameters

    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        if adds_request:
            kwargs.pop("request")
        refusal = await self.unknown_adapter(_requested_model(kwargs))
        if refusal is not None:
            return refusal
        try:
            return await method(self, *args, **kwargs)
        except HTTPException as err:
            return openai_error(err.status_code, str(err.detail), err.status_code)

    if adds_request:
        extra = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        sig = sig.replace(parameters=[*sig.parameters.values(), extra])
    guarded.__signature__ = sig  # FastAPI reads the routes' parameters from here
    return guarded


for _name in ray_serve_ingress.ENDPOINTS:
    setattr(WorkflowIngress, _name, _guarded(getattr(WorkflowIngress, _name)))
