"""Ray Serve LLM's OpenAI ingress, with an optional API key and OpenAI-format errors on every route.

``build_openai_app`` takes the ingress class by name (``ingress_cls_config``); this one is
``OpenAiIngress`` whose routes first check ``Authorization: Bearer <key>`` (when
``api_key_sha256`` is given) and turn the ``HTTPException``s that Ray raises for an unknown
model or adapter (FastAPI would answer ``{"detail": ...}``) into OpenAI's error body. The
replica gets the key's SHA-256 digest as an argument, never the key: the digest is all it
compares against, so the app can be deployed on any cluster (nothing in the nodes'
environment) and Serve's deployment config, the recipe and the manifests hold no key.
Serve's own health check ``/-/healthz`` is answered by the proxy and needs no key.

It subclasses a private Ray class: ``serving.app.ingress_cls_config`` names it only for the Ray
versions it was tested on (``INGRESS_TESTED`` there). Only the Ray replicas import this module.
"""

from __future__ import annotations

import functools
import hmac
import inspect

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress

from ..core.secrets import key_digest


def openai_error(status_code: int, message: str, code: str | int | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return JSONResponse(status_code=status_code,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


class WorkflowIngress(OpenAiIngress):
    def __init__(self, *args, api_key_sha256: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._api_key_sha256 = api_key_sha256

    def _refusal(self, request: Request) -> JSONResponse | None:
        """OpenAI's 401 answer unless the key is off or the request carries ``Authorization: Bearer <key>``."""
        if self._api_key_sha256 is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), self._api_key_sha256):
            return None
        return openai_error(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", "invalid_api_key")


def _guarded(method):
    """``method`` behind the key check, with a ``request`` parameter FastAPI fills in."""
    sig = inspect.signature(method, eval_str=True)
    adds_request = "request" not in sig.parameters

    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        request = kwargs.pop("request") if adds_request else kwargs["request"]
        refusal = self._refusal(request)
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
    setattr(WorkflowIngress, _name, _guarded(getattr(OpenAiIngress, _name)))
