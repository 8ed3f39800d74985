"""Ray Serve LLM's OpenAI ingress with an API key on every route.

``build_openai_app`` takes the ingress class by name (``ingress_cls_config``); this one is
``OpenAiIngress`` whose routes first check ``Authorization: Bearer <key>``. The key is
read in the replica from the environment variable named by ``api_key_env`` (the Ray
cluster inherits it from the serve stage), so it never appears in Ray's deployment
config, the recipe or a manifest. Serve's own health check ``/-/healthz`` is answered by
the proxy and needs no key.

Only the serve stage and the Ray replicas import this module (it imports Ray LLM).
"""

from __future__ import annotations

import functools
import hmac
import inspect
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress


class ApiKeyIngress(OpenAiIngress):
    def __init__(self, *args, api_key_env: str, **kwargs):
        super().__init__(*args, **kwargs)
        key = os.environ.get(api_key_env, "")
        if not key:
            raise RuntimeError(f"{api_key_env} is not set in the ingress replica's environment")
        self._api_key = key.encode()

    def _refusal(self, request: Request) -> JSONResponse | None:
        """OpenAI's 401 answer unless the request carries ``Authorization: Bearer <key>``."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key):
            return None
        return JSONResponse(status_code=401, content={"error": {
            "message": "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})


def _requiring_api_key(method):
    """``method`` behind the key check, with a ``request`` parameter FastAPI fills in."""
    sig = inspect.signature(method, eval_str=True)
    adds_request = "request" not in sig.parameters

    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        request = kwargs.pop("request") if adds_request else kwargs["request"]
        return self._refusal(request) or await method(self, *args, **kwargs)

    if adds_request:
        extra = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        sig = sig.replace(parameters=[*sig.parameters.values(), extra])
    guarded.__signature__ = sig  # FastAPI reads the routes' parameters from here
    return guarded


for _name in DEFAULT_ENDPOINTS:
    setattr(ApiKeyIngress, _name, _requiring_api_key(getattr(OpenAiIngress, _name)))
