"""Reading a dataset file: JSONL, JSON, CSV or Parquet, local or remote (fsspec), as dicts."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..core import storage
from ..core.errors import WorkflowError


def detect_format(name: str, declared: str) -> str:
    if declared != "auto":
        return declared
    lower = name.lower().split("?", 1)[0]
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if lower.endswith(suffix):
            return fmt
    raise WorkflowError(f"{name}: cannot tell the file format from its name", hint="set ingest.file_format")


def _open_bytes(uri: str) -> bytes:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise WorkflowError(f"{uri}: file not found", hint="check ingest.source and ingest.splits") from None
    if not data.strip():
        raise WorkflowError(f"{uri}: the file is empty")
    return data


def read_records(uri: str, file_format: str = "auto") -> list[dict[str, Any]]:
    """Every record of one file, as dicts; malformed files raise a one-line error."""
    fmt = detect_format(uri, file_format)
    data = _open_bytes(uri)
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkflowError(f"{uri}:{lineno}: not valid JSON ({err.msg} at column {err.colno})",
                                    hint="fix or remove that line") from None
            if not isinstance(row, dict):
                raise WorkflowError(f"{uri}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    elif fmt == "json":
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as err:
            raise WorkflowError(f"{uri}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise WorkflowError(f"{uri}: a JSON file must hold a list of objects")
        rows = obj
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        rows = [dict(r) for r in reader]
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise WorkflowError(f"{uri}: not a readable Parquet file ({err})") from None
    if not rows:
        raise WorkflowError(f"{uri}: the file has no rows")
    return rows
