"""The API key check in front of everything a served app answers, and a limit on request bodies.

``KeyGuard`` is ASGI middleware that wraps the whole app a replica serves: the workflow's
ingress (``serving/ingress.py``) or, with direct streaming, vLLM's OpenAI app in the LLM
replica (``serving/llm_server.py``). Every HTTP request but Serve's health check must carry
``Authorization: Bearer <key>``; the key is compared by its SHA-256 digest in constant time
(the replica holds only the digest). A refused request is answered before its body is read,
before any adapter it names is resolved or loaded, and before the app routes it, so a client
without the key learns nothing (an unknown adapter and a known one both get 401). Bodies are
read up to ``max_body_bytes`` before the app sees them: a larger ``Content-Length`` is refused
at once, a chunked body as soon as it passes the limit (413 either way).

Only the standard library here: the replicas import it (Ray, vLLM and FastAPI are theirs).
"""

from __future__ import annotations

import hmac
import json

from ..core.secrets import key_digest

# Serve's health check: HAProxy and load balancers ask it without a key.
HEALTH_PATHS = frozenset({"/-/healthz"})
# What the replicas read when the app is built there (direct streaming: the cluster's environment).
DIGEST_ENV = "WORKFLOW_API_KEY_SHA256"
MAX_BODY_ENV = "WORKFLOW_SERVE_MAX_REQUEST_BYTES"
CORS_ENV = "WORKFLOW_SERVE_CORS_ALLOW_ORIGINS"


def error_body(status: int, message: str, code: str | int | None) -> bytes:
    """OpenAI's error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


async def send_error(send, status: int, message: str, code: str | int | None) -> None:
    body = error_body(status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class KeyGuard:
    """ASGI middleware: the key on every path but the health check, and the body size limit (module doc).

    ``api_key_sha256`` None: no key (an open endpoint); the size limit still holds.
    ``cors_preflight``: let CORS preflight requests (``OPTIONS`` with ``Access-Control-Request-Method``,
    which browsers send without credentials) through to the app's CORS middleware.
    """

    def __init__(self, app, *, api_key_sha256: str | None, max_body_bytes: int, cors_preflight: bool = False) -> None:
        self.app = app
        self._digest = api_key_sha256
        self._max = max_body_bytes
        self._cors_preflight = cors_preflight

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self._digest is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), self._digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        preflight = (self._cors_preflight and scope["type"] == "http" and scope.get("method") == "OPTIONS"
                     and b"access-control-request-method" in headers)
        if scope.get("path") not in HEALTH_PATHS and not preflight and not self._authorized(headers):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await send_error(send, 401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                                    "invalid_api_key")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self._max:
            return await send_error(send, 413, f"Request body of {declared} bytes is over the limit of {self._max} "
                                               "bytes.", "request_too_large")
        # The whole body, up to the limit, before the app sees it (a chunked body has no length to check first).
        messages, seen, more = [], 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self._max:
                return await send_error(send, 413, f"Request body over the limit of {self._max} bytes.",
                                        "request_too_large")
            more = message.get("more_body", False)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def route_table(app) -> list[tuple[str, list[str]]]:
    """(path, methods) of every route a Starlette or FastAPI app answers, mounted apps as their prefix
    (methods empty where any method goes). What ``asgi_routes`` of the replicas returns: the list the
    security test sends requests to, read from the app that serves rather than written down."""
    found = []
    for route in getattr(app, "routes", []):
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if path is None:
            continue
        methods = sorted(getattr(route, "methods", None) or [])
        found.append((path if path else "/", methods))
    return found
