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


# An attribute written without a value (``attr`` alone) holds none of the characters any candidate syntax
# uses to write one, so that ``name=x`` is never read as a value-less ``name=x`` by the bracket syntax.
_BARE_ATTRIBUTE_EXCLUDED = "=:;,()[]{}"


def _bare_attribute(text: str, name_re: re.Pattern) -> str | None:
    """``attr`` of a slot written without a value (``attr`` alone, or ``attr[]`` in any syntax), else None."""
    text = text.strip()
    if text.endswith("[]"):
        text = text[:-2].rstrip()
        return text if name_re.fullmatch(text) else None
    if name_re.fullmatch(text) and not any(c in _BARE_ATTRIBUTE_EXCLUDED for c in text):
        return text
    return None


def parse_call(text: str, syntax: CallSyntax | None = None) -> FunctionCall | None:
    """``fn(a[x], b[y, z])`` (or the syntax given) -> FunctionCall; None without a readable name.

    A slot written without a value (``attr`` alone, ``attr[]``, or ``attr=`` in an assign syntax) is the
    slot ``(attr, "")``. A call whose arguments do not all read is ``complete=False`` with the slots read
    before the first that did not.
    """
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
            bare = None if found else _bare_attribute(part, name_re)
            if bare is not None:
                slots.append((bare, ""))
                continue
            if not found or not name_re.fullmatch(attr.strip()):
                return FunctionCall(name, frozenset(slots), complete=False)
            slots.append((attr.strip(), value.strip()))
        return FunctionCall(name, frozenset(slots))
    pos = 0
    while True:
        start = body.find(syntax.value_open, pos)
        next_sep = body.find(sep, pos)
        if start < 0 or 0 <= next_sep < start:  # attr alone, up to the separator or the end
            bare = _bare_attribute(body[pos:] if next_sep < 0 else body[pos:next_sep], name_re)
            if bare is None:
                return FunctionCall(name, frozenset(slots), complete=False)
            slots.append((bare, ""))
            if next_sep < 0:
                return FunctionCall(name, frozenset(slots))
            pos = next_sep + len(sep)
            if not body[pos:].strip():
                return FunctionCall(name, frozenset(slots), complete=False)
            continue
        end = body.find(syntax.value_close, start + 1)
        attr = body[pos:start].strip()
        value = body[start + len(syntax.value_open):end] if end >= 0 else ""
        if end < 0 or not name_re.fullmatch(attr) or syntax.value_open in value:
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
    """(path, canonical JSON) of every field: each leaf of a non-empty object or array, an empty object or
    array inside one included (the key is there, with an empty value); a scalar value is one field at
    path ``""``; an empty object or array as the whole value has no field."""
    def walk(v: Any, at: str) -> list[tuple[str, str]]:
        if isinstance(v, dict) and v:
            return [leaf for k in sorted(v) for leaf in walk(v[k], f"{at}.{k}" if at else str(k))]
        if isinstance(v, list) and v:
            return [leaf for i, item in enumerate(v) for leaf in walk(item, f"{at}[{i}]")]
        return [(at, canonical_json(v))]

    return [] if isinstance(value, dict | list) and not value else walk(value, path)


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

# The rule that reads a task off the training outputs (docs/evaluation.md):
#   1. json  if at least MIN_SHARE_THAT_FIT of the outputs are JSON objects or arrays;
#   2. call  if at least MIN_SHARE_THAT_FIT of them read in full as calls in one of CANDIDATE_SYNTAXES
#            (value-less slots such as ``attr``, ``attr[]``, ``attr=`` included) and some call has a slot;
#            of several such syntaxes, the one that reads the most outputs, then the most slots with a value;
#   3. label if the distinct outputs (stripped) are at most LABEL_MAX_DISTINCT_SHARE of the outputs and
#            each is at most LABEL_MAX_WORDS words;
#   4. text  otherwise.
# The outputs that do not fit the kind are counted and shown (a few of them); at evaluation an answer
# or reference of that shape is scored as any malformed answer is (a parse failure).
MIN_SHARE_THAT_FIT = 0.98
LABEL_MAX_DISTINCT_SHARE = 0.10
LABEL_MAX_WORDS = 5
MISFIT_EXAMPLES = 3

