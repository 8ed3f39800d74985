"""``workflow sync SRC DEST``: copy a folder between local disk, object storage and the HF hub.

SRC and DEST are local paths, ``s3://`` or ``gs://`` URIs; SRC may also be ``hf://ORG/NAME``
(optionally ``@REVISION``), a Hugging Face model downloaded with ``snapshot_download`` and
then uploaded, e.g. to cache a base model in a bucket:

    workflow sync hf://Qwen/Qwen2.5-7B-Instruct s3://bucket/models/qwen2.5-7b-instruct

Publishing is atomic for readers: a local destination is staged and renamed into place; in
object storage the old marker files go first, then the new files, then the new markers
(``MARKERS``), so a reader that sees ``adapter_config.json`` or ``config.json`` sees a whole
adapter or model, never half of one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from . import storage
from .console import say
from .errors import WorkflowError

HF_SCHEME = "hf://"
# Files whose presence says "this folder is complete": PEFT adapters, HF models, stage folders.
MARKERS = ("adapter_config.json", "config.json", "manifest.json")


def publish_dir(local_dir: str | Path, uri: str, *, last: list[str] | tuple[str, ...] = MARKERS) -> None:
    """Replace the folder at ``uri`` with ``local_dir``'s files, marker files (``last``) last."""
    if storage.is_local(uri):
        storage.upload_dir(local_dir, uri, last=last)  # staged next to the target, renamed into place
        return
    for name in last:  # an old marker must not vouch for a folder being rewritten
        storage.remove(storage.join(uri, name))
    new = {p.relative_to(local_dir).as_posix() for p in Path(local_dir).rglob("*") if p.is_file()}
    for stale in set(storage.list_files(uri)) - new:
        storage.remove(storage.join(uri, stale))
    storage.upload_dir(local_dir, uri, last=last)


def _hf_snapshot(src: str) -> Path:
    repo, _, revision = src.removeprefix(HF_SCHEME).partition("@")
    if repo.count("/") != 1:
        raise WorkflowError(f"{src}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, token=os.environ.get("HF_TOKEN")))
    except Exception as err:  # noqa: BLE001 - the hub client raises many error types
        raise WorkflowError(f"{src}: cannot download from the Hugging Face hub ({type(err).__name__})",
                            hint="check the model id, HF_TOKEN for gated models and network access to "
                                 "huggingface.co; or sync from a local folder that holds the model") from None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def sync(src: str, dest: str) -> None:
    """Copy the folder ``src`` to ``dest`` (replacing what is there), atomically for readers."""
    if dest.startswith(HF_SCHEME):
        raise WorkflowError(f"{dest}: uploading to the Hugging Face hub is not supported",
                            hint="the destination is a local folder, s3://... or gs://...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workflow-sync-") as tmp:
        if src.startswith(HF_SCHEME):
            say(f"[sync] downloading {src} from the Hugging Face hub")
            local = _hf_snapshot(src)
        elif storage.is_local(src):
            local = storage.local_path(src)
            if not local.is_dir():
                raise WorkflowError(f"{src}: no such folder", hint="sync copies folders; give a folder path or URI")
        else:
            say(f"[sync] downloading {src}")
            local = storage.download_dir(src, Path(tmp) / "data")
        size = _size(local)
        say(f"[sync] publishing {size / 1e6:.1f} MB -> {dest}")
        publish_dir(local, dest)
    say(f"[sync] {src} -> {dest} done in {time.monotonic() - started:.1f}s")
