"""The CPU recipe end to end on a Ray cluster of several nodes that the user started.

One cluster for the module (tests/netns_cluster.py): a head with no CPUs in this machine's
network namespace and two worker nodes, each in a network namespace (its own IP) and a mount
namespace (its own ``/tmp`` and home) of its own, every node started with ``ray start`` from
the serve environment, as a user would start them; storage on an S3-compatible server on the
bridge. ``workflow run --detach`` of the CPU recipe, shrunk as tests/test_end_to_end.py
shrinks it, with ``RAY_ADDRESS`` set, then: where the work ran, a chat completion from another
host, a second recipe's app beside it at a route of its own (a rerun and a redeploy of it under a
streaming client), ``workflow show`` and ``workflow stop`` from fresh processes, and the cases that must
fail in one line on such a cluster.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import CI_OVERRIDES, INSTRUCTION, REPO, VIGGO, _merge, free_port
from netns_cluster import namespace_cluster

from workflow.core import envs

RUN = "viggo-on-a-cluster"
KEY_ENV, KEY = "WORKFLOW_API_KEY", "cluster-test-key-0123456789"
# Beyond CI_OVERRIDES: the train (and pretrain) workers spread over the nodes, fewer rows to evaluate, and
# 8 steps each: this run shows where the work runs, the end-to-end test what the adapter learns.
CLUSTER_OVERRIDES = {
    "ingest": {"max_samples": {"test": 16}},
    "model": {"pretrain": {"max_steps": 8, "save_steps": 4, "logging_steps": 2}},
    "train": {"scaling_config": {"placement_strategy": "SPREAD"},
              "llamafactory": {"max_samples": 64, "max_steps": 8, "save_steps": 4, "logging_steps": 2}},
    # 8 steps teach the adapter little: the gate only asks that it score no worse than the base.
    "serve": {"require": {"at_least": {"slot_f1": 0.0}, "beats_base_by": {"slot_f1": 0.0}}},
}


@pytest.fixture(scope="module")
def ns_cluster(tmp_path_factory):
    with namespace_cluster(tmp_path_factory.mktemp("ns-cluster"), workers=2, worker_cpus=4) as found:
        yield found


def workflow(ns_cluster, *args: str, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """``workflow ARGS`` from a fresh process in the driver's namespace (``RAY_ADDRESS`` set unless overridden)."""
    env = ns_cluster.driver_env(**{KEY_ENV: KEY, **extra_env})
    if extra_env.get("RAY_ADDRESS") == "":
        del env["RAY_ADDRESS"]
    return subprocess.run([envs.python_for(envs.SERVE), "-m", "workflow", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster_run(ns_cluster, tmp_path_factory):
    data = _merge(_merge(yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text()), CI_OVERRIDES),
                  CLUSTER_OVERRIDES)
    data["name"] = RUN
    data["storage"] = ns_cluster.make_bucket(f"runs-{free_port()}") + "/runs"
    data["ingest"]["source"] = str(VIGGO)
    data["serve"]["port"] = free_port()
    recipe = tmp_path_factory.mktemp("cluster-recipe") / f"{RUN}.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = workflow(ns_cluster, "run", str(recipe), "--detach", timeout=2400)
    print(proc.stdout[-6000:], proc.stderr[-4000:])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    endpoint = json.loads(read_s3(ns_cluster, f"{data['storage']}/{RUN}/serve/endpoint.json"))
    return {"recipe": recipe, "proc": proc, "endpoint": endpoint, "storage": data["storage"]}


def read_s3(ns_cluster, uri: str) -> str:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=ns_cluster.s3_endpoint, region_name=ns_cluster.aws_env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=ns_cluster.aws_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=ns_cluster.aws_env["AWS_SECRET_ACCESS_KEY"])
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


# The GCS's actor table (the state API needs the dashboard, which a user's head may not run): every
# actor of every job so far, dead ones included, with the IP of the node it ran on.
WHERE_ACTORS_RAN = """
    import json, ray
    from ray._private import state
    ray.init(log_to_driver=False, logging_level="ERROR")
    found = {}
    for actor in state.actors().values():
        found.setdefault(actor["ActorClassName"], set()).add(actor["Address"]["IPAddress"])
    print("ACTORS", json.dumps({k: sorted(v) for k, v in found.items()}))
"""