# Call syntaxes tried when a recipe gives no task: ViGGO's, then key=value forms.
CANDIDATE_SYNTAXES = [CallSyntax(), CallSyntax(separator=",")] + [
    CallSyntax(assign=assign, separator=sep) for assign in ("=", ":") for sep in ("; ", ";", ", ", ",")]

_KIND_NOUN = {"json": "JSON objects or arrays", "call": "calls", "label": "labels", "text": "text"}


@dataclass(frozen=True)
class TaskInference:
    """The task read off a split's outputs and the evidence for it (what ``infer_with_evidence`` returns).

    ``fit`` of ``outputs`` read as the kind (for ``text``: all of them); ``misfit_examples`` are the first
    few that did not; ``shares`` is the share the best reading of each kind reached (json, call) or, for
    label, the distinct outputs' share of the rows; ``thresholds`` are the rule's constants.
    """

    config: TaskConfig
    outputs: int
    fit: int
    misfit_examples: list[str]
    shares: dict[str, float]
    reason: str
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "min_share_that_fit": MIN_SHARE_THAT_FIT, "label_max_distinct_share": LABEL_MAX_DISTINCT_SHARE,
        "label_max_words": LABEL_MAX_WORDS})

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def syntax(self) -> CallSyntax | None:
        return self.config.call_syntax if self.kind == "call" else None

    @property
    def misfits(self) -> int:
        return self.outputs - self.fit

    @property
    def share(self) -> float:
        return self.fit / self.outputs if self.outputs else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON for a stats file or manifest: the task as a recipe writes it, and the evidence."""
        return {"task": dump(self.config), "kind": self.kind,
                "syntax": self.syntax.model_dump(mode="json", exclude_none=True) if self.syntax else None,
                "outputs": self.outputs, "fit": self.fit, "share_that_fit": round(self.share, 6),
                "misfits": self.misfits, "misfit_examples": self.misfit_examples,
                "shares": {k: round(v, 6) for k, v in self.shares.items()}, "reason": self.reason,
                "thresholds": self.thresholds}

    def lines(self, source: str = "training") -> list[str]:
        """What the console says: the kind, why, how to pin it, and the outputs that do not fit."""
        found = [f"task: inferred kind {self.kind!r} from {self.outputs} {source} outputs ({self.reason}); "
                 f"to pin it, set evaluate.task: {json.dumps(dump(self.config))}"]
        if self.misfits:
            examples = ", ".join(repr(_short(e)) for e in self.misfit_examples)
            found.append(f"task: {self.misfits} of {self.outputs} outputs do not read as {_KIND_NOUN[self.kind]}, "
                         f"e.g. {examples} (scored as parse failures where they are answers or references)")
        return found


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _calls_read(outputs: list[str], syntax: CallSyntax) -> tuple[list[bool], int]:
    """(whether each output reads in full as a call of ``syntax``, how many slots with a value were read)."""
    calls = [parse_call(o, syntax) for o in outputs]
    fits = [c is not None and c.complete for c in calls]
    valued = sum(1 for c, ok in zip(calls, fits, strict=True) if ok for _, v in c.slots if v)
    if not any(c.slots for c, ok in zip(calls, fits, strict=True) if ok):
        return [False] * len(outputs), 0
    return fits, valued


def _written_separator(outputs: list[str], syntax: CallSyntax) -> str:
    """The separator as the outputs write it: with a space after it if most of them do."""
    sep = syntax.separator.strip()
    spaced = sum(o.count(sep + " ") for o in outputs)
    return sep + " " if spaced * 2 >= sum(o.count(sep) for o in outputs) else sep


def infer_with_evidence(outputs: list[str]) -> TaskInference:
    """The task kind the training outputs look like, by the share of them that fit (the rule above)."""
    outputs = [o for o in outputs if o is not None]
    n = len(outputs)
    if not n:
        return TaskInference(TaskConfig(kind="text"), 0, 0, [], {}, "no outputs")

    def inference(cfg: TaskConfig, fits: list[bool], shares: dict[str, float], reason: str) -> TaskInference:
        misfits = [o for o, ok in zip(outputs, fits, strict=True) if not ok]
        return TaskInference(cfg, n, n - len(misfits), misfits[:MISFIT_EXAMPLES], shares, reason)

    shares: dict[str, float] = {}
    parsed = [parse_json(o) for o in outputs]
    json_fits = [p is not None and p.canonical[:1] in "{[" for p in parsed]
    shares["json"] = sum(json_fits) / n
    if shares["json"] >= MIN_SHARE_THAT_FIT:
        return inference(TaskConfig(kind="json"), json_fits, shares,
                         f"{sum(json_fits)} read as JSON objects or arrays, {shares['json']:.1%} >= "
                         f"{MIN_SHARE_THAT_FIT:.0%}")
    best: tuple[int, int, int] | None = None  # (outputs read, slots with a value, -position in the list)
    best_fits: list[bool] = []
    for i, syntax in enumerate(CANDIDATE_SYNTAXES):
        fits, valued = _calls_read(outputs, syntax)
        key = (sum(fits), valued, -i)
        if best is None or key > best:
            best, best_fits = key, fits
    shares["call"] = best[0] / n
    if shares["call"] >= MIN_SHARE_THAT_FIT:
        syntax = CANDIDATE_SYNTAXES[-best[2]]
        written = syntax.model_copy(update={"separator": _written_separator(outputs, syntax)})
        cfg = TaskConfig(kind="call", syntax=None if written == CallSyntax() else written)
        return inference(cfg, best_fits, shares, f"{best[0]} read as calls written {describe_syntax(cfg.call_syntax)}, "
                                                 f"{shares['call']:.1%} >= {MIN_SHARE_THAT_FIT:.0%}")
    labels = Counter(o.strip() for o in outputs)
    shares["label"] = len(labels) / n
    longest = max(len(label.split()) for label in labels)
    if shares["label"] <= LABEL_MAX_DISTINCT_SHARE and longest <= LABEL_MAX_WORDS:
        return inference(TaskConfig(kind="label"), [True] * n, shares,
                         f"{len(labels)} distinct outputs, {shares['label']:.1%} of the outputs <= "
                         f"{LABEL_MAX_DISTINCT_SHARE:.0%}, each at most {LABEL_MAX_WORDS} words")
    why = (f"JSON {shares['json']:.1%} and calls {shares['call']:.1%} < {MIN_SHARE_THAT_FIT:.0%}; "
           f"{len(labels)} distinct outputs ({shares['label']:.1%}"
           + (f" > {LABEL_MAX_DISTINCT_SHARE:.0%}" if shares["label"] > LABEL_MAX_DISTINCT_SHARE else "")
           + f"), the longest {longest} words")
    return inference(TaskConfig(kind="text"), [True] * n, shares, why)


def describe_syntax(syntax: CallSyntax) -> str:
    """The syntax as an example call: ``fn(attr[value], attr[value])``."""
    slot = (f"attr{syntax.assign}value" if syntax.assign else f"attr{syntax.value_open}value{syntax.value_close}")
    return f"fn{syntax.args_open}{slot}{syntax.separator}{slot}{syntax.args_close}"


def infer(outputs: list[str]) -> TaskConfig:
    """The task kind the training outputs look like (``infer_with_evidence`` without the evidence)."""
    return infer_with_evidence(outputs).config


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

    def row_score(self, expected: str, got: str, metric: str | None = None) -> float:
        """The main metric (or ``metric``) on one row (how the worst errors are ranked and the serve smoke
        check scores)."""
        metric = self.metrics[metric or self.main_metric]
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
    return {name: from_function(import_function(name), name) if ":" in name else METRICS[cfg.kind][name]
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
        inferred = infer_with_evidence(outputs)
        for line in inferred.lines(source):
            say(f"[{stage}] {line}")
        cfg = inferred.config
    parse = _parser(cfg)
    task = Task(cfg, parse, _metrics(cfg), cfg.main())
    if constrained is not None:
        task.constraint, task.vocabulary = constraints.for_task(cfg, [parse(o) for o in train_outputs or []],
                                                                train_outputs or [], constrained, where=where)
    return task
