"""Dataset rows in LLaMA-Factory's form: Alpaca or ShareGPT rows, splits, and ``dataset_info.json``.

Each source row is mapped through ``ingest.columns`` and validated; an invalid row is dropped
with a counted reason or, with ``on_invalid: fail``, stops the stage naming the row.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

from ..config import IngestConfig
from ..core import storage
from ..core.errors import WorkflowError
from .read import read_records

ROLES = ("system", "user", "assistant")
# How ingest writes object- and list-valued outputs (said in stats.json and on the console).
JSON_OUTPUTS = "object- or list-valued outputs kept as canonical JSON text (sorted keys, compact)"


class InvalidRow(ValueError):
    """A row that fails validation; the message is the reason counted in the stats."""


def _text(row: dict, column: str, field: str, *, required: bool) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise InvalidRow(f"empty {field}")
        return ""
    if not isinstance(value, str):
        raise InvalidRow(f"non-string {field}")
    if required and not value.strip():
        raise InvalidRow(f"empty {field}")
    return value


def canonical_json(value: Any) -> str:
    """JSON text with sorted keys and no spaces: one spelling per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _output_as_text(row: dict, column: str) -> dict:
    """The row with an object- or list-valued output as canonical JSON text (JSON extraction datasets)."""
    value = row.get(column)
    return {**row, column: canonical_json(value)} if isinstance(value, dict | list) else row


def to_alpaca(row: dict, cfg: IngestConfig) -> dict[str, str]:
    cols = cfg.columns
    out = {}
    out["instruction"] = cfg.instruction if cfg.instruction is not None else _text(
        row, cols.get("instruction", "instruction"), "instruction", required=False)
    out["input"] = _text(row, cols.get("input", "input"), "input", required=False) if (
        "input" in cols or "input" in row) else ""
    if not (out["instruction"].strip() or out["input"].strip()):
        raise InvalidRow("empty instruction and input")
    out["output"] = _text(_output_as_text(row, cols.get("output", "output")), cols.get("output", "output"), "output",
                          required=True)
    system = cfg.system if cfg.system is not None else (
        _text(row, cols["system"], "system", required=False) if "system" in cols else "")
    if system:
        out["system"] = system
    return out


