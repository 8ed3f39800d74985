"""The OpenAI app: the recipe's ``LLMConfig`` completed by the run, and its deployment.

``build_llm_config`` fills in what the run owns (model source, adapters' location, LoRA
limits); ``validate_llm_config`` checks it against ``ray.serve.llm.LLMConfig`` and its
``engine_kwargs`` against vLLM's arguments (``check_recipe_llm_config``: a recipe's, before any
run, for ``workflow validate``); ``deploy``
runs ``build_openai_app`` on the connected cluster, through the workflow's ingress
(``serving/ingress.py``) or, with direct streaming, with vLLM's own OpenAI app in each replica.
"""

from __future__ import annotations

import copy
from typing import Any

from ..config.base import check_engine_kwargs, format_validation_error
from ..config.serve import ServeConfig
from ..core import storage
from ..core.console import say
from ..core.errors import WorkflowError
from ..core.secrets import key_digest
from ..inference.adapters import supported_lora_rank, with_revision
from ..patches import (
    ray_serve_adapter_folders,
    ray_serve_direct_streaming,
    ray_serve_haproxy_listeners,
    ray_serve_http_options,
    supported,
)
from . import guard

APP_NAME = "workflow"  # on the workflow's own cluster; on a user's cluster: app_name(recipe)
INGRESS = "workflow.serving.ingress"
INGRESS_TESTED = {"ray": "==2.60.*"}
# The replicas' server class where adapters are served: Ray's LLMServer with one adapter load per
# replica however many requests ask at once, from a bucket or a local folder (serving/llm_server.py, on
# patches/ray_serve_llm_server.py: it overrides private methods).
SERVER = "workflow.serving.llm_server:LLMServer"
SERVER_TESTED = {"ray": "==2.60.*"}
SERVER_CONSEQUENCE = ("Ray's LLMServer serves: requests arriving together for an adapter a replica has not loaded "
                      "yet may fail with HTTP 500 (vLLM: 'has already been loaded'), adapter names are not checked "
                      "against the adapters folder, and direct streaming cannot check an API key")


def build_llm_config(cfg: ServeConfig, *, model_source: str, default_model_id: str, adapters_uri: str | None,
                     lora_rank: int | None, revision: str | None = None) -> dict[str, Any]:
    """The recipe's ``llm_config`` with what the run owns filled in (the recipe's keys win).

    ``revision``: the commit the model stage pinned a hub model to (vLLM's ``revision`` and ``tokenizer_revision``).
    """
    llm = copy.deepcopy(cfg.llm_config)
    if supported(SERVER.split(":")[0], SERVER_TESTED, SERVER_CONSEQUENCE):
        # Adapters loaded once per replica and only by listed names; with direct streaming, the key checked
        # before anything else (serving/llm_server.py).
        llm.setdefault("server_cls", SERVER)
    loading = llm.setdefault("model_loading_config", {})
    loading.setdefault("model_id", default_model_id)
    loading.setdefault("model_source", model_source)
    if revision is not None:
        llm["engine_kwargs"] = with_revision(llm.get("engine_kwargs") or {}, revision)
    if adapters_uri is not None:
        lora = llm.setdefault("lora_config", {})
        lora.setdefault("dynamic_lora_loading_path", adapters_uri)
        engine = llm.setdefault("engine_kwargs", {})
        engine.setdefault("enable_lora", True)
        # Ray's and vLLM's limits on resident adapters must agree (config/serve.py checks
        # that they do when both are given); fill in the one that is missing.
        per_replica = lora.get("max_num_adapters_per_replica", engine.get("max_loras", 16))
        lora["max_num_adapters_per_replica"] = engine["max_loras"] = per_replica
        if lora_rank is not None:
            engine.setdefault("max_lora_rank", supported_lora_rank(lora_rank))
    return llm


