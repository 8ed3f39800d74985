"""Constrained decoding: the regex that limits an answer to well-formed function calls.

The names come from ``evaluate.constrained_decoding`` or, when it names none, from the two
lists a ViGGO-style instruction holds; every output that matches parses with
``metrics.parse_call``.
"""

from __future__ import annotations

import re
from typing import Any

from ..config.evaluate import EvaluateConfig
from ..core.errors import WorkflowError

_LISTED = re.compile(r"\[((?:\s*'[^']*'\s*,?)+)\]")


def allowed_names(instruction: str) -> tuple[list[str], list[str]]:
    """The function and attribute names a ViGGO-style instruction lists, in that order.

    The instruction holds two Python-style lists: ``... must be one of the following
    ['inform', ...]. The attributes must be one of the following: ['name', ...]``.
    """
    lists = [re.findall(r"'([^']*)'", m.group(1)) for m in _LISTED.finditer(instruction or "")]
    if len(lists) < 2:
        raise WorkflowError("evaluate.constrained_decoding: the instruction does not list the allowed functions "
                            "and attributes", hint="set evaluate.constrained_decoding.functions and .attributes")
    return lists[0], lists[1]


def call_regex(functions: list[str], attributes: list[str], *, max_value_chars: int = 80,
               max_slots: int | None = None) -> str:
    """A regex for ``fn(attr[value], ...)`` with the given names.

    Values hold no brackets or newlines; the bounds on value length and slot count keep a
    constrained answer finite (every output that matches parses with :func:`parse_call`).
    """
    fn = "(" + "|".join(re.escape(f) for f in functions) + ")"
    attr = "(" + "|".join(re.escape(a) for a in attributes) + ")"
    slot = attr + r"\[[^\[\]\n]{0," + str(max_value_chars) + r"}\]"
    more = (max_slots or len(attributes)) - 1
    return fn + r"\(" + slot + "(, " + slot + "){0," + str(more) + r"}\)"


def constraint_regex(row: dict[str, Any], cfg: EvaluateConfig) -> str:
    cd = cfg.constrained_decoding
    if cd.functions and cd.attributes:
        functions, attributes = cd.functions, cd.attributes
    else:
        listed = allowed_names(row.get("instruction", ""))
        functions, attributes = cd.functions or listed[0], cd.attributes or listed[1]
    return call_regex(functions, attributes, max_value_chars=cd.max_value_chars, max_slots=cd.max_slots)
