"""Run storage: a local folder, ``s3://`` or ``gs://``, through fsspec.

S3-compatible servers are reached through the standard ``AWS_ENDPOINT_URL`` variable, which
boto3, s3fs, pyarrow and Ray's own downloaders all honour, so one setting serves every
library that touches the bucket.

Writes are atomic: a single file is written to a temporary name and renamed (one PUT on
object stores), and a folder is published with its marker files last, so a reader that sees
the marker sees the whole folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from .console import say
from .errors import WorkflowError

T = TypeVar("T")

# Errors that retrying will not fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
# Missing credentials (botocore's, google-auth's), matched by name: retrying only delays the message.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")
_CREDENTIALS_HINT = {
    "s3": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_ENDPOINT_URL",
    "gs": "check GOOGLE_APPLICATION_CREDENTIALS and the account's access to the bucket",
}


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(uri)
    except ImportError as err:
        scheme = uri.split("://", 1)[0]
        pkg = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, "an fsspec implementation")
        raise WorkflowError(f"{uri}: no filesystem for {scheme}://", hint=f"install {pkg} ({err})") from None


# How long one storage operation goes on retrying (seconds): an outage of the object store
# shorter than this is waited out. Read at each call, so Ray workers and stage processes (which
# inherit WORKFLOW_* variables) use the driver's setting.
RETRY_BUDGET_ENV = "WORKFLOW_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_BUDGET_S = 60.0
MAX_RETRY_DELAY_S = 10.0


def retry_budget_s() -> float:
    raw = os.environ.get(RETRY_BUDGET_ENV, "")
    try:
        budget = float(raw) if raw else DEFAULT_RETRY_BUDGET_S
    except ValueError:
        budget = -1.0
    if budget < 0:
        raise WorkflowError(f"{RETRY_BUDGET_ENV}={raw!r}: not a number of seconds", hint="set it to e.g. 60, or unset it")
    return budget


def with_retries(fn: Callable[[], T], *, what: str, attempts: int | None = None, base_delay: float = 0.5,
                 budget_s: float | None = None) -> T:
    """Call ``fn``; on a transient error retry with exponential backoff and jitter.

    Retries go on while the next attempt would start within ``budget_s`` seconds of the first
    (default ``WORKFLOW_STORAGE_RETRY_SECONDS``, 60) and, if given, ``attempts`` are left. One
    attempt may itself take seconds: s3fs and botocore retry a refused connection inside it.
    ``what`` is "<verb> <uri>" and starts every message. Refused access and missing
    credentials are not retried: they become one line that names the settings to check.
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except PermissionError as err:
            raise _access_error(what, err) from err
        except _PERMANENT:
            raise
        except Exception as err:  # noqa: BLE001 - storage clients raise many transient types
            if type(err).__name__ in _NO_CREDENTIALS:
                raise _access_error(what, err) from err
            delay = min(base_delay * 2 ** (attempt - 1), MAX_RETRY_DELAY_S) * (0.5 + random.random())
            elapsed = time.monotonic() - started
            if attempt == attempts or elapsed + delay > budget:
                raise WorkflowError(
                    f"{what}: failed after {attempt} attempts in {elapsed:.0f}s: {type(err).__name__}: {err}",
                    hint=f"check the storage endpoint and credentials; {RETRY_BUDGET_ENV} (now {budget:g}) "
                         "sets how many seconds an outage is waited out") from err
            say(f"[storage] {what}: {type(err).__name__}; retry {attempt} in {delay:.1f}s "
                f"({budget - elapsed:.0f}s of the retry budget left)")
            time.sleep(delay)


def _access_error(what: str, err: BaseException) -> WorkflowError:
    """Refused access as one line: the object store's credentials, or a local folder's permissions."""
    scheme = what.split("://", 1)[0].rsplit(" ", 1)[-1] if "://" in what else ""
    hint = _CREDENTIALS_HINT.get("gs" if scheme == "gcs" else scheme, "check the permissions of the path")
    return WorkflowError(f"{what}: access denied ({type(err).__name__}: {err})", hint=hint)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), what=f"check {uri}")


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """The file's bytes, or those of ``[start, end)`` (a ranged read from object storage)."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path, start=start, end=end), what=f"read {uri}")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: temp file + rename locally, one PUT on object stores."""
    if is_local(uri):
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return
    fs, path = filesystem(uri)
    with_retries(lambda: fs.pipe_file(path, data), what=f"write {uri}")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove(uri: str) -> None:
    """Remove a file or folder; nothing happens if it does not exist."""
    if is_local(uri):
        p = local_path(uri)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    fs, path = filesystem(uri)
    if with_retries(lambda: fs.exists(path), what=f"check {uri}"):
        with_retries(lambda: fs.rm(path, recursive=True), what=f"remove {uri}")


def list_files(uri: str) -> list[str]:
    """Paths of every file under ``uri``, relative to it, sorted."""
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    if not with_retries(lambda: fs.exists(path), what=f"list {uri}"):
        return []
    found = with_retries(lambda: fs.find(path), what=f"list {uri}")
    return sorted(f[len(path) + 1:] for f in found if f != path)