def validate_llm_config(llm: dict[str, Any], where: str):
    """``ray.serve.llm.LLMConfig`` from ``llm``, or a one-line error naming the field.

    ``engine_kwargs`` is checked too: Ray Serve LLM passes each key to vLLM's engine or its
    OpenAI front end, and refuses any other only when a replica starts.
    """
    from pydantic import ValidationError
    from ray.serve.llm import LLMConfig

    try:
        config = LLMConfig.model_validate(llm)
    except ValidationError as err:
        raise WorkflowError(format_validation_error(err, where)) from None
    check_engine_kwargs(config.engine_kwargs, f"{where}.engine_kwargs", also=_frontend_arg_names())
    return config


def _frontend_arg_names() -> set[str]:
    """vLLM's OpenAI front-end arguments, which Ray Serve LLM also takes in ``engine_kwargs``."""
    import dataclasses

    try:
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
    except ImportError:  # vLLM before 0.30 kept them with the OpenAI server
        from vllm.entrypoints.openai.cli_args import FrontendArgs
    return {f.name for f in dataclasses.fields(FrontendArgs)}


def check_recipe_llm_config(recipe) -> None:
    """``validate_llm_config`` of a recipe's ``serve.llm_config`` as the serve stage builds it.

    What the run fills in is taken from the recipe where it says (the model source, the LoRA
    rank) and otherwise stands in with a value of the same form (``workflow validate``).
    """
    model = recipe.model
    model_source = (storage.join(recipe.run_uri, "model", "weights") if model.is_tiny or model.mirror
                    else model.source)
    adapters_uri, lora_rank = None, None
    if recipe.train is not None:
        adapters_dir = storage.join(recipe.run_uri, "train", "adapters")
        # A local folder as the replicas name it (patches/ray_serve_adapter_folders.py; None outside its Ray versions,
        # where the serve stage refuses it).
        adapters_uri = ray_serve_adapter_folders.served_uri(adapters_dir)
        lora_rank = recipe.train.llamafactory.get("lora_rank", 8)  # LLaMA-Factory's default rank
    llm = build_llm_config(recipe.serve, model_source=model_source, default_model_id=recipe.name,
                           adapters_uri=adapters_uri, lora_rank=lora_rank)
    validate_llm_config(llm, f"{recipe.path or recipe.name}: serve.llm_config")


def ingress_cls_config(api_key: str | None, cfg: ServeConfig | None = None) -> dict[str, Any] | None:
    """The workflow's ingress (serving/ingress.py): the key (passed as its digest) in front of every path, the
    body limit and CORS origins of ``cfg``, OpenAI-format errors, adapters only by listed names.

    It subclasses Ray's private ``OpenAiIngress``, so it is used only with the Ray versions in
    ``INGRESS_TESTED``; elsewhere Ray's own ingress serves (None), which cannot check a key.
    """
    if not supported(INGRESS, INGRESS_TESTED, "Ray's own ingress serves the app: no API key check, "
                     "errors in FastAPI's form instead of OpenAI's, every origin allowed (CORS)"):
        if api_key:
            raise WorkflowError(f"serve.api_key_env needs the workflow ingress, which is tested on ray "
                                f"{INGRESS_TESTED['ray']} only", hint="use that Ray")
        return None
    cfg = cfg or ServeConfig()
    extra: dict[str, Any] = {"max_body_bytes": cfg.max_request_bytes, "cors_allow_origins": cfg.cors_allow_origins}
    if api_key:
        extra["api_key_sha256"] = key_digest(api_key)
    return {"ingress_cls": f"{INGRESS}:WorkflowIngress", "ingress_extra_kwargs": extra}


