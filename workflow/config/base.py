"""Shared pieces of the typed recipe sections: the strict base model and the one-line validation error."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.errors import WorkflowError


class Section(BaseModel):
    """A recipe section whose own keys are checked strictly: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line: ``file: field.path: what was expected`` for each problem, joined by '; '."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and kind not in ("model_type", "dict_type") and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def check_engine_kwargs(engine_kwargs: dict[str, Any] | None, where: str, *, also: Iterable[str] = ()) -> None:
    """Reject keys of a vLLM ``engine_kwargs`` mapping that are not ``vllm.AsyncEngineArgs`` fields.

    ``also`` names keys the wrapping library accepts besides them. One line naming ``where``,
    the keys and, where one is close, the known name meant. Imports vLLM (serve env only).
    """
    import dataclasses
    import difflib

    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | set(also)
    unknown = sorted(set(engine_kwargs or {}) - known)
    if not unknown:
        return
    close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
    meant = [f"{match[0]!r}" + (f" for {key!r}" if len(unknown) > 1 else "") for key, match in close.items() if match]
    hint = (f"did you mean {', '.join(meant)}? " if meant else "") + "see vllm.AsyncEngineArgs for the names"
    raise WorkflowError(f"{where}: unknown vLLM engine argument(s) {unknown}", hint=hint)