def upload_dir(local_dir: str | Path, uri: str, *, last: Iterable[str] = ()) -> None:
    """Copy a local folder to ``uri`` (local or remote); files named in ``last`` go last.

    Put a folder's marker files (a manifest, an adapter's ``adapter_config.json``) in ``last``:
    a reader that finds them then finds everything else. Locally the folder is staged next
    to its destination and renamed into place, so it appears whole or not at all.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise WorkflowError(f"{src}: not a folder")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    last = [f for f in last if f in files]
    ordered = [f for f in files if f not in last] + last
    if is_local(uri):
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.with_name(f".{dest.name}.staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(src, staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        return
    fs, base = filesystem(uri)
    for rel in ordered:
        target = base.rstrip("/") + "/" + rel
        with_retries(lambda rel=rel, target=target: fs.put_file(str(src / rel), target), what=f"upload {uri}/{rel}")


def _inside(uri: str, rel: str, folder: Path) -> Path:
    """``folder / rel`` for an object key ``rel`` under ``uri``; a key that is absolute, climbs (``..``) or
    otherwise resolves outside ``folder`` is refused in one line (a bucket's keys are anyone's strings)."""
    parts = rel.split("/")
    target = folder.joinpath(*parts)
    if (rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)
            or not target.resolve().is_relative_to(folder.resolve())):
        raise WorkflowError(f"{uri}: object key {rel!r} is absolute or climbs out of the folder; nothing was "
                            "downloaded", hint="remove or rename that object in the bucket")
    return target


def download_dir(uri: str, local_dir: str | Path, *, include: Callable[[str], bool] | None = None) -> Path:
    """Copy ``uri``'s files (those whose relative path ``include`` accepts) into ``local_dir``
    (staged, then renamed into place). Every key must stay inside the folder (checked before any download)."""
    dest = Path(local_dir)
    files = [rel for rel in list_files(uri) if include is None or include(rel)]
    if not files:
        raise WorkflowError(f"{uri}: nothing there to download", hint="check the path and that the stage that writes it has run")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        for rel in files:
            _inside(uri, rel, staging)
    except WorkflowError:
        shutil.rmtree(staging)
        raise
    fs, base = filesystem(uri)
    for rel in files:
        target = _inside(uri, rel, staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        src = base.rstrip("/") + "/" + rel
        with_retries(lambda src=src, target=target: fs.get_file(src, str(target)), what=f"download {uri}/{rel}")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest


def copy_dir(src_uri: str, dest_uri: str, *, last: Iterable[str] = ()) -> None:
    """Copy a folder between any two locations (local <-> remote, remote <-> remote)."""
    if is_local(src_uri):
        upload_dir(local_path(src_uri), dest_uri, last=last)
        return
    with tempfile.TemporaryDirectory(prefix="workflow-copy-") as tmp:
        local = download_dir(src_uri, Path(tmp) / "data")
        upload_dir(local, dest_uri, last=last)


def materialize(uri: str, cache_dir: str | Path) -> Path:
    """A local folder with ``uri``'s contents: the folder itself if local, else a download."""
    if is_local(uri):
        return local_path(uri)
    name = uri.rstrip("/").split("://", 1)[1].replace("/", "_")
    return download_dir(uri, Path(cache_dir) / name)


def node_local_copy(uri: str, key: str, *, include: Callable[[str], bool] | None = None) -> str:
    """A copy of a remote folder on this node's disk, shared by every process of the node.

    ``key`` identifies the content (e.g. the upstream manifest's fingerprint), so a rebuilt
    model at the same URI is downloaded again; ``include`` picks files by relative path. A file
    lock keeps two processes of one node from downloading at once; the ``.complete`` marker
    makes a finished copy reusable. A local path is returned as it is.
    """
    import fcntl
    import re

    if is_local(uri):
        return str(local_path(uri))
    root = cache_root() / "downloads"
    dest = root / (re.sub(r"[^A-Za-z0-9._-]", "_", uri.split("://", 1)[1]) + "-" + key[:12])
    root.mkdir(parents=True, exist_ok=True)
    with open(f"{dest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not owned_by_user(dest / ".complete"):
            say(f"[storage] downloading {uri} -> {dest}")
            download_dir(uri, dest, include=include)
            (dest / ".complete").touch()
    return str(dest)


CACHE_ENV = "WORKFLOW_CACHE"


def cache_root() -> Path:
    """This machine's cache folder for the workflow, the user's own: ``$WORKFLOW_CACHE``, else
    ``$XDG_CACHE_HOME/workflow`` or ``~/.cache/workflow``; made with mode 0700.

    A folder that another user owns is refused (they could plant a ``state.json`` whose process
    ``workflow stop`` would signal, or a download marked complete); one that others may write to is
    made private.
    """
    raw = os.environ.get(CACHE_ENV)
    root = Path(raw) if raw else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workflow"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = root.stat()
    if found.st_uid != os.getuid():
        raise WorkflowError(f"{root}: the workflow's cache folder belongs to another user (uid {found.st_uid})",
                            hint=f"set {CACHE_ENV} to a folder of your own")
    if found.st_mode & 0o077:
        root.chmod(0o700)
    return root


def owned_by_user(path: Path) -> bool:
    """Whether ``path`` exists, is no symbolic link and belongs to this user (what a cache file must be to be trusted)."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    import stat

    return found.st_uid == os.getuid() and not stat.S_ISLNK(found.st_mode)
