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
adapters of a local folder (``patches/ray_serve_adapter_folders.py``), which Ray does not read, are
listed and described from the folder's listing.

It subclasses a private Ray class: ``serving.app.ingress_cls_config`` names it only for the Ray
versions it was tested on (``INGRESS_TESTED`` there). Only the Ray replicas import this module.
"""

from __future__ import annotations

import functools
import inspect

from fastapi import HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress
from starlette.middleware import Middleware

from ..patches.ray_serve_adapter_folders import local_folder
from .adapter_store import AdapterCatalogue
from .guard import KeyGuard, route_table
from .llm_server import DEFAULT_MAX_BODY_BYTES


def openai_error(status_code: int, message: str, code: str | int | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return JSONResponse(status_code=status_code,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


class WorkflowIngress(OpenAiIngress):
    def __init__(self, *args, api_key_sha256: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 cors_allow_origins: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._api_key_sha256 = api_key_sha256
        self._max_body_bytes = max_body_bytes
        self._cors_allow_origins = list(cors_allow_origins or [])
        self._adapter_catalogues = {base: AdapterCatalogue(path) for base, path in self._lora_paths.items()}

    def _set_asgi_app(self, app) -> None:
        """Serve's hook for the replica's app: Ray's CORS rule replaced, the whole app behind the key."""
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
        if self._cors_allow_origins:
            app.user_middleware.insert(0, Middleware(CORSMiddleware, allow_origins=self._cors_allow_origins,
                                                     allow_methods=["GET", "POST"],
                                                     allow_headers=["authorization", "content-type"]))
        self._workflow_app = app
        super()._set_asgi_app(KeyGuard(app, api_key_sha256=self._api_key_sha256, max_body_bytes=self._max_body_bytes,
                                       cors_preflight=bool(self._cors_allow_origins)))

    def asgi_routes(self) -> list[tuple[str, list[str]]]:
        """The routes of the app this replica serves, for a deployment handle's caller."""
        return route_table(self._workflow_app)

    async def _unknown_adapter(self, model) -> JSONResponse | None:
        """OpenAI's 404 for ``<base>:<adapter>`` unless the base model's adapters folder lists the adapter."""
        if not isinstance(model, str) or ":" not in model:
            return None
        base, _, adapter = model.partition(":")
        catalogue = self._adapter_catalogues.get(base)
        if catalogue is not None:
            await catalogue.start()
            if catalogue.knows(adapter):
                return None
        return openai_error(404, f"The model '{model}' does not exist.", "model_not_found")

    async def model(self, model_id: str):
        """Ray's card of ``model_id``; an adapter of a local folder (Ray reads buckets only) gets its base model's
        card under its own id, if the folder lists it."""
        base, _, adapter = model_id.partition(":")
        if not adapter or local_folder(self._lora_paths.get(base)) is None:
            return await super().model(model_id)
        catalogue = self._adapter_catalogues[base]
        await catalogue.start()
        if not catalogue.knows(adapter):
            return None
        card = self._model_cards[base]
        return card.model_copy(update={"id": model_id, "metadata": {**card.metadata, "base_model_id": base}})

    async def models(self):
        """Ray's list; with a local adapters folder (Ray lists buckets only) the adapters the folder lists."""
        if not any(local_folder(path) for path in self._lora_paths.values()):
            return await super().models()
        from ray.llm._internal.serve.core.configs.openai_api_models import ModelList

        cards = []
        for base in self._model_cards:
            cards.append(await self.model(base))
            catalogue = self._adapter_catalogues.get(base)
            if catalogue is not None:
                await catalogue.start()
                cards += [await self.model(f"{base}:{name}") for name in catalogue.names()]
        return ModelList(data=[card for card in cards if card is not None])


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
        refusal = await self._unknown_adapter(_requested_model(kwargs))
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


for _name in DEFAULT_ENDPOINTS:
    setattr(WorkflowIngress, _name, _guarded(getattr(WorkflowIngress, _name)))
