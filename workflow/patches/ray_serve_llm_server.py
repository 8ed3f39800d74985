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
finds the adapter loaded. Each load is reported to ``adapter_loaded`` (the subclass's per-adapter metrics).

Where direct streaming runs without Ray's router deployment (one replica: ``serving.app.deploy``),
nothing sets the adapter's name in Serve's request context (the router sends it as a header); the
replica then reads it from the request's ``model`` (``<model id>:<adapter>``), as Ray's router does.

With direct streaming the replica's app is the ingress: the subclass's ``outer_middleware``
(``serving/llm_server.py``: the API key check) wraps it outermost, before this module's
``_AdapterFromBody``, Ray's LoRA middleware and vLLM's own key check. Whatever the mode, an adapter
is resolved (downloaded, loaded) only if the subclass's ``adapter_catalogue`` knows it (the
adapters folder lists it, under a plain folder name); any other name is a 404 before storage is read.

An adapter of a local folder (``ray_serve_adapter_folders.py``: the run's storage is a folder on
the serving machine) is handed to vLLM from its own subfolder; Ray's loader, which downloads a
bucket's adapter into its cache first, loads the others. Before either is handed to vLLM, the subclass's
``adapter_misfit`` may refuse it (HTTP 400 naming what does not fit the served model).

The class keeps Ray's name (deployments are named after it: ``LLMServer:<model id>``).
It overrides private methods and sets Serve's private request context: ``serving.app`` names its
subclass in ``server_cls`` only on the Ray versions in ``TESTED`` (``serving.app.SERVER_TESTED``).
Only the Ray replicas import this module.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path

from fastapi import HTTPException
from ray import serve
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer
from ray.llm._internal.serve.core.server.llm_server import _add_middleware_to_built_app
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.context import _set_request_context

from . import ray_serve_adapter_folders as adapter_folders

TESTED = {"ray": "==2.60.*"}


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


class _FolderLoader(LoraModelLoader):
    """Ray's LoRA loader, but an adapter of a local folder is loaded from where it is: nothing is downloaded or
    copied, and nothing is cached here (Serve's multiplexing keeps the loaded ones)."""

    def __init__(self, *args, loads: set[str] | None = None, misfit=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loads = loads if loads is not None else set()
        self._misfit = misfit

    async def _refuse_misfit(self, lora_model_id: str, path: Path, config: dict, llm_config) -> None:
        """OpenAI's 400 naming what does not fit, before vLLM loads the adapter (LLMServer.adapter_misfit)."""
        reason = self._misfit and await asyncio.to_thread(self._misfit, lora_model_id.partition(":")[2], path,
                                                          config, llm_config)
        if reason:
            raise HTTPException(400, f"The model '{lora_model_id}' cannot be served: {reason}.")

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        self._loads.add(lora_model_id)  # Serve's multiplexing missed it: a load (LLMServer.adapter_loaded)
        folder = adapter_folders.local_folder(llm_config.lora_config.dynamic_lora_loading_path)
        if folder is None:
            loaded = await super().load_model_from_config(lora_model_id, llm_config)
            path = Path(loaded.local_path)
            try:
                config = json.loads(await asyncio.to_thread((path / adapter_folders.ADAPTER_CONFIG).read_text))
            except FileNotFoundError:  # not a PEFT folder: vLLM says what it misses
                return loaded
            await self._refuse_misfit(lora_model_id, path, config, llm_config)
            return loaded
        path = folder / lora_model_id.partition(":")[2]
        try:
            config = json.loads(await asyncio.to_thread((path / adapter_folders.ADAPTER_CONFIG).read_text))
        except FileNotFoundError:  # removed since the last listing
            raise HTTPException(404, f"The model '{lora_model_id}' does not exist.") from None
        await self._refuse_misfit(lora_model_id, path, config, llm_config)
        return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=config.get("max_length"),
                                   local_path=str(path), lora_assigned_int_id=global_id_manager.next())


class LLMServer(RayLLMServer):
    """Ray's ``LLMServer`` with the adapter handling above; the serving layer's subclass
    (``serving/llm_server.py``) names what wraps the replica's app and what lists its adapters."""

    def outer_middleware(self) -> tuple[type, dict] | None:
        """An ASGI middleware class and its options, wrapped around the replica's app outermost; None for none."""
        return None

    def adapter_catalogue(self, adapters_uri: str):
        """What lists the adapters folder: an object with ``async start()`` and ``knows(name)``."""
        raise NotImplementedError

    def adapter_loaded(self, model_id: str, seconds: float) -> None:
        """Called once a request's adapter was loaded for it (Serve's multiplexing did not hold it): the seconds the
        request waited for the load, vLLM's included."""

    def adapter_misfit(self, name: str, folder: Path, config: dict, llm_config) -> str | None:
        """Why adapter ``name`` (its folder and ``adapter_config.json``) does not fit the served model
        (``llm_config``), or None: asked before each load, a reason refuses the request with HTTP 400."""
        return None

    def _init_multiplex_loader(self, model_downloader_cls=None):
        loads = self.__dict__.setdefault("_workflow_loading", set())
        super()._init_multiplex_loader(model_downloader_cls or functools.partial(_FolderLoader, loads=loads,
                                                                                 misfit=self.adapter_misfit))

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        if self._llm_config.lora_config is not None:
            # Outside Ray's LoRA middleware (added by super()), so that it sees the adapter.
            _add_middleware_to_built_app(app, _AdapterFromBody, base_model_id=self._llm_config.model_id)
        outer = self.outer_middleware()
        if outer is not None:
            _add_middleware_to_built_app(app, outer[0], **outer[1])
        self.asgi_app = app
        return app

    async def _adapter_catalogue(self):
        catalogue = self.__dict__.setdefault(
            "_workflow_adapters", self.adapter_catalogue(self._llm_config.lora_config.dynamic_lora_loading_path))
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
            # What the loader made by _init_multiplex_loader loaded (none where another loader loads).
            loading = self.__dict__.setdefault("_workflow_loading", set())
            started = time.monotonic()
            try:
                await super()._maybe_resolve_lora_from_multiplex()
            except BaseException:
                loading.discard(model_id)
                raise
            if model_id in loading:
                loading.discard(model_id)
                self.adapter_loaded(model_id, time.monotonic() - started)
