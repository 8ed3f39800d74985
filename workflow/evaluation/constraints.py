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
    if "string" in types:
        schema["maxLength"] = max_value_chars
    return schema


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
        # Compact JSON, as ingest writes JSON outputs (and no room for endless whitespace).
        if cfg.schema_ is not None:
            return {"json": cfg.schema_, "disable_any_whitespace": True}, {}
        values = [json.loads(v.canonical) for v in parsed if v is not None]
        if not values:
            raise WorkflowError(f"{where}: no JSON schema to constrain decoding to (none given, no valid JSON "
                                "output in a training split)", hint="set evaluate.task.schema")
        return {"json": infer_schema(values, max_value_chars=constrained.max_value_chars),
                "disable_any_whitespace": True}, {}
    if cfg.kind == "label":
        labels = cfg.labels or sorted({p for p in parsed if p is not None})
        if not labels:
            raise WorkflowError(f"{where}: no labels to constrain decoding to", hint="set evaluate.task.labels")
        return {"choice": labels}, {"labels": labels}
    raise WorkflowError(f"{where}: a {cfg.kind} task has no decoding constraint",
                        hint="remove evaluate.constrained_decoding, or set a task kind that has one (call, json, "
                             "label)")
