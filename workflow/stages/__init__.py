"""The stages, their order and their environments: the one list of them.

Each stage is a module of this package (``workflow/core/stage.py`` says what it holds); the
runner starts each one as ``<env python> -m workflow.stages STAGE RECIPE`` (``__main__.py``).
Stage modules are imported only by name, when asked for, so importing this list costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..core import envs
from ..core.errors import WorkflowError


@dataclass(frozen=True)
class StageSpec:
    module: str
    env: str
    section: str  # the recipe section that enables it
    doc: str


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("workflow.stages.ingest", envs.SERVE, "ingest", "read, validate and write the dataset in LLaMA-Factory form"),
    "model": StageSpec("workflow.stages.model", envs.TRAIN, "model", "build or mirror the base model"),
    "train": StageSpec("workflow.stages.train", envs.TRAIN, "train", "LoRA SFT with LLaMA-Factory inside Ray Train"),
    "evaluate": StageSpec("workflow.stages.evaluate", envs.SERVE, "evaluate", "batch inference with vLLM on Ray Data, metrics, report"),
    "serve": StageSpec("workflow.stages.serve", envs.SERVE, "serve", "OpenAI-compatible Ray Serve LLM app (smoke check in a run)"),
}
ORDER = list(STAGES)
# Commands that run one stage-like job outside the pipeline order.
JOBS: dict[str, StageSpec] = {
    "batch": StageSpec("workflow.stages.batch", envs.SERVE, "evaluate", "batch inference over any dataset"),
}


def stage_module(name: str) -> ModuleType:
    spec = STAGES.get(name) or JOBS.get(name)
    if spec is None:
        raise WorkflowError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name == spec.module:
            raise WorkflowError(f"the {name} stage is not built yet ({spec.module} does not exist)") from None
        raise
