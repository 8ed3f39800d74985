"""Constrained decoding: the vLLM ``structured_outputs`` each task kind offers.

- ``call``: a regex of the task's syntax over its function and attribute names;
- ``json``: the task's JSON schema, or one inferred from the training outputs;
- ``label``: a choice over the labels.

The vocabulary is the task's own or learnt from the training split's outputs (never read
from the instruction's prose); every output a constraint admits parses with the task's parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..config.task import CallSyntax, TaskConfig
from ..core.errors import WorkflowError


def call_regex(functions: list[str], attributes: list[str], *, syntax: CallSyntax | None = None,
               max_value_chars: int = 80, max_slots: int | None = None, allow_empty: bool = False) -> str:
    """A regex for calls of ``syntax`` (default ``fn(attr[value], ...)``) with the given names.

    Values hold no newline and none of the characters that would end them early (the separator;
    the value brackets); the bounds on value length and slot count keep a constrained answer finite.
    """
    syntax = syntax or CallSyntax()
    fn = "(" + "|".join(re.escape(f) for f in functions) + ")"
    attr = "(" + "|".join(re.escape(a) for a in attributes) + ")"
    if syntax.assign:
        stop = set(syntax.separator.strip() or syntax.separator)
        value = "[^" + re.escape("".join(sorted(stop))) + r"\n]{0," + str(max_value_chars) + "}"
        slot = attr + re.escape(syntax.assign) + value
    else:
        stop = set(syntax.value_open) | set(syntax.value_close)
        value = "[^" + re.escape("".join(sorted(stop))) + r"\n]{0," + str(max_value_chars) + "}"
        slot = attr + re.escape(syntax.value_open) + value + re.escape(syntax.value_close)
    more = (max_slots or len(attributes)) - 1
    slots = slot + "(" + re.escape(syntax.separator) + slot + "){0," + str(more) + "}"
    if allow_empty:
        slots = "(" + slots + ")?"
    return fn + re.escape(syntax.args_open) + slots + re.escape(syntax.args_close)


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def infer_schema(values: list[Any], *, max_value_chars: int = 80) -> dict[str, Any]:
    """A JSON schema every one of ``values`` satisfies: the types seen, an object's keys as
    properties (required where every object has them, no others), array items merged.
    Strings are bounded to ``max_value_chars`` so that a constrained answer stays finite."""
    types = sorted({_JSON_TYPES[type(v)] for v in values})
    if "integer" in types and "number" in types:
        types.remove("integer")
    schema: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
    objects = [v for v in values if isinstance(v, dict)]
    if objects:
        keys = sorted({k for o in objects for k in o})
        schema["properties"] = {k: infer_schema([o[k] for o in objects if k in o], max_value_chars=max_value_chars)
                                for k in keys}
        schema["required"] = [k for k in keys if all(k in o for o in objects)]
        schema["additionalProperties"] = False
    items = [item for v in values if isinstance(v, list) for item in v]
    if items:
        schema["items"] = infer_schema(items, max_value_chars=max_value_chars)
    if any(isinstance(v, list) for v in values):
        schema["maxItems"] = max(len(v) for v in values if isinstance(v, list))
    if "string" in types:
        schema["maxLength"] = max_value_chars
    return schema


_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_SCALARS = {"integer": r"-?(?:0|[1-9][0-9]{0,17})",
            "number": r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,17})?(?:[eE][+-]?[0-9]{1,3})?",
            "boolean": "(?:true|false)", "null": "null"}


def compact_json_regex(schema: dict[str, Any], *, max_value_chars: int = 80) -> str | None:
    """A regex for the JSON values ``schema`` admits, written as ingest writes JSON outputs: sorted keys,
    no whitespace. None for a schema beyond what it covers (``type``, ``properties``, ``required``,
    ``additionalProperties: false``, ``items``, ``maxItems``, ``maxLength``), which is then given to the
    engine as a JSON schema (whose whitespace is the engine's ``structured_outputs_config``'s to allow).

    Why a regex: vLLM 0.32 reads ``disable_any_whitespace`` from the engine's configuration only, so a
    schema constraint lets a weak model spend its tokens on whitespace and never close the value.
    """
    known = {"type", "properties", "required", "additionalProperties", "items", "maxItems", "maxLength"}
    if not isinstance(schema, dict) or set(schema) - known or "type" not in schema:
        return None
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    options = []
    for kind in types:
        if kind in _SCALARS:
            options.append(_SCALARS[kind])
        elif kind == "string":
            options.append('"' + _STRING_CHAR + "{0," + str(schema.get("maxLength", max_value_chars)) + '}"')
        elif kind == "array":
            item = compact_json_regex(schema.get("items", {"type": "null"}), max_value_chars=max_value_chars)
            if item is None or "maxItems" not in schema:
                return None
            more = max(0, schema["maxItems"] - 1)
            options.append(r"\[(?:" + item + "(?:," + item + "){0," + str(more) + r"})?\]")
        elif kind == "object":
            if schema.get("additionalProperties", True) is not False:
                return None
            members = []
            for key in sorted(schema.get("properties", {})):
                value = compact_json_regex(schema["properties"][key], max_value_chars=max_value_chars)
                if value is None:
                    return None
                members.append((re.escape(json.dumps(key, ensure_ascii=False)) + ":" + value,
                                key in schema.get("required", [])))
            options.append(r"\{" + _members(members) + r"\}")
        else:
            return None
    return "(?:" + "|".join(options) + ")"


def _members(members: list[tuple[str, bool]]) -> str:
    """Object members in key order, the required ones always, a comma before all but the first written."""
    def tail(start: int) -> str:
        return "".join("(?:," + m + ")" + ("" if required else "?") for m, required in members[start:])

    firsts = []
    for i, (member, _) in enumerate(members):
        firsts.append(member + tail(i + 1))
        if members[i][1]:  # a required member: no later one can come first
            break
    if not firsts:
        return ""
    body = "(?:" + "|".join(firsts) + ")"
    return body if any(required for _, required in members) else body + "?"


def for_task(cfg: TaskConfig, parsed: list[Any], outputs: list[str], constrained, *,
             where: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(vLLM ``structured_outputs``, the vocabulary it uses) for the task's constrained variants.

    ``parsed``: the training outputs through the task's parser; ``constrained``: the recipe's
    ``evaluate.constrained_decoding`` (bounds on value length and slot count).
    """
    if cfg.kind == "call":
        calls = [c for c in parsed if c is not None]
        functions = cfg.functions or sorted({c.name for c in calls})
        attributes = cfg.attributes or sorted({a for c in calls for a, _ in c.slots})
        if not functions or not attributes:
            raise WorkflowError(f"{where}: no function or attribute names to constrain decoding to (none given, "
                                "none learnt from a training split)",
                                hint="set evaluate.task.functions and evaluate.task.attributes")
        regex = call_regex(functions, attributes, syntax=cfg.call_syntax, max_value_chars=constrained.max_value_chars,
                           max_slots=constrained.max_slots, allow_empty=any(not c.slots for c in calls))
        return {"regex": regex}, {"functions": functions, "attributes": attributes}
    if cfg.kind == "json":
        schema = cfg.schema_
        if schema is None:
            values = [json.loads(v.canonical) for v in parsed if v is not None]
            if not values:
                raise WorkflowError(f"{where}: no JSON schema to constrain decoding to (none given, no valid JSON "
                                    "output in a training split)", hint="set evaluate.task.schema")
            schema = infer_schema(values, max_value_chars=constrained.max_value_chars)
        regex = compact_json_regex(schema, max_value_chars=constrained.max_value_chars)
        return ({"regex": regex} if regex else {"json": schema}), {}
    if cfg.kind == "label":
        labels = cfg.labels or sorted({p for p in parsed if p is not None})
        if not labels:
            raise WorkflowError(f"{where}: no labels to constrain decoding to", hint="set evaluate.task.labels")
        return {"choice": labels}, {"labels": labels}
    raise WorkflowError(f"{where}: a {cfg.kind} task has no decoding constraint",
                        hint="remove evaluate.constrained_decoding, or set a task kind that has one (call, json, "
                             "label)")
