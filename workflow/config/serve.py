"""`serve:` — an OpenAI-compatible Ray Serve LLM app, with a smoke check in a recipe run.

``llm_config`` holds ``ray.serve.llm.LLMConfig`` fields verbatim. The run fills in what it
owns: ``model_loading_config.model_source`` (the model stage's output), ``model_id`` (the
recipe's name unless given) and ``lora_config.dynamic_lora_loading_path`` (the train
stage's adapters folder). The checks here need no Ray; the serve stage validates the
whole ``llm_config`` against ``ray.serve.llm.LLMConfig`` before any replica starts
(``workflow.serving.app.validate_llm_config``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..core.secrets import register_secret_env
from .base import Section

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ROUTE_PREFIX = re.compile(r"^/$|^(/[A-Za-z0-9._-]+)+$")
# Shorter keys can be guessed; 16 random characters are beyond that.
MIN_API_KEY_LENGTH = 16


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False


class SmokeConfig(Section):
    """What the serve stage checks before it reports the app as good."""

    # Training rows sent to the base model and to each adapter: the adapter must reproduce
    # the training targets more closely than the base does.
    rows: int = Field(4, ge=1)
    max_tokens: int = Field(96, ge=1)


class RequireConfig(Section):
    """``serve.require``: the promotion gate. What each adapter's scores in the evaluate stage's
    ``metrics.json`` (the unconstrained variant, as clients get it) must reach before it is deployed.

    ``at_least``: metric -> lowest score (``{slot_f1: 0.8}``); ``beats_base_by``: metric -> how far above
    the base model's score (``{slot_f1: 0.5}``). Metric names are the evaluation task's.
    """

    at_least: dict[str, float] = {}
    beats_base_by: dict[str, float] = {}

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys([*self.at_least, *self.beats_base_by]))


class ServeConfig(Section):
    llm_config: dict[str, Any] = {}
    # The promotion gate (RequireConfig): an adapter whose evaluation falls short is not deployed.
    require: RequireConfig = Field(default_factory=RequireConfig)
    # Ray Serve deployment options of the OpenAI ingress (e.g. {num_replicas: 1}); Ray's
    # default is 2 to 1000 autoscaled replicas per model replica.
    ingress_deployment_config: dict[str, Any] = {}
    # Where Serve's HTTP proxy listens. None: 127.0.0.1 on the workflow's own local cluster,
    # 0.0.0.0 (every interface of each node) on a cluster named by RAY_ADDRESS.
    host: str | None = None
    # None: a free port on the workflow's own cluster, Serve's 8000 on a user's cluster
    # (printed, and recorded in <run>/serve/endpoint.json).
    port: int | None = Field(None, ge=1, le=65535)
    # Name of the environment variable that holds the API key (a bearer token). Only the
    # name is kept in recipes, manifests and logs; without it the endpoint is open.
    api_key_env: str | None = None
    # An endpoint that listens beyond loopback needs api_key_env unless this says it may be open.
    allow_unauthenticated: bool = False
    # Largest request body the app reads (bytes); a larger one is refused with 413 before any model sees it.
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    # Origins (e.g. https://app.example.com) whose browser pages may call the endpoint (CORS); none by default.
    cors_allow_origins: list[str] = []
    # Logical CPUs the workflow's own local Ray cluster advertises (not used on a user's cluster):
    # Ray Serve needs more than a 2-core machine's real count or the ingress and proxy
    # replicas never get scheduled.
    num_cpus: int = Field(8, ge=1)
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)
    # Serve even when the base model's tokenizer renders prompts differently from training (see prompts/guard.py).
    allow_prompt_mismatch: bool = False
    # Ray 2.60's direct streaming: each LLM replica serves vLLM's own OpenAI app behind HAProxy,
    # with no Serve proxy or ingress replica on the request path (bench/README.md, "Serving").
    # Then ingress_deployment_config does not apply, the API key is checked by the workflow's
    # LLMServer in front of vLLM's app (every path), and /v1/models lists the base model and the
    # adapters loaded so far.
    direct_streaming: bool = False
    # Where the app answers on a user's cluster (RAY_ADDRESS), beside other recipes' apps: its OpenAI base URL is
    # http://<host>:<port><route_prefix>/v1. None: /<recipe name>. The workflow's own cluster runs one app, at /.
    route_prefix: str | None = None

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, v: str | None) -> str | None:
        if v is not None and not _ROUTE_PREFIX.match(v):
            raise ValueError(f"{v!r}: give a path such as /viggo or /team/viggo (starting with '/', segments of "
                             "letters, digits, '.', '_' or '-', no '/' at the end), or / for the root")
        if v is not None and (v.endswith("/v1") or "/v1/" in v or v.startswith("/-")):
            raise ValueError(f"{v!r}: clashes with the routes the app answers (/v1/...) or Ray Serve's own "
                             "(/-/healthz, /-/routes); choose another path")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable (e.g. WORKFLOW_API_KEY), not the key itself")
        if v is not None:
            register_secret_env(v)  # its value is masked wherever this process writes (core/secrets.py)
        return v

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*" or "," in origin or not re.match(r"^https?://[^/]+$", origin):
                raise ValueError(f"{origin!r}: give each origin as scheme://host[:port] (no '*', no path)")
        return v

    @model_validator(mode="after")
    def _check_llm_config(self) -> ServeConfig:
        if self.direct_streaming and self.ingress_deployment_config:
            raise ValueError("ingress_deployment_config: not used with direct_streaming (the LLM replicas are the "
                             "ingress); set llm_config.deployment_config instead")
        loading = self.llm_config.get("model_loading_config") or {}
        model_id = loading.get("model_id") if isinstance(loading, dict) else None
        if model_id is not None and ":" in str(model_id):
            raise ValueError("llm_config.model_loading_config.model_id: must not contain ':' "
                             "(clients ask for an adapter as '<model_id>:<adapter>')")
        if self.host is not None:
            self.check_open_endpoint(on_cluster=False)
        lora = self.llm_config.get("lora_config")
        if isinstance(lora, dict):
            engine_kwargs = self.llm_config.get("engine_kwargs") or {}
            per_replica = lora.get("max_num_adapters_per_replica")
            max_loras = engine_kwargs.get("max_loras")
            if per_replica is not None and max_loras is not None and per_replica != max_loras:
                raise ValueError(f"llm_config.lora_config.max_num_adapters_per_replica ({per_replica}) must equal "
                                 f"llm_config.engine_kwargs.max_loras ({max_loras})")
        return self

    def route(self, recipe_name: str) -> str:
        """The app's route on a user's cluster: ``route_prefix``, else ``/<recipe name>``."""
        return self.route_prefix or f"/{recipe_name}"

    def listen_host(self, on_cluster: bool) -> str:
        return self.host or ("0.0.0.0" if on_cluster else "127.0.0.1")

    def check_open_endpoint(self, on_cluster: bool) -> None:
        """An endpoint reachable from other hosts has a key, or the recipe says it may be open."""
        host = self.listen_host(on_cluster)
        if not self.api_key_env and not self.allow_unauthenticated and not _is_loopback(host):
            raise ValueError(f"host: {host} is reachable from other hosts, and the endpoint has no API key; set "
                             "serve.api_key_env (the name of a variable holding the key), or "
                             "serve.allow_unauthenticated: true to serve it open")

    def api_key(self, environ) -> str | None:
        """The API key from the variable ``api_key_env`` names (None without one), or a one-line error."""
        if not self.api_key_env:
            return None
        key = environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"serve.api_key_env: ${self.api_key_env} is not set")
        if len(key.strip()) < MIN_API_KEY_LENGTH or key != key.strip():
            raise ValueError(f"serve.api_key_env: ${self.api_key_env} holds {len(key)} characters; an API key needs "
                             f"at least {MIN_API_KEY_LENGTH} and no surrounding spaces (e.g. `python -c \"import "
                             f"secrets; print(secrets.token_urlsafe(32))\"`)")
        return key

    @property
    def model_id(self) -> str | None:
        return (self.llm_config.get("model_loading_config") or {}).get("model_id")