# The cluster's side of direct streaming (ServeConfig.direct_streaming): HAProxy in front, the
# LLM replicas as the ingress, request bodies forwarded to the router (adapter routing). A stopping
# ingress replica is held open for Serve's minimum draining period, 30 s by default, so that an
# external load balancer (an ALB) can deregister it: here HAProxy runs on the replica's node, is
# reconfigured by Serve itself and retries refused connections, so 2 s is enough, and every stop
# and replica replacement of the workflow's own cluster is 28 s shorter. In-flight requests are
# still drained (up to the deployment's graceful_shutdown_timeout_s).
DIRECT_STREAMING_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
                        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
                        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def direct_streaming_env(api_key: str | None, cfg: ServeConfig | None = None) -> dict[str, str]:
    """The cluster's environment for direct streaming: the replicas then serve vLLM's own OpenAI app, wrapped
    by the workflow's LLMServer in the key check (serving/guard.py), which reads the key's digest (never the
    key), the body limit and the CORS origins from here."""
    cfg = cfg or ServeConfig()
    if api_key and not supported(SERVER.split(":")[0], SERVER_TESTED, SERVER_CONSEQUENCE):
        raise WorkflowError(f"serve.api_key_env with serve.direct_streaming needs the workflow's LLMServer, which is "
                            f"tested on ray {SERVER_TESTED['ray']} only", hint="use that Ray, or set "
                            "serve.direct_streaming: false (the workflow ingress checks the key)")
    env = {**DIRECT_STREAMING_ENV, **ray_serve_haproxy_listeners.cluster_env(),
           guard.MAX_BODY_ENV: str(cfg.max_request_bytes), guard.CORS_ENV: ",".join(cfg.cors_allow_origins)}
    if api_key:
        env[guard.DIGEST_ENV] = key_digest(api_key)
    return env


def with_cors_origins(llm: dict[str, Any], cfg: ServeConfig) -> dict[str, Any]:
    """``llm`` with vLLM's CORS origins (its app answers with direct streaming): the recipe's list, none by
    default (the recipe's ``engine_kwargs.allowed_origins`` wins)."""
    if cfg.cors_allow_origins:
        llm.setdefault("engine_kwargs", {}).setdefault("allowed_origins", list(cfg.cors_allow_origins))
    return llm


def app_name(recipe_name: str) -> str:
    """The Serve application of a recipe on a shared cluster (``workflow stop`` finds it by this name)."""
    return f"workflow-{recipe_name}"


def running_http_options() -> tuple[str, int] | None:
    """Host and port of the connected cluster's Serve proxies, or None where Serve does not run yet.

    Serve fixes its HTTP options when it starts: a later ``serve.start`` with other options is
    ignored with a log warning only, and the app would answer somewhere else than asked.
    Serve has no public reader: ``patches/ray_serve_http_options.py`` reads them on the tested Ray
    (elsewhere None, with one warning line).
    """
    return ray_serve_http_options.running_http_options()


def deploy(llm_config, *, host: str, port: int, ingress_cls_config: dict[str, Any] | None,
           ingress_deployment_config: dict[str, Any], direct_streaming: bool = False, name: str = APP_NAME,
           route_prefix: str = "/") -> None:
    """Run the OpenAI app on the connected cluster as ``name`` at ``route_prefix`` (an app of that name already
    there is updated in place: Serve's rolling update); ``wait_until_deployed`` waits for it.

    Under a prefix other than ``/`` Serve's proxy sets the ASGI ``root_path`` to it and keeps the full path;
    Starlette's routing (the ingress, FastAPI) matches the path less the ``root_path``, so the app's routes
    answer at ``<route_prefix>/v1/...``.

    ``ingress_cls_config`` None keeps Ray's own ``OpenAiIngress`` (the benchmark's baseline).
    With ``direct_streaming`` (the cluster started with ``DIRECT_STREAMING_ENV``) the LLM
    replicas are the ingress: no ingress class or ingress deployment options apply; one fixed
    replica runs without Ray's router deployment (``ray_serve_direct_streaming.single_replica_app``).
    """
    from ray import serve
    from ray.serve.llm import build_openai_app

    # Direct streaming is a build-time switch of Ray's modules in this process (see the patch).
    ray_serve_direct_streaming.set_direct_streaming(direct_streaming)
    serve.start(http_options={"host": host, "port": port})
    if direct_streaming and _one_replica(llm_config) and _reads_adapter_from_body(llm_config):
        application = ray_serve_direct_streaming.single_replica_app(llm_config)
    else:
        args: dict[str, Any] = {"llm_configs": [llm_config]}
        if not direct_streaming:
            args["ingress_deployment_config"] = ingress_deployment_config
            if ingress_cls_config is not None:
                args["ingress_cls_config"] = ingress_cls_config
        application = build_openai_app(args)
    try:
        serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
    except Exception as err:  # RayServeException, raised in the controller and re-raised here
        if "is being used by application" not in str(err):
            raise
        raise WorkflowError(f"serve: route {route_prefix} is taken on this cluster: "
                            f"{str(err).splitlines()[-1].strip()}",
                            hint="set serve.route_prefix in the recipe to a route of its own") from None


