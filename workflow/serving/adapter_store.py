"""Local adapters for Ray Serve LLM: a loopback S3 server inside the serving cluster.

Ray Serve LLM loads adapters on demand from ``lora_config.dynamic_lora_loading_path`` and
accepts only remote URIs there. With s3:// or gs:// storage that is the run's
``train/adapters`` folder itself. With local storage the adapters are published to an
S3-compatible server on loopback (moto, run as a detached actor inside the same cluster so
that it lives and dies with the app), and the cluster's ``AWS_ENDPOINT_URL`` points Ray's
downloader at it; the actor copies adapters trained into the folder after the deploy too. moto is a
runtime dependency of both serve environments (envs/serve-*.in). Its endpoint is the whole
serving cluster's, so the serve stage refuses a run in a local folder whose model is in an
``s3://`` bucket (the replicas would look for the model on the loopback server).

Ray, boto3 and moto are imported inside the functions that use them.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core import storage

LOOPBACK_BUCKET = "workflow-adapters"
LOOPBACK_S3_ACTOR = "workflow-loopback-s3"


class LoopbackS3:
    """A moto S3 server on 127.0.0.1, hosted by a detached actor of the serving cluster, that mirrors a
    local adapters folder: the adapters there at the deploy, and every adapter published into it later
    (checked every ``interval_s``; a new adapter is served on its first request, no redeploy).

    An adapter is uploaded once its ``adapter_config.json`` is there (the train stage writes it last)
    and again when that file changes; ``adapter_config.json`` goes up last, as Ray lists an adapter
    once that file is there.
    """

    def __init__(self, port: int, root: str, prefix: str, interval_s: float = 2.0):
        import threading

        import boto3
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        env = loopback_env(port)
        self._client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                                    aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        self._client.create_bucket(Bucket=LOOPBACK_BUCKET)
        self._root, self._prefix, self._published = Path(root), prefix, {}
        self._lock = threading.Lock()
        self.sync()
        threading.Thread(target=self._poll, args=(interval_s,), daemon=True).start()

    def sync(self) -> list[str]:
        """Upload the adapters that are new or changed since the last sync; return their names."""
        with self._lock:
            uploaded = []
            for config in sorted(self._root.glob("*/adapter_config.json")):
                try:
                    stamp = config.stat().st_mtime_ns
                except FileNotFoundError:  # being rewritten: the next round takes it
                    continue
                name = config.parent.name
                if self._published.get(name) == stamp:
                    continue
                files = sorted((p for p in config.parent.rglob("*") if p.is_file()),
                               key=lambda p: (p == config, str(p)))
                for path in files:
                    self._client.upload_file(str(path), LOOPBACK_BUCKET,
                                             f"{self._prefix}/{name}/{path.relative_to(config.parent).as_posix()}")
                self._published[name] = stamp
                uploaded.append(name)
            return uploaded

    def _poll(self, interval_s: float) -> None:
        import time

        while True:
            time.sleep(interval_s)
            try:
                self.sync()
            except Exception as err:  # noqa: BLE001 - a failed round is retried on the next one
                print(f"[serve] adapters sync to the loopback server failed, retrying: {err}", flush=True)


def loopback_env(port: int) -> dict[str, str]:
    """What points boto3 (Ray's adapter downloader) at the loopback server."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "loopback",
            "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_DEFAULT_REGION": "us-east-1"}


def publish_adapters_on_loopback(adapters_uri: str, port: int, run_name: str) -> str:
    """Start the loopback S3 server in the cluster, mirroring the local adapters folder; return their URI."""
    import ray

    actor = ray.remote(num_cpus=0)(LoopbackS3).options(name=LOOPBACK_S3_ACTOR, lifetime="detached")
    ray.get(actor.remote(port, str(storage.local_path(adapters_uri)), run_name).sync.remote(), timeout=120)
    return f"s3://{LOOPBACK_BUCKET}/{run_name}"


# What a client may call an adapter ("<model id>:<name>"): one folder name of the adapters folder.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def adapter_name_allowed(name: str) -> bool:
    """Whether ``name`` can be an adapter folder's name (no path, no climbing)."""
    return bool(ADAPTER_NAME.fullmatch(name)) and name not in (".", "..")


class AdapterCatalogue:
    """The adapters a served model has: the subfolders of its adapters folder, listed in the background.

    A replica asks :meth:`knows` before anything reads storage for a requested adapter: a name
    outside ``ADAPTER_NAME`` or not in the last listing is unknown. No client request reads
    storage here: the listing is refreshed every ``refresh_s`` by a task on the replica's event
    loop (an adapter published after the deploy is served once a listing has seen it).
    """

    def __init__(self, adapters_uri: str, *, refresh_s: float = 5.0, list_names=None):
        self._uri = adapters_uri
        self._refresh_s = refresh_s
        self._list_names = list_names or _adapter_subfolders
        self._names: set[str] = set()
        self._task = None
        self._starting = None

    async def start(self) -> None:
        """List once, then keep listing in the background (on the replica's event loop; requests that
        arrive together wait for the one first listing)."""
        import asyncio

        if self._task is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._task is None:
                await self.refresh()
                self._task = asyncio.get_running_loop().create_task(self._keep_listing())

    async def refresh(self) -> None:
        import asyncio

        self._names = set(await asyncio.to_thread(self._list_names, self._uri))

    async def _keep_listing(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as err:  # noqa: BLE001 - the next round retries; the last listing stays
                print(f"[serve] listing the adapters in {self._uri} failed, retrying: {type(err).__name__}: {err}",
                      flush=True)

    def knows(self, name: str) -> bool:
        return adapter_name_allowed(name) and name in self._names


def _adapter_subfolders(uri: str) -> list[str]:
    """Names of the adapters folder's subfolders (Ray's own listing, as its /v1/models uses)."""
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    return [name.strip("/") for name in CloudFileSystem.list_subfolders(uri)]
