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

The class keeps Ray's name (deployments are named after it: ``LLMServer:<model id>``).
It overrides a private method: ``serving.app`` names it in ``server_cls`` only on the Ray
versions in ``SERVER_TESTED`` there. Only the Ray replicas import this module.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer


class LLMServer(RayLLMServer):
    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return await super()._maybe_resolve_lora_from_multiplex()
        # Created here, on the replica's event loop (the replica's __init__ may run elsewhere).
        locks = self.__dict__.setdefault("_workflow_adapter_locks", {})
        async with locks.setdefault(model_id, asyncio.Lock()):
            await super()._maybe_resolve_lora_from_multiplex()