def _one_replica(llm_config) -> bool:
    """A fixed count of one replica (no autoscaling): no replica to choose, no router needed."""
    deployment = llm_config.deployment_config or {}
    return deployment.get("num_replicas") == 1 and not deployment.get("autoscaling_config")


def _reads_adapter_from_body(llm_config) -> bool:
    """Adapters reach a replica without Ray's router only through the workflow's LLMServer."""
    server = llm_config.server_cls  # a class once validated
    return llm_config.lora_config is None or f"{server.__module__}:{server.__qualname__}" == SERVER


def application_status(name: str) -> str | None:
    """The status of the connected cluster's application ``name`` (RUNNING, DEPLOYING, ...), None if it has none."""
    from ray import serve

    found = serve.status().applications.get(name)
    return None if found is None else found.status.value


def wait_until_deployed(name: str, *, timeout_s: float = 1200) -> None:
    """Wait until the application ``name`` just (re)deployed is RUNNING. While an in-place update rolls, the
    app's old replicas may still answer (and Serve reports it DEPLOYING from the moment ``serve.run`` returns),
    so an answer alone could smoke-check the old version. A failed deploy is one line with Serve's message."""
    import time

    from ray import serve

    deadline, said = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        found = serve.status().applications.get(name)
        if found is not None:
            if found.status == "RUNNING":
                return
            waiting = [" ".join(d.message.split()) for d in found.deployments.values() if d.message]
            if waiting and waiting[0] != said:  # e.g. replicas that cannot be scheduled, and the resources they need
                said = waiting[0]
                say(f"[serve] Ray Serve: {said[:400]}")
            if found.status == "DEPLOY_FAILED":
                message = " ".join(found.message.split())[:400]
                raise WorkflowError(f"serve: Ray Serve could not deploy the application {name}: {found.status.value}: "
                                    f"{message}", hint="the replicas' logs are in the cluster's Ray session folder")
        time.sleep(2)
    raise WorkflowError(f"serve: the application {name} was not RUNNING after {timeout_s:.0f} s",
                        hint="check the cluster's free resources (`ray status`)")


def workflow_apps(host: str) -> list[dict[str, str]]:
    """The workflow's applications (``workflow-*``) the connected cluster's Serve runs: name, route (from the
    proxy's ``/-/routes`` at ``host``, Serve's port), status; empty where Serve does not run."""
    import httpx
    from ray import serve

    listening = running_http_options()
    if listening is None:
        return []
    statuses = {name: found.status for name, found in serve.status().applications.items()
                if name.startswith(f"{APP_NAME}-")}
    try:
        routes = httpx.get(f"http://{host}:{listening[1]}/-/routes", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        routes = {}
    route_of = {app_of: route for route, app_of in routes.items()}
    return [{"name": name, "route": route_of.get(name, "?"), "status": status.value}
            for name, status in sorted(statuses.items())]


def delete(name: str) -> bool:
    """Delete the Serve application ``name`` from the connected cluster; True if it was there."""
    from ray import serve

    if name not in serve.status().applications:
        return False
    serve.delete(name)
    return True
