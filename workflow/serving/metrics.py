"""Per-adapter metrics of a served app, in Prometheus text format at ``<route>/metrics``.

What the replica that answers HTTP records, labelled by the OpenAI model id a request names (``<model id>``
or ``<model id>:<adapter>``; ``<unknown>`` for a name the app answered 404, so that a client cannot grow
the label set): requests, errors (HTTP status 400 or more, or an error event in a stream), generated tokens
(the response's ``usage.completion_tokens``; a stream without usage counts its non-empty deltas) and time to
first token of streamed requests (to the first body chunk: vLLM streams its first chunk with the first
token). The LLM replicas record adapter loads: each load of an adapter by Serve's multiplexing (a request
for an adapter the replica did not hold, ``max_num_adapters_per_replica`` LRU), its seconds (the whole
resolve: the adapter's files and vLLM's ``add_lora``), and reloads (an adapter loaded again after Serve
evicted it).

``MetricsMiddleware`` wraps the app inside the API key check (``serving/guard.py``), so ``GET
<route>/metrics`` needs the key like every other path. With the workflow ingress the ingress answers it with
its own request metrics and each base model's LLM replica's load metrics (one replica's, where a
deployment has several); with direct streaming the replica answers with both of its own (one replica's, the
one HAProxy picks). Each process keeps its metrics in registries of its own, not Ray's metrics agent (which
exports per node, on a port of its own, seconds late).
"""

from __future__ import annotations

import json
import re
import time

# Seconds: from a token on the CPU (tens of ms) to a cold adapter behind a queue (tens of s).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNKNOWN = "<unknown>"
MAX_LABEL = 200
_USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')
_DELTA = re.compile(rb'"(?:content|text)":\s*"(?!")')


class RequestMetrics:
    """Requests, errors, generated tokens and TTFT by model id (one per process that answers HTTP)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        label = ["model"]
        self.requests = Counter("workflow_adapter_requests", "Requests by the model id they name", label,
                                registry=self.registry)
        self.errors = Counter("workflow_adapter_errors", "Requests answered with an error (HTTP status >= 400 or "
                              "an error event in the stream)", label, registry=self.registry)
        self.tokens = Counter("workflow_adapter_generated_tokens", "Generated (completion) tokens", label,
                              registry=self.registry)
        self.ttft = Histogram("workflow_adapter_time_to_first_token_seconds", "Seconds from the request to the "
                              "first streamed chunk", label, buckets=TTFT_BUCKETS, registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class LoadMetrics:
    """Adapter loads, their seconds and reloads by model id (one per LLM replica)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        label = ["model"]
        self.loads = Counter("workflow_adapter_loads", "Adapter loads by the replica (Serve's multiplexing)", label,
                             registry=self.registry)
        self.reloads = Counter("workflow_adapter_reloads", "Loads of an adapter the replica had loaded before and "
                               "evicted (max_num_adapters_per_replica)", label, registry=self.registry)
        self.load_seconds = Histogram("workflow_adapter_load_seconds", "Seconds a request waited for its adapter's "
                                      "load", label, buckets=LOAD_BUCKETS, registry=self.registry)
        self._loaded_before: set[str] = set()

    def loaded(self, model: str, seconds: float) -> None:
        model = model[:MAX_LABEL]
        self.loads.labels(model).inc()
        if model in self._loaded_before:
            self.reloads.labels(model).inc()
        self._loaded_before.add(model)
        self.load_seconds.labels(model).observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _model_of(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


class MetricsMiddleware:
    """ASGI middleware: records every POST to a ``.../completions`` path in ``metrics`` and answers
    ``GET <root>/metrics`` with its text and ``more_text()``'s (an async callable returning exposition text)."""

    def __init__(self, app, *, metrics: RequestMetrics, more_text=None) -> None:
        self.app = app
        self._metrics = metrics
        self._more_text = more_text

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path") or "")
        if scope["method"] == "GET" and path == "/metrics":
            return await self._answer_metrics(send)
        if scope["method"] == "POST" and path.endswith("/completions"):
            return await self._recorded(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _answer_metrics(self, send) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        body = self._metrics.text() + (await self._more_text() if self._more_text else b"")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _recorded(self, scope, receive, send) -> None:
        started = time.monotonic()
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        model = _model_of(b"".join(m.get("body", b"") for m in messages))
        state = {"status": 0, "stream": False, "first": None, "usage": None, "deltas": 0, "error": False}

        async def replay():
            return messages.pop(0) if messages else await receive()

        async def watched(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                state["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk and state["first"] is None:
                    state["first"] = time.monotonic()
                usage = _USAGE.findall(chunk)
                if usage:
                    state["usage"] = int(usage[-1])
                if state["stream"]:
                    state["deltas"] += len(_DELTA.findall(chunk))
                    state["error"] = state["error"] or b'data: {"error"' in chunk
            await send(message)

        try:
            await self.app(scope, replay, watched)
        except BaseException:
            state["error"] = True
            raise
        finally:
            self._record(model, state, started)

    def _record(self, model: str | None, state: dict, started: float) -> None:
        label = UNKNOWN if model is None or state["status"] == 404 else model[:MAX_LABEL]
        m = self._metrics
        m.requests.labels(label).inc()
        if state["error"] or state["status"] >= 400 or state["status"] == 0:
            m.errors.labels(label).inc()
            return
        tokens = state["usage"] if state["usage"] is not None else state["deltas"] if state["stream"] else 0
        m.tokens.labels(label).inc(tokens)
        if state["stream"] and state["first"] is not None:
            m.ttft.labels(label).observe(state["first"] - started)


_REQUESTS: RequestMetrics | None = None
_LOADS: LoadMetrics | None = None


def request_metrics() -> RequestMetrics:
    """This process's request metrics (one replica per process)."""
    global _REQUESTS
    if _REQUESTS is None:
        _REQUESTS = RequestMetrics()
    return _REQUESTS


def load_metrics() -> LoadMetrics:
    """This process's adapter load metrics."""
    global _LOADS
    if _LOADS is None:
        _LOADS = LoadMetrics()
    return _LOADS
