"""Datasets of rows for batch inference: reading any file or folder as a Ray dataset, writing the
output as one Parquet or JSONL file (atomically), progress lines while rows arrive."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.console import say
from ..core.errors import WorkflowError


def _pyarrow_filesystem(uri: str):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = storage.filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs))


def detect_format(uri: str) -> str:
    name = uri.lower().rstrip("/")
    for suffix, fmt in ((".jsonl", "json"), (".json", "json"), (".ndjson", "json"), (".parquet", "parquet"),
                        (".pq", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return fmt
    if not storage.is_local(uri) or Path(storage.local_path(uri)).is_dir():
        files = storage.list_files(uri)
        formats = {detect_format(f) for f in files if "." in f.rsplit("/", 1)[-1] and not f.startswith(".")}
        if len(formats) == 1:
            return formats.pop()
    raise WorkflowError(f"{uri}: cannot tell the format (expected .jsonl, .json, .parquet or .csv)")


def read_dataset(uri: str):
    """Any JSONL/JSON, Parquet or CSV file or folder, local or on s3/gs, as a Ray dataset."""
    import ray.data

    if storage.is_local(uri) and not storage.local_path(uri).exists():
        raise WorkflowError(f"{uri}: input not found", hint="check --input")
    fmt = detect_format(uri)
    reader = {"json": ray.data.read_json, "parquet": ray.data.read_parquet, "csv": ray.data.read_csv}[fmt]
    if storage.is_local(uri):
        return reader(str(storage.local_path(uri)))
    _, path = storage.filesystem(uri)
    return reader(path, filesystem=_pyarrow_filesystem(uri))


def with_progress(batches: Iterator, *, total: int | None, what: str) -> Iterator:
    """Pass batches through, printing rows done and rows/s at most every 5 s and at the end."""
    rows, started, last_report = 0, time.monotonic(), 0.0
    for batch in batches:
        rows += batch.num_rows
        now = time.monotonic()
        if now - last_report >= 5 or (total and rows == total):
            last_report = now
            of = f"/{total}" if total else ""
            say(f"[{what}] {rows}{of} rows, {rows / max(now - started, 1e-9):.1f} rows/s")
        yield batch


def output_format(uri: str) -> str:
    if uri.endswith((".parquet", ".pq")):
        return "parquet"
    if uri.endswith((".jsonl", ".json")):
        return "jsonl"
    raise WorkflowError(f"{uri}: the output must end in .parquet or .jsonl")


def write_rows(batches: Iterator, uri: str, *, total: int | None = None, what: str = "batch") -> int:
    """Stream Arrow batches into one Parquet or JSONL file at ``uri`` (written atomically).

    Prints progress (rows, rows/s) as batches arrive; returns the number of rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = output_format(uri)
    rows = 0
    with tempfile.TemporaryDirectory(prefix="workflow-out-") as tmp:
        local = Path(tmp) / ("out." + fmt)
        writer = None
        with open(local, "wb") as f:
            for batch in with_progress(batches, total=total, what=what):
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_pandas(batch, preserve_index=False)
                if fmt == "parquet":
                    if writer is None:
                        writer = pq.ParquetWriter(f, table.schema)
                    writer.write_table(table.cast(writer.schema))
                else:
                    for row in table.to_pylist():
                        f.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())
                rows += table.num_rows
            if writer is not None:
                writer.close()
        if rows == 0:
            raise WorkflowError(f"{what}: no rows came back from inference")
        if storage.is_local(uri):
            dest = storage.local_path(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(local, staging)
            os.replace(staging, dest)
        else:
            storage.write_bytes(uri, local.read_bytes())
    return rows


def from_rows(rows: list[dict[str, Any]], batch_size: int):
    """A Ray dataset of in-memory rows in a few blocks of several engine batches each.

    ``ray.data.from_items`` alone makes up to 200 one-row-ish blocks, i.e. 200 preprocess
    tasks whose scheduling competes with the engine for the same cores.
    """
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // (4 * batch_size))))
