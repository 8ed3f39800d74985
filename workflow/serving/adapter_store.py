"""Local adapters for Ray Serve LLM: a loopback S3 server inside the serving cluster.

Ray Serve LLM loads adapters on demand from ``lora_config.dynamic_lora_loading_path`` and
accepts only remote URIs there. With s3:// or gs:// storage that is the run's
``train/adapters`` folder itself. With local storage the adapters are published to an
S3-compatible server on loopback (moto, run as a detached actor inside the same cluster so
that it lives and dies with the app), and the cluster's ``AWS_ENDPOINT_URL`` points Ray's
downloader at it. Adapters trained after the deploy appear on the next deploy. moto is a
runtime dependency of both serve environments (envs/serve-*.in). Its endpoint is the whole
serving cluster's, so the serve stage refuses a run in a local folder whose model is in an
``s3://`` bucket (the replicas would look for the model on the loopback server).

Ray, boto3 and moto are imported inside the functions that use them.
"""

from __future__ import annotations

from ..core import storage

LOOPBACK_BUCKET = "workflow-adapters"
LOOPBACK_S3_ACTOR = "workflow-loopback-s3"


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
