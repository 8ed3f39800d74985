"""Transient storage faults: a stage and ``workflow sync`` still succeed, and what they wrote is whole.

The loopback S3 server sits behind a small proxy that answers ``503 ServiceUnavailable`` to
the first attempt of every distinct request (each PUT, GET, HEAD, listing, delete).
botocore would retry those by itself, so the commands run with ``AWS_MAX_ATTEMPTS=1``: every
failure reaches ``workflow.storage.with_retries``, which must retry with backoff. The proxy
counts the 503s it served, so the test knows the faults really happened.
"""

from __future__ import annotations

import http.client
import http.server
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest
import yaml
from conftest import VIGGO

from workflow.core import storage

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
    outputs = storage.read_json(f"{uri}/manifest.json")["outputs"]
    assert outputs == {"train": f"{uri}/train.jsonl", "test": f"{uri}/test.jsonl",
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
        proc = workflow_cli("ingest", str(recipe), env=through(proxy))
    finally:
        proxy.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: check {s3_bucket}/runs/down/ingest/manifest.json: "
                                                   "failed after 5 attempts"), proc.stderr
    assert "Traceback" not in proc.stderr and proxy.served_503 >= 5
    assert storage.list_files(f"{s3_bucket}/runs") == []
