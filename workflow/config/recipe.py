"""The recipe: one YAML file that describes a run, validated by a typed schema.

``load_recipe`` reads the YAML, substitutes ``${VAR}`` / ``${VAR:-default}`` from the
environment, resolves relative paths against the recipe's folder and validates. Every
problem is reported as one line naming the file, the field path and what was expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator

from ..core.errors import WorkflowError
from .base import Section, format_validation_error
from .evaluate import EvaluateConfig
from .ingest import IngestConfig
from .model import ModelConfig
from .serve import ServeConfig
from .task import TaskConfig
from .train import TrainConfig

# The project's task files: ``evaluate.task: viggo`` is tasks/viggo.yaml.
TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://", "memory://")


class Recipe(Section):
    name: str
    storage: str = "./runs"
    model: ModelConfig
    ingest: IngestConfig
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    serve: ServeConfig | None = None
    # Free-form notes; ignored by the runner.
    description: str | None = Field(default=None)

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the run's folder and model ids)")
        return v

    @property
    def path(self) -> Path | None:
        """The YAML file this recipe was loaded from, if any."""
        return self._path

    @property
    def run_uri(self) -> str:
        """Where this run's stages write: ``<storage>/<name>``."""
        return self.storage.rstrip("/") + "/" + self.name


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def _substitute_env(text: str, where: str) -> str:
    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise WorkflowError(f"{where}: ${{{name}}} is not set", hint=f"export {name}=... or write ${{{name}:-default}}")

    return _ENV_VAR.sub(repl, text)


def _resolve_path(value: str, base: Path) -> str:
    if is_remote(value) or os.path.isabs(value):
        return value
    return str((base / os.path.expanduser(value)).resolve())


def _looks_like_path(value: str, base: Path) -> bool:
    """A model source is a path if it says so (./ ../ / ~) or names something on disk."""
    return value.startswith(("./", "../", "/", "~")) or (base / value).exists()


def _load_task(name: str, base: Path, where: str) -> dict[str, Any]:
    """``evaluate.task`` given as a name (a file of the project's tasks/) or a YAML file beside the recipe."""
    path = base / name if name.endswith((".yaml", ".yml")) or "/" in name else TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise WorkflowError(f"{where}: evaluate.task: no task file {path}",
                            hint=f"name one of the project's tasks {known}, a YAML file beside the recipe, or write "
                                 "the task inline ({kind: call, ...})")
    try:
        data = yaml.safe_load(path.read_text())
        return TaskConfig.model_validate(data).model_dump(mode="json", by_alias=True, exclude_none=True)
    except yaml.YAMLError as err:
        raise WorkflowError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except ValidationError as err:
        raise WorkflowError(format_validation_error(err, str(path))) from None


def _resolve_paths(data: dict[str, Any], base: Path, where: str) -> None:
    if isinstance(data.get("storage"), str):
        data["storage"] = _resolve_path(data["storage"], base)
    ingest = data.get("ingest")
    if isinstance(ingest, dict) and isinstance(ingest.get("source"), str):
        ingest["source"] = _resolve_path(ingest["source"], base)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("source"), str):
        src = model["source"]
        if src != "tiny" and not is_remote(src) and _looks_like_path(src, base):
            model["source"] = _resolve_path(src, base)
    evaluate = data.get("evaluate")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("task"), str):
        evaluate["task"] = _load_task(evaluate["task"], base, where)


def parse_recipe(data: Any, *, base_dir: Path, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise WorkflowError(f"{where}: a recipe is a YAML mapping with name, model, ingest, ...; got {type(data).__name__}")
    _resolve_paths(data, base_dir, where)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise WorkflowError(format_validation_error(err, where)) from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"{p}: recipe file not found", hint="pass the path of a YAML file, e.g. recipes/viggo-cpu.yaml")
    text = _substitute_env(p.read_text(), str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WorkflowError(f"{p}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    recipe = parse_recipe(data, base_dir=p.resolve().parent, where=str(p))
    recipe._path = p.resolve()
    return recipe
