"""Ray Serve LLM's direct streaming, chosen per app in the process that builds it.

Ray 2.60 turns direct streaming (HAProxy in front, the LLM replicas as the ingress, vLLM's own
OpenAI app in each replica) on with environment variables that its modules read once, at
import, into module globals. The serving cluster gets them as environment variables
(``serving.app.DIRECT_STREAMING_ENV``); the driver that builds the app may already have
imported those modules, so the globals are set here before each build, which also lets one
process build both kinds of app (bench/serve_latency.py).

If the globals are not where they were (another Ray), the driver would build an ingress app
while the cluster runs with direct-streaming settings; so outside ``TESTED``, or with a global
missing, :func:`available` says no and the serve stage deploys the ingress app instead.

With one replica, :func:`single_replica_app` leaves out Ray's router deployment: HAProxy asks it
which replica takes each request (a new TCP connection and a Python request per request, ~3 ms of
CPU on the 2-core VM), and with one replica the answer is always the same. HAProxy then sends
each request to the replica itself; the workflow's ``LLMServer`` reads the adapter's name from
the request body (``ray_serve_llm_server.py``), which Ray's router otherwise sends as a header.
"""

from __future__ import annotations

import os

from . import replace_attribute, supported, warn

PATCH = "workflow.patches.ray_serve_direct_streaming"
TESTED = {"ray": "==2.60.*"}
CONSEQUENCE = "serve.direct_streaming is off: requests go through Ray Serve's proxy and ingress (slower)"
# (module, global) pairs set for a direct-streaming app.
TARGETS = (("ray.llm._internal.serve.core.ingress.builder", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"),
           ("ray.llm._internal.serve.core.ingress.builder", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"),
           ("ray.serve._private.build_app", "RAY_SERVE_ENABLE_HA_PROXY"))
_switched_on = False  # whether set_direct_streaming(True) ran in this process since it was last switched off


def _modules() -> dict[str, object]:
    import importlib

    return {name: importlib.import_module(name) for name, _ in TARGETS}


def available() -> bool:
    """True when direct streaming can be switched on in this process (tested Ray, globals present)."""
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return False
    modules = _modules()
    missing = [f"{m}.{g}" for m, g in TARGETS if not hasattr(modules[m], g)]
    if missing:
        warn(PATCH, f"{missing[0]} does not exist; {CONSEQUENCE}")
        return False
    return True


def set_direct_streaming(enabled: bool) -> None:
    """Set the build-time globals for the next ``build_openai_app`` in this process.

    Call it on only after :func:`available` said yes. Off, only the LLM builder's switch is reset
    (the other two matter only when it is on), and only where it can be on: this process switched it
    on before, or its environment did (Ray reads ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` at
    import) on the tested Ray. Otherwise nothing of this patch runs.
    """
    global _switched_on
    if not enabled and not _switched_on and (os.environ.get(TARGETS[0][1]) != "1" or not available()):
        return
    modules = _modules()
    builder = modules[TARGETS[0][0]]
    replace_attribute(builder, TARGETS[0][1], enabled)
    if enabled:
        replace_attribute(builder, TARGETS[1][1], True)
        replace_attribute(modules[TARGETS[2][0]], TARGETS[2][1], True)
    _switched_on = enabled


def single_replica_app(llm_config):
    """The direct-streaming app of one replica without Ray's router (module doc), for ``serve.run``.

    Call after ``set_direct_streaming(True)``. Serve refuses a custom request router on an
    ingress that HAProxy balances, so the deployment keeps Serve's default one (it routes nothing).
    """
    from ray.llm._internal.serve.core.ingress.builder import _build_direct_streaming_llm_deployment
    from ray.serve.config import RequestRouterConfig

    return _build_direct_streaming_llm_deployment(
        llm_config, override_serve_options={"request_router_config": RequestRouterConfig()})