def test_every_stage_ran_on_the_worker_nodes(ns_cluster, cluster_run):
    out = cluster_run["proc"].stdout
    assert f"run {RUN}: ingest -> model -> train -> evaluate -> serve" in out
    proc = subprocess.run([envs.python_for(envs.SERVE), "-c", textwrap.dedent(WHERE_ACTORS_RAN)],
                          env=ns_cluster.driver_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    actors = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ACTORS "))[7:])
    workers = {node.ip for node in ns_cluster.nodes}

    def nodes_of(part: str) -> set[str]:
        return {ip for name, ips in actors.items() if part in name for ip in ips}

    # The train (and pretrain) workers on both worker nodes; the engine and the replica not on the head.
    assert nodes_of("RayTrainWorker") == workers, actors
    assert nodes_of("vLLMEngineStageUDF") and nodes_of("vLLMEngineStageUDF") <= workers, actors
    assert nodes_of("LLMServer") and nodes_of("LLMServer") <= workers, actors
    endpoint = cluster_run["endpoint"]
    assert endpoint["ray_address"] == ns_cluster.address and endpoint["app"] == f"workflow-{RUN}"
    assert endpoint["base_url"].startswith(f"http://{ns_cluster.head.ip}:")
    assert endpoint["base_url"].endswith(f"/{RUN}/v1") and endpoint["route_prefix"] == f"/{RUN}"


CHAT = """
    import json, sys, urllib.error, urllib.request
    base_url, model, key = sys.argv[1:4]
    body = {"model": model, "messages": [{"role": "user", "content": sys.argv[4]}], "max_tokens": 24,
            "temperature": 0.0}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            print("ANSWER", resp.status, json.dumps(json.load(resp)["choices"][0]["message"]["content"]))
    except urllib.error.HTTPError as err:
        print("ANSWER", err.code, json.dumps(err.read().decode()[:300]))
    except OSError as err:
        print("ANSWER", 0, json.dumps(repr(err)))
"""


def chat_from(ns_cluster, node, base_url: str, model: str, key: str = KEY) -> tuple[int, str]:
    prompt = f"{INSTRUCTION}\n\nDo you like Tetris?"
    proc = ns_cluster.run_in(node, [envs.python_for(envs.SERVE), "-c", textwrap.dedent(CHAT), base_url, model, key,
                                    prompt], capture_output=True, text=True, timeout=300, check=False)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("ANSWER ")), None)
    assert line is not None, proc.stderr[-2000:]
    status, text = line[7:].split(" ", 1)
    return int(status), json.loads(text)


def test_the_endpoint_answers_another_host_for_the_base_and_the_adapter(ns_cluster, cluster_run):
    base_url, node = cluster_run["endpoint"]["base_url"], ns_cluster.nodes[-1]
    base = chat_from(ns_cluster, node, base_url, "viggo")
    adapter = chat_from(ns_cluster, node, base_url, f"viggo:{RUN}")
    assert base[0] == 200 and adapter[0] == 200, (base, adapter)
    assert base[1] != adapter[1]
    assert chat_from(ns_cluster, node, base_url, "viggo", key="wrong-key")[0] == 401


SYNCED_ROUTE = "/team/synced"


@pytest.fixture(scope="module")
def synced_app(ns_cluster, cluster_run, make_run, tiny_model, tiny_adapter):
    """A second recipe's app beside the cluster run's, detached at ``serve.route_prefix`` /team/synced: a run
    finished in a local folder (its model and two adapters inside it), copied with `workflow sync` to the
    cluster's bucket and served from there."""
    import shutil

    from workflow.core import manifest

    recipe = make_run("synced", adapters={"viggo": tiny_adapter, "viggo2": tiny_adapter})
    data = yaml.safe_load(recipe.read_text())
    run = Path(data["storage"]) / "synced"
    shutil.copytree(tiny_model, run / "model" / "weights")  # where the model stage of `source: tiny` puts it
    found = manifest.read(str(run / "model"))
    manifest.write(str(run / "model"), **{k: found[k] for k in ("stage", "run", "config", "inputs", "started_at")},
                   outputs={"model": str(run / "model" / "weights")})
    for written in run.glob("*/manifest.json"):
        assert str(run) not in written.read_text(), written
    bucket = ns_cluster.make_bucket(f"synced-{free_port()}")
    synced = workflow(ns_cluster, "sync", str(run), f"{bucket}/runs/synced")
    assert synced.returncode == 0, synced.stderr[-2000:]
    serve = yaml.safe_load(cluster_run["recipe"].read_text())["serve"]  # its port: where the cluster's Serve listens
    serve.pop("require")  # no evaluate stage in this run
    serve["route_prefix"] = SYNCED_ROUTE
    serve["smoke"] = {"rows": 1, "max_tokens": 16}  # it deploys three times; what it answers is not the point here
    data["evaluate"]["parity"] = None  # the cluster run's serve checks parity on the cluster; here only where from
    data.update(storage=f"{bucket}/runs", serve=serve)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = workflow(ns_cluster, "serve", str(recipe), "--detach")
    endpoint_uri = f"{bucket}/runs/synced/serve/endpoint.json"
    try:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        yield {"recipe": recipe, "endpoint_uri": endpoint_uri, "endpoint": json.loads(read_s3(ns_cluster, endpoint_uri))}
    finally:
        stopped = workflow(ns_cluster, "stop", str(recipe))
        assert stopped.returncode == 0, (stopped.stdout + stopped.stderr)[-3000:]


