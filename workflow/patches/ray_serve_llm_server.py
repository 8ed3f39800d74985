"""Ray Serve LLM's ``LLMServer``, loading an adapter once however many requests ask for it at once.

A replica loads an adapter on demand: for each request naming one, Ray 2.60's
``LLMServer._maybe_resolve_lora_from_multiplex`` downloads it (Serve's multiplexing shares one
download) and then ``VLLMEngine.resolve_lora`` asks vLLM to load it unless vLLM already lists it.
Requests that arrive together for an adapter a replica has not loaded yet (a new replica
under load: after a lost node, or a scale-up) all find it missing and all ask; vLLM loads it
for the first and refuses the others ("The lora adapter ... has already been loaded"), which
reach the client as HTTP 500. Measured on a cluster (bench/README.md, "Faults"): 5 adapter
requests failed so once the replica that replaced a lost one was up. Here the check and the
load are one step per adapter and replica: a request waits for the load in flight, then
finds the adapter loaded.

Where direct streaming runs without Ray's router deployment (one replica: ``serving.app.deploy``),
nothing sets the adapter's name in Serve's request context (the router sends it as a header); the
replica then reads it from the request's ``model`` (``<model id>:<adapter>``), as Ray's router does.

With direct streaming the replica's app is the ingress: ``KeyGuard`` (``serving/guard.py``) wraps
it outermost, before this module's ``_AdapterFromBody``, Ray's LoRA middleware and vLLM's own key
check, with the key's digest, the body limit and the CORS origins from the cluster's environment
(``serving.app.direct_streaming_env``). Whatever the mode, an adapter is resolved (downloaded,
loaded) only if the adapters folder lists it and its name is a plain folder name
(``adapter_store.AdapterCatalogue``); any other name is a 404 before storage is read.

The class keeps Ray's name (deployments are named after it: ``LLMServer:<model id>``).
It overrides private methods and sets Serve's private request context: ``serving.app`` names it
in ``server_cls`` only on the Ray versions in ``SERVER_TESTED`` there. Only the Ray replicas import
this module.
"""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import HTTPException
from ray import serve
from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer
from ray.llm._internal.serve.core.server.llm_server import _add_middleware_to_built_app
from ray.serve.context import _set_request_context

from . import guard
from .adapter_store import AdapterCatalogue

# The body limit where the cluster's environment names none (ServeConfig.max_request_bytes' default).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


class _AdapterFromBody:
    """ASGI middleware: a POST whose context names no adapter gets the one its JSON ``model`` names."""

    def __init__(self, app, *, base_model_id: str) -> None:
        self.app = app
        self._prefix = f"{base_model_id}:"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or serve.get_multiplexed_model_id():
            return await self.app(scope, receive, send)
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        try:
            model = json.loads(b"".join(m.get("body", b"") for m in messages)).get("model")
        except (ValueError, AttributeError):  # not a JSON object: the app answers it
            model = None
        if isinstance(model, str) and model.startswith(self._prefix):
            _set_request_context(multiplexed_model_id=model)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class LLMServer(RayLLMServer):
    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        if self._llm_config.lora_config is not None:
            # Outside Ray's LoRA middleware (added by super()), so that it sees the adapter.
            _add_middleware_to_built_app(app, _AdapterFromBody, base_model_id=self._llm_config.model_id)
        # Outermost: nothing reads the body or resolves an adapter before the key is checked.
        origins = [o for o in os.environ.get(guard.CORS_ENV, "").split(",") if o]
        _add_middleware_to_built_app(app, guard.KeyGuard, api_key_sha256=os.environ.get(guard.DIGEST_ENV) or None,
                                     max_body_bytes=int(os.environ.get(guard.MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES),
                                     cors_preflight=bool(origins))
        self._workflow_app = app
        return app

    def asgi_routes(self) -> list[tuple[str, list[str]]]:
        """The routes of the app this replica serves (direct streaming), for a deployment handle's caller."""
        return guard.route_table(self._workflow_app)

    async def _adapter_catalogue(self) -> AdapterCatalogue:
        catalogue = self.__dict__.setdefault(
            "_workflow_adapters", AdapterCatalogue(self._llm_config.lora_config.dynamic_lora_loading_path))
        await catalogue.start()
        return catalogue

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if not model_id or self._llm_config.lora_config is None:
            return await super()._maybe_resolve_lora_from_multiplex()
        adapter = model_id.partition(":")[2]
        if not (await self._adapter_catalogue()).knows(adapter):
            raise HTTPException(404, f"The model '{model_id}' does not exist.")
        # Created here, on the replica's event loop (the replica's __init__ may run elsewhere).
        locks = self.__dict__.setdefault("_workflow_adapter_locks", {})
        async with locks.setdefault(model_id, asyncio.Lock()):
            await super()._maybe_resolve_lora_from_multiplex()