def to_sharegpt(row: dict, cfg: IngestConfig) -> dict[str, Any]:
    if "messages" not in cfg.columns and "messages" not in row:
        a = to_alpaca(row, cfg)
        user = "\n".join(t for t in (a["instruction"], a["input"]) if t)
        out: dict[str, Any] = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": a["output"]}]}
        if "system" in a:
            out["system"] = a["system"]
        return out
    messages = row.get(cfg.columns.get("messages", "messages"))
    if not isinstance(messages, list) or not messages:
        raise InvalidRow("messages not a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict):
            raise InvalidRow("message not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES:
            raise InvalidRow("unknown message role")
        if not isinstance(content, str):
            raise InvalidRow("non-string message content")
        if not content.strip():
            raise InvalidRow("empty message content")
        clean.append({"role": role, "content": content})
    out = {}
    if clean[0]["role"] == "system":
        out["system"] = clean.pop(0)["content"]
    elif cfg.system is not None:
        out["system"] = cfg.system
    roles = [m["role"] for m in clean]
    if not roles or roles[-1] != "assistant" or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise InvalidRow("messages not alternating user/assistant ending with assistant")
    out["messages"] = clean
    return out


def check_columns(rows: list[dict], cfg: IngestConfig, where: str) -> None:
    """A column the mapping names but the file lacks is a file-level error, not a dropped row."""
    present = set().union(*(r.keys() for r in rows[:100]))
    needed = dict(cfg.columns)
    if cfg.format == "alpaca" or "messages" not in needed:
        needed.setdefault("output", "output")
        if cfg.instruction is None and "instruction" not in needed and "input" not in needed:
            needed["instruction"] = "instruction"
    for field, column in needed.items():
        if field in ("instruction",) and cfg.instruction is not None:
            continue
        if column not in present:
            raise WorkflowError(f"{where}: missing column {column!r} (mapped to {field}); the file has {sorted(present)}",
                                hint=f"set ingest.columns.{field} to one of its columns")


def convert(rows: list[dict], cfg: IngestConfig, where: str) -> tuple[list[dict], Counter, int]:
    """(the rows in LLaMA-Factory's form, the dropped rows' reasons, how many outputs were kept as JSON text)."""
    check_columns(rows, cfg, where)
    mapper = to_alpaca if cfg.format == "alpaca" else to_sharegpt
    kept, dropped, json_outputs = [], Counter(), 0
    output_column = cfg.columns.get("output", "output")
    for i, row in enumerate(rows, 1):
        try:
            kept.append(mapper(row, cfg))
            json_outputs += isinstance(row.get(output_column), dict | list)
        except InvalidRow as reason:
            if cfg.on_invalid == "fail":
                raise WorkflowError(f"{where}: row {i}: {reason}",
                                    hint="fix the row, or set ingest.on_invalid: drop to skip such rows") from None
            dropped[str(reason)] += 1
    return kept, dropped, json_outputs


def _json_outputs(count: int) -> dict[str, Any]:
    """The stats entry of the outputs kept as JSON text (none without such outputs)."""
    return {"json_outputs": {"rows": count, "written_as": JSON_OUTPUTS}} if count else {}


def split_sources(cfg: IngestConfig) -> dict[str, str]:
    """Split name -> source URI (only when the recipe names a file per split)."""
    if cfg.splits is None:
        return {}
    return {name: storage.join(cfg.source, rel) for name, rel in cfg.splits.items()}


def load_splits(cfg: IngestConfig) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    rng = random.Random(cfg.seed)
    stats: dict[str, Any] = {}
    splits: dict[str, list[dict]] = {}
    if cfg.splits is not None:
        for name, uri in split_sources(cfg).items():
            raw = read_records(uri, cfg.file_format)
            rows, dropped, json_outputs = convert(raw, cfg, uri)
            if cfg.shuffle:
                rng.shuffle(rows)
            splits[name] = rows
            stats[name] = {"source": uri, "read": len(raw), "dropped": dict(dropped), **_json_outputs(json_outputs)}
    else:
        raw = read_records(cfg.source, cfg.file_format)
        rows, dropped, json_outputs = convert(raw, cfg, cfg.source)
        if cfg.shuffle:
            rng.shuffle(rows)
        start = 0
        # Cut in a fixed order (train, val, test, then others) whatever the YAML's key order.
        known = ("train", "val", "test")
        names = sorted(cfg.split_ratios, key=lambda n: (known.index(n) if n in known else len(known), n))
        for i, name in enumerate(names):
            end = len(rows) if i == len(names) - 1 else start + round(cfg.split_ratios[name] * len(rows))
            splits[name] = rows[start:end]
            stats[name] = {"source": cfg.source, "read": end - start, "dropped": {}}
            start = end
        stats["dropped_before_split"] = dict(dropped)
        stats.update(_json_outputs(json_outputs))
    for name, rows in splits.items():
        limit = cfg.max_samples.get(name) if isinstance(cfg.max_samples, dict) else cfg.max_samples
        if limit is not None:
            splits[name] = rows[:limit]
        stats[name]["kept"] = len(splits[name])
        if not splits[name]:
            raise WorkflowError(f"ingest: split {name!r} has no valid rows left", hint="see the dropped counts above")
    return splits, stats


def dataset_info(cfg: IngestConfig, split_names: list[str], has_system: dict[str, bool]) -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json``: one dataset per split, named after it."""
    info = {}
    for name in split_names:
        if cfg.format == "alpaca":
            columns = {"prompt": "instruction", "query": "input", "response": "output"}
            entry: dict[str, Any] = {"file_name": f"{name}.jsonl", "formatting": "alpaca", "columns": columns}
        else:
            columns = {"messages": "messages"}
            entry = {"file_name": f"{name}.jsonl", "formatting": "sharegpt", "columns": columns,
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "system_tag": "system"}}
        if has_system[name]:
            columns["system"] = "system"
        info[name] = entry
    return info