def listed_apps(ns_cluster, recipe) -> dict[str, list[str]]:
    """`workflow show RECIPE` with RAY_ADDRESS set: the cluster's workflow apps it lists, name -> [route, status, url]."""
    shown = workflow(ns_cluster, "show", str(recipe))
    assert shown.returncode == 0, (shown.stdout + shown.stderr)[-3000:]
    listing = shown.stdout.split(f"workflow apps on the Ray cluster at {ns_cluster.address}:\n", 1)[1]
    return {fields[0]: fields[1:] for fields in map(str.split, listing.splitlines()) if fields}


def test_two_recipes_serve_side_by_side_each_at_its_route(ns_cluster, cluster_run, synced_app):
    """Each recipe's app at a route of its own (the default /<recipe>, and serve.route_prefix), both answering
    another host; `workflow show` lists both."""
    synced_url, run_url = synced_app["endpoint"]["base_url"], cluster_run["endpoint"]["base_url"]
    assert synced_url == run_url.replace(f"/{RUN}/v1", f"{SYNCED_ROUTE}/v1")
    for model in ("viggo:viggo", "viggo:viggo2"):
        status, answer = chat_from(ns_cluster, ns_cluster.nodes[-1], synced_url, model)
        assert status == 200 and answer, (model, status, answer)
    assert chat_from(ns_cluster, ns_cluster.nodes[-1], run_url, f"viggo:{RUN}")[0] == 200
    assert chat_from(ns_cluster, ns_cluster.nodes[-1], synced_url, f"viggo:{RUN}")[0] != 200  # not that app's
    apps = listed_apps(ns_cluster, synced_app["recipe"])
    assert apps == {f"workflow-{RUN}": [f"/{RUN}", "RUNNING", run_url],
                    "workflow-synced": [SYNCED_ROUTE, "RUNNING", synced_url]}, apps


def serve_again(ns_cluster, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    """`workflow serve RECIPE ARGS`; what it printed stays in the failure when it runs past its time."""
    try:
        return workflow(ns_cluster, "serve", str(recipe), *args, timeout=900)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"workflow serve {' '.join(args)} ran past 900 s: {str(err.stdout)[-3000:]} {str(err.stderr)[-3000:]}")


def test_show_and_stop_from_fresh_processes_without_the_address(ns_cluster, cluster_run):
    recipe, base_url = str(cluster_run["recipe"]), cluster_run["endpoint"]["base_url"]
    shown = workflow(ns_cluster, "show", recipe, RAY_ADDRESS="")
    assert f"app: application workflow-{RUN} on the Ray cluster at {ns_cluster.address}, detached: answering" \
        in shown.stdout, shown.stdout + shown.stderr
    # RAY_ADDRESS unset: `workflow stop` finds the cluster through the run's endpoint.json.
    stopped = workflow(ns_cluster, "stop", recipe, RAY_ADDRESS="")
    assert stopped.returncode == 0, (stopped.stdout + stopped.stderr)[-3000:]
    assert f"stopping the application workflow-{RUN} on the Ray cluster at {ns_cluster.address}" in stopped.stdout
    assert chat_from(ns_cluster, ns_cluster.nodes[0], base_url, "viggo")[0] != 200
    shown = workflow(ns_cluster, "show", recipe, RAY_ADDRESS="")
    assert f"app: application workflow-{RUN} on the Ray cluster at {ns_cluster.address}, stopped" in shown.stdout


