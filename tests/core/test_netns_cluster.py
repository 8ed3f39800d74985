"""tests/netns_cluster.py: worker nodes that share only the network with the driver's machine."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest
from netns_cluster import leftovers, namespace_cluster

from workflow.core import envs

pytestmark = pytest.mark.heavy  # every test here starts a namespace cluster

# A driver in the root namespace: writes TAG-driver to its /tmp and ~/.cache, then runs one
# task on each worker node, one after the other; each writes /tmp/TAG-<its ip> and tells which
# of the files written so far (and the paths given) it sees.
PROBE = """
    import json, sys
    from pathlib import Path
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tag, given = sys.argv[1], json.loads(sys.argv[2])
    mine = [Path("/tmp") / f"{tag}-driver", Path.home() / ".cache" / f"{tag}-driver"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("driver")

    @ray.remote(num_cpus=1)
    def probe(paths):
        import os
        ip = ray.util.get_node_ip_address()
        Path(f"/tmp/{tag}-{ip}").write_text(ip)
        return {"ip": ip, "seen": [p for p in paths if os.path.exists(p)]}

    ray.init(log_to_driver=False)
    nodes = [{"ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0), "id": n["NodeID"]}
             for n in ray.nodes() if n["Alive"]]
    written, probes = [str(p) for p in mine], []
    for node in nodes:
        if node["cpus"]:
            strategy = NodeAffinitySchedulingStrategy(node["id"], soft=False)
            probes.append(ray.get(probe.options(scheduling_strategy=strategy).remote(
                written + [f"/tmp/{tag}-{node['ip']}"] + given)))
            written.append(f"/tmp/{tag}-{node['ip']}")
    seen_here = [p for p in written[len(mine):] if Path(p).exists()]
    for path in mine:
        path.unlink()
    print("RESULT", json.dumps({"nodes": nodes, "probes": probes, "seen_here": seen_here}))
"""


def probe(cluster, given: list[str] = ()) -> dict:
    tag = f"wfc-probe-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([envs.python_for(envs.SERVE), "-c", textwrap.dedent(PROBE), tag, json.dumps(list(given))],
                          env=cluster.driver_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "tag": tag}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with namespace_cluster(tmp_path_factory.mktemp("netns-cluster"), workers=2, worker_cpus=2) as c:
        yield c


def test_worker_nodes_have_their_own_ip_tmp_and_home(cluster):
    result = probe(cluster)
    tag = result["tag"]
    ips = sorted((n["ip"], n["cpus"]) for n in result["nodes"])
    assert ips == sorted([(f"{cluster.subnet}.1", 0), *((n.ip, 2) for n in cluster.nodes)])
    assert len({ip for ip, _ in ips}) == 3 and all(ip.startswith(cluster.subnet + ".") for ip, _ in ips)
    # Each node sees the file it wrote, not the driver's (/tmp, ~/.cache) nor the other node's.
    assert sorted(p["ip"] for p in result["probes"]) == sorted(n.ip for n in cluster.nodes)
    for p in result["probes"]:
        assert p["seen"] == [f"/tmp/{tag}-{p['ip']}"], p
    assert result["seen_here"] == []  # nor does the driver see theirs


def test_the_s3_server_answers_inside_a_worker_node_namespace(cluster):
    import boto3

    bucket = cluster.make_bucket("netns-probe")
    boto3.client("s3", endpoint_url=cluster.s3_endpoint, **{
        "aws_access_key_id": cluster.aws_env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": cluster.aws_env["AWS_SECRET_ACCESS_KEY"],
        "region_name": cluster.aws_env["AWS_DEFAULT_REGION"]}).put_object(Bucket="netns-probe", Key="a.txt", Body=b"a")
    script = f"import boto3; print([o['Key'] for o in boto3.client('s3').list_objects_v2(Bucket={bucket[5:]!r})['Contents']])"
    proc = cluster.run_in(cluster.nodes[0], [envs.python_for(envs.SERVE), "-c", script], env=cluster.driver_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "['a.txt']", proc.stderr[-2000:]
    assert cluster.s3_endpoint.startswith(f"http://{cluster.subnet}.1:")


def test_a_node_can_lack_a_path_and_teardown_runs_when_the_test_fails(tmp_path):
    train_env = Path(envs.python_for(envs.TRAIN)).parent.parent
    with pytest.raises(RuntimeError, match="the test failed"), namespace_cluster(tmp_path, workers=1,
                                                                                 worker_cpus=1) as cluster:
        bare = cluster.add_node("bare", hide=[str(train_env)], cpus=1)
        python = str(train_env / "bin" / "python")
        result = probe(cluster, [python])
        seen, tag, other = {p["ip"]: p["seen"] for p in result["probes"]}, result["tag"], cluster.nodes[0].ip
        assert seen == {bare.ip: [f"/tmp/{tag}-{bare.ip}"], other: [f"/tmp/{tag}-{other}", python]}
        cluster.remove_node(bare)  # waits until the head counts 2 nodes alive
        assert [n.name for n in cluster.nodes] == ["w1"]
        cluster_id, temp_dir = cluster.id, cluster.temp_dir
        assert leftovers(cluster_id, temp_dir)  # up: processes, namespace, interfaces
        raise RuntimeError("the test failed")
    assert leftovers(cluster_id, temp_dir) == []
    assert not temp_dir.exists()
