"""Evaluation tasks at run time: the parser, metrics and constraint a ``TaskConfig`` names.

``build`` turns the recipe's task (or, with none, the one ``infer`` reads off the training
outputs) into a :class:`Task`, learning the constraint's vocabulary from the training split
where the task does not give it. The parsers are plain functions: ``parse_call`` for any call
syntax, ``parse_json``, ``parse_label``; a task's ``parser`` replaces them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config.task import CallSyntax, TaskConfig, dump, import_function
from ..core.console import say
from ..core.errors import WorkflowError
from ..dataset.formats import canonical_json
from . import constraints
from .metrics import METRICS, Metric, from_function


@dataclass(frozen=True)
class FunctionCall:
    name: str
    slots: frozenset[tuple[str, str]]
    # False when some of the arguments did not parse (the name and the slots before it did).
    complete: bool = True


@dataclass(frozen=True)
class JsonValue:
    canonical: str
    # (path, canonical JSON of the leaf) for every leaf: {"a": {"b": 1}, "c": [2]} -> a.b=1, c[0]=2
    fields: frozenset[tuple[str, str]]


def _name_pattern(syntax: CallSyntax) -> re.Pattern:
    """A function or attribute name: anything but whitespace and the syntax's own delimiters."""
    delimiters = {syntax.args_open, syntax.args_close, syntax.separator.strip() or syntax.separator,
                  syntax.value_open, syntax.value_close, syntax.assign or ""}
    chars = "".join(sorted({c for d in delimiters for c in d}))
    return re.compile(r"[^\s" + re.escape(chars) + r"]+")


def parse_call(text: str, syntax: CallSyntax | None = None) -> FunctionCall | None:
    """``fn(a[x], b[y, z])`` (or the syntax given) -> FunctionCall; None without a readable name."""
    syntax = syntax or CallSyntax()
    name_re = _name_pattern(syntax)
    text = (text or "").strip()
    opened = text.find(syntax.args_open)
    if opened <= 0 or not name_re.fullmatch(text[:opened].strip()):
        return None
    name = text[:opened].strip()
    if not text.endswith(syntax.args_close) or len(text) < opened + len(syntax.args_open) + len(syntax.args_close):
        return FunctionCall(name, frozenset(), complete=False)
    body = text[opened + len(syntax.args_open):len(text) - len(syntax.args_close)].strip()
    slots: list[tuple[str, str]] = []
    if not body:
        return FunctionCall(name, frozenset())
    sep = syntax.separator.strip() or syntax.separator
    if syntax.assign:
        for part in body.split(sep):
            attr, found, value = part.partition(syntax.assign)
            if not found or not name_re.fullmatch(attr.strip()):
                return FunctionCall(name, frozenset(slots), complete=False)
            slots.append((attr.strip(), value.strip()))
        return FunctionCall(name, frozenset(slots))
    pos = 0
    while True:
        start = body.find(syntax.value_open, pos)
        end = body.find(syntax.value_close, start + 1) if start >= 0 else -1
        attr = body[pos:start].strip() if start >= 0 else ""
        value = body[start + len(syntax.value_open):end] if end >= 0 else ""
        if start < 0 or end < 0 or not name_re.fullmatch(attr) or syntax.value_open in value:
            return FunctionCall(name, frozenset(slots), complete=False)
        slots.append((attr, value.strip()))
        rest = body[end + len(syntax.value_close):]
        stripped = rest.lstrip()
        if not stripped:
            return FunctionCall(name, frozenset(slots))
        if not stripped.startswith(sep) or not stripped[len(sep):].strip():
            return FunctionCall(name, frozenset(slots), complete=False)
        pos = len(body) - len(stripped) + len(sep)


def _leaves(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        return [leaf for k in sorted(value) for leaf in _leaves(value[k], f"{path}.{k}" if path else str(k))]
    if isinstance(value, list) and value:
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, canonical_json(value))]


def parse_json(text: str) -> JsonValue | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return JsonValue(canonical_json(value), frozenset(_leaves(value)))


def parse_label(text: str) -> str | None:
    label = (text or "").strip()
    return label or None


# ---------------------------------------------------------------- inferring the kind

# Call syntaxes tried, in order, when a recipe gives no task: ViGGO's, then key=value forms.
CANDIDATE_SYNTAXES = [CallSyntax(), CallSyntax(separator=",")] + [
    CallSyntax(assign=assign, separator=sep) for assign in ("=", ":") for sep in ("; ", ";", ", ", ",")]


