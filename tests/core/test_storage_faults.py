"""Transient storage faults: a stage and ``workflow sync`` still succeed, and what they wrote is whole.

The loopback S3 server sits behind a small proxy that answers ``503 ServiceUnavailable`` to
the first attempt of every distinct request (each PUT, GET, HEAD, listing, delete).
botocore would retry those by itself, so the commands run with ``AWS_MAX_ATTEMPTS=1``: every
failure reaches ``workflow.storage.with_retries``, which must retry with backoff. The proxy
counts the 503s it served, so the test knows the faults really happened.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import yaml
from conftest import VIGGO, free_port

from workflow.core import manifest, storage

FAILURES_PER_REQUEST = 1
# Not S3's "SlowDown ... reduce your request rate": s3fs retries that text by itself.
UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
               b"<Message>Service Unavailable</Message></Error>")


class FlakyS3Proxy:
    """Forward HTTP to ``upstream``; answer 503 to the first ``failures`` attempts of each request."""

    def __init__(self, upstream: str, failures: int):
        self.upstream = upstream.removeprefix("http://")
        self.failures = failures
        self.seen: Counter = Counter()
        self.served_503 = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    key = (self.command, self.path)
                    proxy.seen[key] += 1
                    fail = proxy.seen[key] <= proxy.failures
                    proxy.served_503 += fail
                    proxy.forwarded += not fail
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(UNAVAILABLE)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(UNAVAILABLE)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_server):
    proxy = FlakyS3Proxy(s3_server, FAILURES_PER_REQUEST)
    yield proxy
    proxy.close()


def workflow_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def through(proxy: FlakyS3Proxy) -> dict:
    """The environment of a command whose S3 traffic goes through the proxy, botocore retries off."""
    return {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}


def test_ingest_to_s3_through_faults_writes_every_file_whole(flaky_s3, s3_bucket, tmp_path):
    recipe = {"name": "faults", "model": {"source": "tiny"},
              "ingest": {"source": str(VIGGO), "splits": {"train": "train.csv", "test": "test.csv"},
                         "columns": {"input": "ref", "output": "mr"}, "instruction": "Parse.",
                         "max_samples": {"train": 40, "test": 10}}}
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({**recipe, "storage": str(tmp_path / "runs")}))
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump({**recipe, "storage": f"{s3_bucket}/runs"}))
    reference = workflow_cli("ingest", str(local), env=dict(os.environ))
    assert reference.returncode == 0, reference.stderr

    proc = workflow_cli("ingest", str(remote), env=through(flaky_s3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    retries = [line for line in proc.stdout.splitlines() if line.startswith("[storage]") and "retry" in line]
    assert flaky_s3.served_503 >= 10 and len(retries) >= flaky_s3.served_503 // 2, (flaky_s3.served_503, retries)

    expected = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "faults" / "ingest").iterdir()}
    uri = f"{s3_bucket}/runs/faults/ingest"  # read back directly, not through the proxy
    assert storage.list_files(uri) == sorted(expected)
    for name, data in expected.items():
        if name != "manifest.json":  # times and paths differ; its outputs are checked below
            assert storage.read_bytes(f"{uri}/{name}") == data, name
    recorded = storage.read_json(f"{uri}/manifest.json")["outputs"]  # relative to the stage folder
    assert recorded == {"train": "./train.jsonl", "test": "./test.jsonl", "dataset_info": "./dataset_info.json"}
    assert manifest.read(uri)["outputs"] == {"train": f"{uri}/train.jsonl", "test": f"{uri}/test.jsonl",
                                             "dataset_info": f"{uri}/dataset_info.json"}


def test_sync_round_trip_through_faults(flaky_s3, s3_bucket, tmp_path):
    src = tmp_path / "model"
    (src / "tok").mkdir(parents=True)
    files = {"config.json": b'{"hidden_size": 8}', "model.safetensors": os.urandom(3 << 20),
             "tok/tokenizer.json": b"{}" * 1000, "README.md": b"tiny\n"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    uri = f"{s3_bucket}/models/tiny"
    env = through(flaky_s3)
    up = workflow_cli("sync", str(src), uri, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    failed_on_upload = flaky_s3.served_503
    down = workflow_cli("sync", uri, str(tmp_path / "back"), env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert failed_on_upload >= len(files) and flaky_s3.served_503 >= failed_on_upload + len(files)
    back = {p.relative_to(tmp_path / "back").as_posix(): p.read_bytes()
            for p in (tmp_path / "back").rglob("*") if p.is_file()}
    assert back == files
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_a_fault_that_outlasts_the_retries_fails_in_one_line_and_leaves_no_manifest(s3_server, s3_bucket, tmp_path):
    proxy = FlakyS3Proxy(s3_server, failures=1000)
    try:
        recipe = tmp_path / "recipe.yaml"
        (tmp_path / "data.jsonl").write_text('{"input": "a", "output": "b"}\n')
        recipe.write_text(yaml.safe_dump({"name": "down", "storage": f"{s3_bucket}/runs", "model": {"source": "tiny"},
                                          "ingest": {"source": "data.jsonl", "instruction": "Parse.",
                                                     "split_ratios": {"train": 1.0}}}))
        proc = workflow_cli("ingest", str(recipe), env={**through(proxy), storage.RETRY_BUDGET_ENV: "5"})
    finally:
        proxy.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: check {s3_bucket}/runs/down/ingest/manifest.json: "
                                                   "failed after "), proc.stderr
    assert "Traceback" not in proc.stderr and proxy.served_503 >= 3  # the budget (5 s) allows 3 to 5
    assert storage.list_files(f"{s3_bucket}/runs") == []


# ---------------------------------------------------------------- the server stopped mid-stage (issue 18)

class StoppableS3:
    """A moto S3 server that can be stopped and started again on the same port, its buckets kept.

    Stopping closes the listening socket and resets every open connection (botocore's pooled
    keep-alive ones too): clients get "connection refused", as from a server that went away.
    The objects live in moto's in-process backend, so they are there again after a start, as a
    real object store's data survives its outage.
    """

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.connections: set = set()

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        connections = self.connections

        class Handler(MotoRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

        self.server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app), True,
                                  request_handler=Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.connections.clear()


@pytest.fixture
def stoppable_s3(s3_server):
    server = StoppableS3()
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.stop()


def ingest_with_an_outage(recipe, server: StoppableS3, *, outage_s: float | None, env: dict,
                          force: bool = False) -> tuple[int, str, str]:
    """``workflow ingest [--force]``; the server stops once the splits are uploaded (before the manifest is written) and
    starts again ``outage_s`` seconds later (None: once the command has ended)."""
    proc = subprocess.Popen([sys.executable, "-m", "workflow", "ingest", str(recipe), *(["--force"] if force else [])], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    stdout, stopped = [], None
    for line in proc.stdout:
        stdout.append(line)
        if stopped is None and line.startswith("[ingest] train: read"):
            server.stop()
            stopped = time.monotonic()
            if outage_s is not None:
                threading.Timer(outage_s, server.start).start()
    code = proc.wait(timeout=600)
    assert stopped is not None, "".join(stdout + stderr)
    print(f"[outage] {outage_s if outage_s is not None else 'until the end'} s: exit {code}, "
          f"{time.monotonic() - stopped:.1f}s from the stop to the end of the command")
    if outage_s is None:
        server.start()
    return code, "".join(stdout), "".join(stderr)


def test_the_server_stopped_mid_stage_short_outage_absorbed_long_one_fails_in_one_line(stoppable_s3, tmp_path):
    """Default clients (botocore's and s3fs' own retries on, ~8 s for a refused connection): a 20 s outage, within
    the retry budget (60 s), is waited out; one longer than the budget (here 10 s) fails in one line naming the
    URI, leaves no manifest, and a rerun once the server is back finishes."""
    import boto3

    boto3.client("s3", endpoint_url=stoppable_s3.url).create_bucket(Bucket="outage")
    env = {**os.environ, "AWS_ENDPOINT_URL": stoppable_s3.url}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(
        {"name": "outage", "storage": "s3://outage/runs", "model": {"source": "tiny"},
         "ingest": {"source": str(VIGGO), "splits": {"train": "train.csv", "test": "test.csv"},
                    "columns": {"input": "ref", "output": "mr"}, "instruction": "Parse.",
                    "max_samples": {"train": 40, "test": 10}}}))
    uri = "s3://outage/runs/outage/ingest"
    read_back = {**os.environ, "AWS_ENDPOINT_URL": stoppable_s3.url}

    code, out, err = ingest_with_an_outage(recipe, stoppable_s3, outage_s=20, env=env)
    assert code == 0, (out + err)[-3000:]
    assert re.search(rf"\[storage\] \w+ {uri}/\S+: EndpointConnectionError; retry 1 in", out), out
    assert "manifest.json" in listed(uri, read_back)

    budget = {**env, storage.RETRY_BUDGET_ENV: "10"}
    code, out, err = ingest_with_an_outage(recipe, stoppable_s3, outage_s=None, env=budget, force=True)
    assert code == 2, (out + err)[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"error: \w+ {uri}/\S+: failed after \d+ attempts in", lines[0]), err
    assert "WORKFLOW_STORAGE_RETRY_SECONDS (now 10)" in lines[0] and "Traceback" not in err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out + err and os.environ["AWS_ACCESS_KEY_ID"] not in out + err
    assert "manifest.json" not in listed(uri, read_back)

    rerun = workflow_cli("ingest", str(recipe), env=env)
    assert rerun.returncode == 0 and "manifest.json" in listed(uri, read_back), (rerun.stdout + rerun.stderr)[-3000:]


def listed(uri: str, env: dict) -> list[str]:
    """The files under ``uri``, listed by a fresh process (this one's clients may hold the stopped server's
    connections)."""
    proc = subprocess.run([sys.executable, "-c", "import sys, json; from workflow.core import storage; "
                           "print(json.dumps(storage.list_files(sys.argv[1])))", uri], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
