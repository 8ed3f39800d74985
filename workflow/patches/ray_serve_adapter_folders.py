"""Adapters in a folder of the serving machine, for Ray Serve LLM, which loads adapters from buckets only.

Ray 2.60's ``LoraConfig.dynamic_lora_loading_path`` must be a remote URI: ``s3://``, ``gs://``,
``abfss://``, ``azure://``, or one that starts with ``pyarrow-`` (``is_remote_path`` in
``ray.llm._internal.common.utils.cloud_utils``). A local adapters folder is named there as
``pyarrow-file://<absolute path>``: a form that Ray's validation accepts and that no code of Ray
reads while the workflow's ``LLMServer`` (``ray_serve_llm_server.py``) and ingress
(``serving/ingress.py``) serve the app. They list the folder here, and the LLMServer hands vLLM an
adapter's own subfolder: nothing is copied, no server listens, and an adapter written into the
folder after the deploy is served once a listing has seen it. Ray's own classes would take the URI
for an unknown scheme and find no adapter (404), so the serve stage refuses a local adapters folder
outside ``TESTED`` (:func:`served_uri`).

A bucket's adapters keep Ray's own path: listed by Ray's ``CloudFileSystem``, downloaded by its
LoRA loader. Ray is imported inside the function that lists a bucket (the serve stage imports this module).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core import storage
from . import supported

PATCH = "workflow.patches.ray_serve_adapter_folders"
TESTED = {"ray": "==2.60.*"}
CONSEQUENCE = ("adapters in a local folder cannot be served (Ray Serve LLM loads adapters from s3://, gs:// or "
               "Azure storage only)")
LOCAL_PREFIX = "pyarrow-file://"
# The file an adapter's folder holds once complete (the train stage writes it last).
ADAPTER_CONFIG = "adapter_config.json"


def served_uri(adapters_dir: str) -> str | None:
    """What ``dynamic_lora_loading_path`` names for ``adapters_dir``: a bucket's URI as it is, a local folder's
    ``pyarrow-file://`` URI; None for a local folder outside ``TESTED`` (one warning line says why)."""
    if not storage.is_local(adapters_dir):
        return adapters_dir
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return None
    return LOCAL_PREFIX + str(storage.local_path(adapters_dir).resolve())


def local_folder(uri: str | None) -> Path | None:
    """The local folder a ``served_uri`` names, or None for a bucket's URI (or None)."""
    if uri is None or not uri.startswith(LOCAL_PREFIX):
        return None
    return Path(uri.removeprefix(LOCAL_PREFIX))


def list_adapters(uri: str) -> list[str]:
    """The adapters of ``uri``: a local folder's subfolders that hold ``adapter_config.json``; a bucket's
    subfolders, as Ray's own listing (its ``/v1/models``) reads them."""
    folder = local_folder(uri)
    if folder is None:
        from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

        return [name.strip("/") for name in CloudFileSystem.list_subfolders(uri)]
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir() and os.path.isfile(os.path.join(e.path, ADAPTER_CONFIG)))