def _reads_as_calls(outputs: list[str], syntax: CallSyntax) -> bool:
    calls = [parse_call(o, syntax) for o in outputs]
    return all(c is not None and c.complete for c in calls) and any(c.slots for c in calls)


def _written_separator(outputs: list[str], syntax: CallSyntax) -> str:
    """The separator as the outputs write it: with a space after it if most of them do."""
    sep = syntax.separator.strip()
    spaced = sum(o.count(sep + " ") for o in outputs)
    return sep + " " if spaced * 2 >= sum(o.count(sep) for o in outputs) else sep


def infer(outputs: list[str]) -> TaskConfig:
    """The task kind the training outputs look like (every output must fit it)."""
    outputs = [o for o in outputs if o is not None]
    if not outputs:
        return TaskConfig(kind="text")
    parsed = [parse_json(o) for o in outputs]
    if all(p is not None and p.canonical[:1] in "{[" for p in parsed):
        return TaskConfig(kind="json")
    for syntax in CANDIDATE_SYNTAXES:
        if _reads_as_calls(outputs, syntax):
            written = syntax.model_copy(update={"separator": _written_separator(outputs, syntax)})
            return TaskConfig(kind="call", syntax=None if written == CallSyntax() else written)
    labels = Counter(o.strip() for o in outputs)
    if len(labels) <= 50 and len(labels) * 5 <= len(outputs) and all(len(label.split()) <= 5 for label in labels):
        return TaskConfig(kind="label")
    return TaskConfig(kind="text")


# ---------------------------------------------------------------- the task at run time

@dataclass
class Task:
    config: TaskConfig
    parse: Callable[[str], Any]
    metrics: dict[str, Metric]
    main_metric: str
    # vLLM ``structured_outputs`` for the constrained variants (None: the kind has no constraint).
    constraint: dict[str, Any] | None = None
    vocabulary: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind

    def row_score(self, expected: str, got: str) -> float:
        """The main metric on one row (how the worst errors are ranked and the serve smoke check scores)."""
        metric = self.metrics[self.main_metric]
        e, g = (self.parse(expected), self.parse(got)) if metric.parsed else (expected, got)
        return metric.aggregate([metric.per_row(e, g)])


def _parser(cfg: TaskConfig) -> Callable[[str], Any]:
    if cfg.parser:
        return import_function(cfg.parser)
    if cfg.kind == "call":
        syntax = cfg.call_syntax
        return lambda text: parse_call(text, syntax)
    return {"json": parse_json, "label": parse_label, "text": lambda text: text}[cfg.kind]


def _metrics(cfg: TaskConfig) -> dict[str, Metric]:
    return {name: from_function(import_function(name)) if ":" in name else METRICS[cfg.kind][name]
            for name in cfg.metric_names()}


def build(cfg: TaskConfig | None, train_outputs: list[str] | None, *, constrained=None,
          where: str = "evaluate.task", stage: str = "evaluate", reference_outputs: list[str] | None = None) -> Task:
    """The task: ``cfg``, or inferred from ``train_outputs`` (and said so, with how to pin it).

    Without a training split the kind is read off ``reference_outputs`` (the evaluated split's
    expected outputs: what answers look like, never what the model is shown). ``constrained``
    (the recipe's ``evaluate.constrained_decoding``, or None) asks for the kind's decoding
    constraint, its vocabulary taken from ``cfg`` or learnt from the training outputs only.
    """
    if cfg is None:
        outputs, source = (train_outputs, "training") if train_outputs else (reference_outputs, "reference")
        if not outputs:
            raise WorkflowError(f"{where}: no task given and no outputs to infer it from",
                                hint="set evaluate.task (e.g. {kind: text}; see tasks/)")
        cfg = infer(outputs)
        say(f"[{stage}] task: inferred kind {cfg.kind!r} from {len(outputs)} {source} outputs; to pin it, "
            f"set evaluate.task: {json.dumps(dump(cfg))}")
    parse = _parser(cfg)
    task = Task(cfg, parse, _metrics(cfg), cfg.main())
    if constrained is not None:
        task.constraint, task.vocabulary = constraints.for_task(cfg, [parse(o) for o in train_outputs or []],
                                                                train_outputs or [], constrained, where=where)
    return task
