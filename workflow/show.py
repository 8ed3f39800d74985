"""``workflow show``: a run's stages, their outputs, and how each links to its inputs."""

from __future__ import annotations

import os

from .config import load_recipe
from .core import envs, manifest, ray_cluster, storage
from .evaluation.metrics import format_value
from .stages import ORDER


def run_uri_of(target: str) -> str:
    """A recipe file names its run; anything else is taken as the run's storage URI."""
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        return load_recipe(target).run_uri
    return target.rstrip("/")


def lineage(run_uri: str) -> dict[str, dict]:
    """Each completed stage's manifest, keyed by stage, in pipeline order."""
    found = {}
    for stage in ORDER:
        m = manifest.read(storage.join(run_uri, stage))
        if m is not None:
            found[stage] = m
    return found


def show(target: str) -> None:
    run_uri = run_uri_of(target)
    stages = lineage(run_uri)
    print(f"run {run_uri}")
    if not stages:
        print("  no completed stage (no manifest.json under this run)")
        return
    by_fp = {m["fingerprint"]: s for s, m in stages.items()}
    for stage in ORDER:
        m = stages.get(stage)
        if m is None:
            print(f"\n{stage}: not completed")
            continue
        print(f"\n{stage}: done {m['finished_at']}  fingerprint {m['fingerprint'][:12]}")
        for name, value in m["inputs"].items():
            source = by_fp.get(value)
            link = f"<- {source} stage" if source else ""
            print(f"  input  {name}: {str(value)[:12]} {link}".rstrip())
        for name, uri in m["outputs"].items():
            print(f"  output {name}: {uri}")
        for key in ("rows", "adapter_name", "lora_rank", "final_loss", "metrics", "parity", "model_ids", "base_url"):
            if key in m.get("summary", {}):
                print(f"  {key}: {m['summary'][key]}")
        if stage == "serve" and "endpoint" in m["outputs"]:
            print(f"  app: {app_status(m['outputs']['endpoint'])}")
    address = os.environ.get(ray_cluster.ADDRESS_ENV)
    if address:
        print("\n" + "\n".join(cluster_apps(address)))


def app_status(endpoint_uri: str) -> str:
    """Where the served app runs and whether it answers, from its ``endpoint.json`` and one HTTP request."""
    import urllib.error
    import urllib.request

    endpoint = storage.read_json(endpoint_uri) if storage.exists(endpoint_uri) else {}
    where = (f"application {endpoint['app']} on the Ray cluster at {endpoint['ray_address']}"
             if endpoint.get("app") else "on a Ray cluster of the workflow's own")
    if endpoint.get("stopped_at"):
        return f"{where}, stopped {endpoint['stopped_at']}"
    if not endpoint.get("detached"):
        return f"{where}, shut down after its smoke check"
    try:  # any HTTP answer means the app is up; the models route may want the key
        urllib.request.urlopen(f"{endpoint['base_url']}/models", timeout=5)
        answer = "answering"
    except urllib.error.HTTPError as err:
        answer = "answering" if err.code in (401, 403) else f"answering HTTP {err.code}"
    except OSError as err:
        answer = f"not answering ({type(err).__name__})"
    return f"{where}, detached: {answer} at {endpoint['base_url']}"


def cluster_apps(address: str) -> list[str]:
    """Lines naming the workflow's apps (``workflow-*``) that the Ray cluster at ``address`` serves: name, route,
    status, base URL. Quick where no cluster answers (a 3 s connection probe), and never an error."""
    import socket

    lines = [f"workflow apps on the Ray cluster at {address}:"]
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as err:
            return [*lines, f"  none listed: the cluster does not answer ({type(err).__name__})"]
    try:
        import ray

        from .serving import app

        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            listening = app.running_http_options()
            public = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
            if listening is not None and listening[0] not in ("0.0.0.0", "::"):
                public = listening[0]
            found = app.workflow_apps(public)
        finally:
            ray.shutdown()
    except Exception as err:  # noqa: BLE001 - a listing that cannot be had is one line, not a failure of `show`
        return [*lines, f"  none listed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"]
    if not found:
        return [*lines, "  none (Ray Serve runs no workflow app there)"]
    width = max(len(a["name"]) for a in found)
    for a in found:
        url = f"http://{public}:{listening[1]}{a['route'].rstrip('/')}/v1" if a["route"] != "?" else ""
        lines.append(f"  {a['name']:<{width}}  {a['route']:<16} {a['status']:<13} {url}".rstrip())
    return lines


def run_summary(recipe) -> str:
    """What `workflow run` prints at the end: where everything is, the metrics, how to serve."""
    stages = lineage(recipe.run_uri)
    lines = [f"\n== {recipe.name}: done. Storage {recipe.run_uri}"]
    for stage, m in stages.items():
        shown = {k: v for k, v in m["outputs"].items() if not k.endswith((".parquet", ".md"))}
        lines.append(f"  {stage:<9} " + ", ".join(f"{k}: {v}" for k, v in shown.items()))
    lines.append(f"  {'logs':<9} {storage.join(recipe.run_uri, 'logs')} (each stage's full output)")
    lines.append(f"  {'report':<9} {storage.join(recipe.run_uri, 'report.html')} (the run on one page, for a browser)")
    evaluation = stages.get("evaluate", {}).get("summary", {}).get("metrics")
    if evaluation:
        names = list(next(iter(evaluation.values())))
        lines.append("\n  " + f"{'variant':<28}" + "".join(f"{n[:12]:>13}" for n in names))
        for variant, values in evaluation.items():
            lines.append("  " + f"{variant:<28}" + "".join(f"{format_value(values.get(n))[:12]:>13}" for n in names))
    served = stages.get("serve", {}).get("summary", {}).get("model_ids")
    if served:
        lines.append(f"\n  served and smoke-checked: {', '.join(served)}")
    command = envs.command()
    lines.append("")
    if recipe.serve is not None:  # `workflow serve` needs the recipe's serve section
        what = "the adapter" if recipe.train is not None else "the model  "
        lines.append(f"  serve {what}:  {command} serve {recipe.path} --detach   (stop: {command} stop {recipe.path})")
    lines.append(f"  lineage:            {command} show {recipe.path}")
    return "\n".join(lines)