def test_a_rerun_and_a_redeploy_lose_no_request_of_a_streaming_client(ns_cluster, synced_app):
    """A client streams through the detached app without pause while the recipe is served again without
    --detach (a check app of its own, removed after) and then redeployed with --detach (Serve's in-place
    update): every request answers in full; endpoint.json still names the detached app. After the cluster run's
    app has been stopped (above): beside two apps, the worker nodes' 8 CPUs have no room for a check app's LLM
    replica (its deploy waits, and Serve's message says for what)."""
    import threading

    import httpx

    base_url, done, results = synced_app["endpoint"]["base_url"], threading.Event(), []

    def stream() -> None:
        while not done.wait(0.5):  # a request every half second or so: the machine's two cores serve the deploys too
            model = ("viggo", "viggo:viggo")[len(results) % 2]
            body = {"model": model, "messages": [{"role": "user", "content": f"{INSTRUCTION}\n\nIs Portal 2 fun?"}],
                    "max_tokens": 8, "stream": True}
            try:
                with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=600,
                                  headers={"Authorization": f"Bearer {KEY}"}) as resp:
                    text = resp.read().decode()
                results.append((resp.status_code, "data: [DONE]" in text, text[-200:]))
            except httpx.HTTPError as err:
                results.append((0, False, repr(err)))

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    try:
        checked = serve_again(ns_cluster, synced_app["recipe"])
        assert checked.returncode == 0, (checked.stdout + checked.stderr)[-4000:]
        assert "deploying build_openai_app as workflow-synced-check-" in checked.stdout, checked.stdout[-3000:]
        assert "shut down the check app workflow-synced-check-" in checked.stdout
        assert json.loads(read_s3(ns_cluster, synced_app["endpoint_uri"])) == synced_app["endpoint"]
        assert not any("check" in name for name in listed_apps(ns_cluster, synced_app["recipe"]))
        during_check = len(results)
        redeployed = serve_again(ns_cluster, synced_app["recipe"], "--detach")
        assert redeployed.returncode == 0, (redeployed.stdout + redeployed.stderr)[-4000:]
        assert "deploying build_openai_app as workflow-synced on " in redeployed.stdout
    finally:
        done.set()
        client.join(timeout=600)
    failed = [r for r in results if r[:2] != (200, True)]
    print(f"streamed requests: {len(results)} ({during_check} during the check run), failed: {len(failed)}")
    assert during_check >= 5 and len(results) - during_check >= 5, results
    assert failed == [], failed[:5]
    assert chat_from(ns_cluster, ns_cluster.nodes[0], base_url, "viggo:viggo")[0] == 200


def test_another_port_than_the_running_serves_is_refused_in_one_line(ns_cluster, cluster_run, tmp_path):
    # The app was stopped above; Ray Serve itself (controller, proxies) goes on listening where it started.
    data = yaml.safe_load(cluster_run["recipe"].read_text())
    listening = data["serve"]["port"]
    data["serve"]["port"] = free_port()
    recipe = tmp_path / f"{RUN}.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    error = one_error(workflow(ns_cluster, "serve", str(recipe)))
    assert (f"serve: port: {data['serve']['port']}: Ray Serve already runs on the cluster at {ns_cluster.address}, "
            f"listening on 0.0.0.0:{listening}") in error, error
    assert f"set serve.host: 0.0.0.0 and serve.port: {listening}" in error


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_local_storage_on_a_cluster_of_several_nodes_is_refused_in_one_line(ns_cluster, make_run, tmp_path):
    recipe = make_run("local-on-cluster")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"instruction": INSTRUCTION, "input": "Do you like Tetris?"}) + "\n")
    proc = workflow(ns_cluster, "batch", str(recipe), "--input", str(source), "--output", str(tmp_path / "out.jsonl"))
    error = one_error(proc)
    assert "is a folder on this machine" in error and "(3 nodes)" in error and "s3://... or gs://..." in error
    assert not (tmp_path / "out.jsonl").exists()


def test_a_node_without_the_train_environment_is_named_in_one_line(ns_cluster, cluster_run):
    train_env = Path(envs.python_for(envs.TRAIN)).parents[1]
    node = ns_cluster.add_node("notrain", hide=[str(train_env)])
    try:
        proc = workflow(ns_cluster, "train", str(cluster_run["recipe"]), "--force")
    finally:
        ns_cluster.remove_node(node)
    error = one_error(proc)
    assert f"node {node.ip} of the cluster at {ns_cluster.address} cannot run this stage's workers" in error, error
    assert f"it has no interpreter at {envs.python_for(envs.TRAIN)}" in error and "make setup" in error


def s3_keys(ns_cluster, uri: str) -> list[str]:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=ns_cluster.s3_endpoint, region_name=ns_cluster.aws_env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=ns_cluster.aws_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=ns_cluster.aws_env["AWS_SECRET_ACCESS_KEY"])
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def test_batch_with_an_adapter_and_input_on_this_disk_runs_on_the_nodes(ns_cluster, cluster_run, tmp_path):
    """The adapter folder and the input exist only on the driver's disk (its /tmp, which no node sees): the job
    copies them into the run's bucket, the engine on a worker node loads them from there, the copies go after."""
    run = f"{cluster_run['storage']}/{RUN}"
    adapter = tmp_path / "mine"
    pulled = workflow(ns_cluster, "sync", f"{run}/train/adapters/{RUN}", str(adapter))
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": text}) + "\n"
                              for text in ("Do you like Tetris?", "Is Portal 2 on Mac?")))
    proc = workflow(ns_cluster, "batch", str(cluster_run["recipe"]), "--input", str(source), "--output",
                    str(tmp_path / "out.jsonl"), "--adapter", str(adapter))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[batch] copying the input" in proc.stdout and "[batch] copying the adapters mine to" in proc.stdout
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["model"], r["error"]) for r in out] == [("mine", ""), ("mine", "")], out
    assert all(r["generated_text"] for r in out)
    assert s3_keys(ns_cluster, f"{run}/batch/uploads/") == []
