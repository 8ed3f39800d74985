"""The online app: a Ray Serve LLM OpenAI app on a Ray cluster that outlives its launcher.

Lifecycle. ``start_cluster`` runs ``ray start --head --block`` on loopback ports in a new
session (its own process group) and records it in a local state file; ``deploy`` connects,
starts Serve's HTTP proxy on the chosen host/port and runs ``build_openai_app``; the
launcher may then exit (``--detach``) and the app keeps serving. ``stop_cluster`` shuts
Serve down (applications, replicas, proxy) and then ends that one cluster by its process
group, and then any process still carrying the cluster's marker variable (Ray workers and
vLLM's engine processes can sit in other groups): never ``ray stop``, which would end every
Ray cluster of the user on the machine.

Adapters. Ray Serve LLM loads adapters on demand from ``lora_config.dynamic_lora_loading_path``
and accepts only remote URIs there. With s3:// or gs:// storage that is the run's
``train/adapters`` folder itself. With local storage the adapters are published to an
S3-compatible server on loopback (moto, run as a detached actor inside the same cluster so
that it lives and dies with the app), and the cluster's ``AWS_ENDPOINT_URL`` points Ray's
downloader at it. Adapters trained after the deploy appear on the next deploy.

Ray, boto3, moto, httpx and psutil are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import storage
from .config.recipe import format_validation_error
from .config.serve import ServeConfig
from .errors import WorkflowError
from .secrets import redact

APP_NAME = "workflow"
LOOPBACK_BUCKET = "workflow-adapters"
LOOPBACK_S3_ACTOR = "workflow-loopback-s3"
# Set in the environment of every process of a serving cluster, to its address.
CLUSTER_MARKER = "WORKFLOW_SERVE_CLUSTER"
# vLLM accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the LLMConfig

def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise WorkflowError(f"LoRA rank {rank} is larger than vLLM supports ({LORA_RANKS[-1]})")


def build_llm_config(cfg: ServeConfig, *, model_source: str, default_model_id: str, adapters_uri: str | None,
                     lora_rank: int | None) -> dict[str, Any]:
    """The recipe's ``llm_config`` with what the run owns filled in (the recipe's keys win)."""
    llm = copy.deepcopy(cfg.llm_config)
    loading = llm.setdefault("model_loading_config", {})
    loading.setdefault("model_id", default_model_id)
    loading.setdefault("model_source", model_source)
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
    """``ray.serve.llm.LLMConfig`` from ``llm``, or a one-line error naming the field."""
    from pydantic import ValidationError
    from ray.serve.llm import LLMConfig

    try:
        return LLMConfig.model_validate(llm)
    except ValidationError as err:
        raise WorkflowError(format_validation_error(err, where)) from None


# ---------------------------------------------------------------- the cluster

def _ray_executable() -> str:
    return str(Path(sys.executable).parent / "ray")


def start_cluster(state_dir: Path, *, num_cpus: int, env_vars: dict[str, str]) -> dict[str, Any]:
    """Start a one-node Ray cluster on loopback ports in its own process group; return its state.

    ``env_vars`` are added to the cluster's environment, which every worker (the Serve
    replicas) inherits: that is how AWS_ENDPOINT_URL and the API key reach them without
    appearing in any Ray config.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    gcs_port = free_port()
    # Ray puts unix sockets under the temp dir; keep its path short (108-byte limit).
    temp_dir = Path("/tmp") / f"wf-ray-{gcs_port}"
    log = open(state_dir / "ray-head.log", "w")  # noqa: SIM115 - the cluster writes to it after we exit
    cmd = [_ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=false", f"--temp-dir={temp_dir}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}"]
    state = {"address": f"127.0.0.1:{gcs_port}", "temp_dir": str(temp_dir), "log": str(state_dir / "ray-head.log")}
    # Token authentication, with Ray's per-user token (~/.ray/auth_token, made if missing);
    # CLUSTER_MARKER tags every process of this cluster (workers inherit the environment).
    env = {**os.environ, **env_vars, "RAY_AUTH_MODE": "token", CLUSTER_MARKER: state["address"],
           "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state["pid"] = proc.pid
    # The GCS port opens before the node registers; `ray start` says when the node is up.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkflowError(f"the Ray head node exited at start (code {proc.returncode}); see {state['log']}")
        if "Ray runtime started" in Path(state["log"]).read_text(errors="replace"):
            return state
        time.sleep(1)
    stop_cluster(state)
    raise WorkflowError(f"the Ray head node did not start within 300 s; see {state['log']}")


def connect(state: dict[str, Any]) -> None:
    import ray

    if not ray.is_initialized():
        from ray._raylet import Config

        # Ray reads its auth mode into a process-wide config when first imported; reload it.
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
        ray.init(address=state["address"], include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, namespace="workflow")


def cluster_alive(state: dict[str, Any]) -> bool:
    # When this process started the cluster, the head is its child: reap it once it has exited,
    # or the zombie keeps its process group "alive" through both waits of stop_cluster.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(state["pid"], os.WNOHANG)
    try:
        os.killpg(state["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_cluster(state: dict[str, Any], *, timeout_s: float = 60) -> None:
    """Shut Serve down, then end the cluster's process group (only the one we started), then
    whatever of the cluster outlived the group."""
    known = cluster_processes(state["address"])
    if cluster_alive(state):
        try:
            connect(state)
            from ray import serve

            serve.shutdown()
        except Exception as err:  # noqa: BLE001 - a half-dead cluster is ended below anyway
            print(f"[serve] Serve shutdown: {type(err).__name__}: {redact(str(err))[:200]}", flush=True)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not cluster_alive(state):
            break
        os.killpg(state["pid"], sig)
        deadline = time.monotonic() + timeout_s / 2
        while cluster_alive(state) and time.monotonic() < deadline:
            time.sleep(0.5)
    _end_leftovers(known + cluster_processes(state["address"]), timeout_s=timeout_s)


def cluster_processes(address: str) -> list:
    """The cluster's processes (psutil.Process): those carrying its marker variable, and their
    descendants (a child may be started with an environment of its own)."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(CLUSTER_MARKER) == address:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:  # gone, or another user's
            continue
    return list(found.values())


def _end_leftovers(procs: list, *, timeout_s: float) -> None:
    """End what outlived the process group. Ray puts its workers in groups of their own, and
    after the head's group is gone the Serve controller, the replicas and vLLM's engine core
    and CPU worker (the replica's children) keep running, holding the model's memory and cores."""
    import psutil

    left = list({p.pid: p for p in procs if p.is_running()}.values())  # is_running: False if the pid was reused
    if not left:
        return
    print(f"[serve] ending {len(left)} process(es) the cluster left behind: "
          f"{', '.join(sorted({_title(p) for p in left}))}", flush=True)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s / 2)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _title(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())[:60].strip() or proc.name()
    except psutil.Error:
        return str(proc.pid)


# ---------------------------------------------------------------- adapters on loopback S3

class LoopbackS3:
    """A moto S3 server on 127.0.0.1, hosted by a detached actor of the serving cluster."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()

    def ready(self) -> bool:
        return True


def loopback_env(port: int) -> dict[str, str]:
    """What points boto3 (Ray's adapter downloader) at the loopback server."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "loopback",
            "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_DEFAULT_REGION": "us-east-1"}


def publish_adapters_on_loopback(adapters_uri: str, port: int, run_name: str) -> str:
    """Start the loopback S3 server in the cluster and copy the adapters into it; return their URI."""
    import boto3
    import ray

    actor = ray.remote(num_cpus=0)(LoopbackS3).options(name=LOOPBACK_S3_ACTOR, lifetime="detached")
    ray.get(actor.remote(port).ready.remote(), timeout=60)
    env = loopback_env(port)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=LOOPBACK_BUCKET)
    root = storage.local_path(adapters_uri)
    # adapter_config.json last: Ray lists an adapter once that file is there.
    files = sorted(root.rglob("*"), key=lambda p: (p.name == "adapter_config.json", str(p)))
    for path in files:
        if path.is_file():
            client.upload_file(str(path), LOOPBACK_BUCKET, f"{run_name}/{path.relative_to(root).as_posix()}")
    return f"s3://{LOOPBACK_BUCKET}/{run_name}"


# ---------------------------------------------------------------- deploy

def ingress_cls_config(api_key_env: str | None) -> dict[str, Any]:
    """The workflow's ingress (workflow/serve_ingress.py): optional API key, OpenAI-format errors."""
    return {"ingress_cls": "workflow.serve_ingress:WorkflowIngress",
            "ingress_extra_kwargs": {"api_key_env": api_key_env} if api_key_env else {}}


# The cluster's side of direct streaming (ServeConfig.direct_streaming): HAProxy in front, the
# LLM replicas as the ingress, request bodies forwarded to the router (adapter routing).
DIRECT_STREAMING_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
                        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}


def direct_streaming_env(api_key: str | None) -> dict[str, str]:
    """The cluster's environment for direct streaming; the replicas then serve vLLM's own
    OpenAI app, which checks ``VLLM_API_KEY`` on /v1 routes (there is no workflow ingress)."""
    return {**DIRECT_STREAMING_ENV, **({"VLLM_API_KEY": api_key} if api_key else {})}


def deploy(llm_config, *, host: str, port: int, ingress_cls_config: dict[str, Any] | None,
           ingress_deployment_config: dict[str, Any], direct_streaming: bool = False) -> None:
    """Run the OpenAI app on the connected cluster and wait until it is RUNNING.

    ``ingress_cls_config`` None keeps Ray's own ``OpenAiIngress`` (the benchmark's baseline).
    With ``direct_streaming`` (the cluster started with ``DIRECT_STREAMING_ENV``) the LLM
    replicas are the ingress: no ingress class or ingress deployment options apply.
    """
    from ray import serve
    from ray.llm._internal.serve.core.ingress import builder
    from ray.serve._private import build_app
    from ray.serve.llm import build_openai_app

    # The app is built here, in the driver, whose Ray modules read these flags from the
    # environment once, at import (the cluster's processes get DIRECT_STREAMING_ENV). Set on
    # every call, so that one process can deploy both kinds of app (bench/serve_latency.py).
    builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING = direct_streaming
    args: dict[str, Any] = {"llm_configs": [llm_config]}
    if direct_streaming:
        builder.RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY = True
        build_app.RAY_SERVE_ENABLE_HA_PROXY = True
    else:
        args["ingress_deployment_config"] = ingress_deployment_config
        if ingress_cls_config is not None:
            args["ingress_cls_config"] = ingress_cls_config
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_openai_app(args), name=APP_NAME, route_prefix="/", blocking=False)


# ---------------------------------------------------------------- clients

def client_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_chat(base_url: str, model: str, messages: list[dict], *, api_key: str | None, max_tokens: int,
                timeout_s: float = 120) -> str:
    """One streaming chat completion, greedy; the text, or an error naming the status."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    parts = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, headers=client_headers(api_key),
                      timeout=timeout_s) as resp:
        if resp.status_code != 200:
            resp.read()
            raise WorkflowError(f"serve: {model!r} answered HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise WorkflowError(f"serve: {model!r} streamed an error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def list_models(base_url: str, api_key: str | None) -> list[str]:
    import httpx

    resp = httpx.get(f"{base_url}/models", headers=client_headers(api_key), timeout=60)
    resp.raise_for_status()
    return [m["id"] for m in resp.json()["data"]]


def wait_until_answering(base_url: str, model_id: str, api_key: str | None, *, timeout_s: float = 600) -> None:
    """Poll until the base model answers one request (replicas and the engine are up)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            stream_chat(base_url, model_id, [{"role": "user", "content": "hi"}], api_key=api_key, max_tokens=1,
                        timeout_s=60)
            return
        except (httpx.HTTPError, WorkflowError) as err:
            last = str(err)[:200]
            time.sleep(3)
    raise WorkflowError(f"serve: the app did not answer within {timeout_s:.0f} s (last: {last})")


# ---------------------------------------------------------------- smoke check

def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def smoke_check(base_url: str, *, model_id: str, adapters: list[str], rows: list[dict], api_key: str | None,
                max_tokens: int) -> dict[str, Any]:
    """Ask the base model and each adapter about training rows; the adapters must be closer to the targets.

    A model "reproduces" a target when its answer equals it; since a short CPU training
    rarely gets there, the mean similarity (difflib ratio) to the targets is compared as
    well: an adapter passes when it has more exact matches than the base, or as many and
    a higher mean similarity.
    """
    from .prompts import expected_output, row_messages

    models = [model_id] + [f"{model_id}:{a}" for a in adapters]
    results: dict[str, Any] = {"base_url": base_url, "model_ids": models, "models": {}}
    for model in models:
        answers = []
        for row in rows:
            answer = stream_chat(base_url, model, row_messages(row), api_key=api_key, max_tokens=max_tokens)
            answers.append({"answer": answer, "target": expected_output(row),
                            "similarity": round(similarity(answer, expected_output(row) or ""), 4)})
        results["models"][model] = {
            "answered": all(a["answer"].strip() for a in answers),
            "exact": sum(a["answer"].strip() == (a["target"] or "").strip() for a in answers),
            "mean_similarity": round(sum(a["similarity"] for a in answers) / len(answers), 4),
            "samples": answers,
        }
        print(f"[serve] smoke {model}: exact {results['models'][model]['exact']}/{len(rows)}, "
              f"similarity {results['models'][model]['mean_similarity']:.3f}", flush=True)
    # Listed after the requests: with direct streaming /v1/models shows the adapters loaded so far.
    results["listed"] = listed = list_models(base_url, api_key)
    base = results["models"][model_id]
    problems = [f"{m} is not listed by /v1/models" for m in models if m not in listed]
    problems += [f"{m} gave an empty answer" for m, r in results["models"].items() if not r["answered"]]
    for model in models[1:]:
        r = results["models"][model]
        r["beats_base"] = (r["exact"], r["mean_similarity"]) > (base["exact"], base["mean_similarity"])
        if not r["beats_base"]:
            problems.append(f"{model} is no closer to its training targets than the base model "
                            f"(exact {r['exact']} vs {base['exact']}, similarity {r['mean_similarity']:.3f} "
                            f"vs {base['mean_similarity']:.3f})")
    results["passed"] = not problems
    results["problems"] = problems
    return results


def usage_text(base_url: str, model_ids: list[str], api_key_env: str | None) -> str:
    """Ready-to-paste curl and openai examples for the served models."""
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    key = f'os.environ["{api_key_env}"]' if api_key_env else '"none"'
    model = model_ids[-1]
    return "\n".join([
        f"base URL: {base_url}",
        "models:   " + ", ".join(model_ids),
        "",
        f"curl{auth} {base_url}/models",
        f"curl -N{auth} -H 'Content-Type: application/json' {base_url}/chat/completions \\",
        f"  -d '{{\"model\": \"{model}\", \"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        "",
        "python - <<'EOF'",
        "import os",
        "from openai import OpenAI",
        f"client = OpenAI(base_url=\"{base_url}\", api_key={key})",
        f"stream = client.chat.completions.create(model=\"{model}\", stream=True,",
        "                                        messages=[{\"role\": \"user\", \"content\": \"Hello\"}])",
        "for chunk in stream:",
        "    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)",
        "EOF",
    ])
