"""What every stage shares: its context, its result, how it is executed and how its failure is reported.

A stage is a module with four names (``workflow/stages/``; ``workflow.stages.STAGES`` lists them):

- ``ENV``: ``"train"`` or ``"serve"`` — the environment it runs in;
- ``config(ctx) -> dict``: the parts of the recipe it depends on;
- ``inputs(ctx) -> dict[str, str]``: a hash for each input (upstream manifests, sources);
- ``run(ctx) -> StageResult``: does the work, writing only under ``ctx.out_uri``.

``execute`` compares the fingerprint of config + inputs with the manifest already in
storage and skips the stage when they match (unless forced); otherwise it removes the old
manifest, runs the stage and writes the new manifest last, so a killed stage never looks
complete. ``python -m workflow.stages STAGE RECIPE`` is how the runner starts one in its
own environment. Being part of ``workflow.core``, this module imports nothing above it
(``tests/test_layers.py``): the context holds the recipe without naming its type.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import envs, manifest, storage
from .console import say
from .errors import WorkflowError
from .secrets import redact


@dataclass
class StageContext:
    recipe: Any  # a workflow.config.Recipe
    stage: str
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_uri(self) -> str:
        return self.recipe.run_uri

    @property
    def out_uri(self) -> str:
        return self.stage_uri(self.stage)

    def stage_uri(self, stage: str, *parts: str) -> str:
        return storage.join(self.run_uri, stage, *parts)

    def upstream(self, stage: str) -> dict:
        """The manifest of a stage this one reads from; an error if it has not completed."""
        found = manifest.read(self.stage_uri(stage))
        if found is None:
            raise WorkflowError(
                f"{self.stage}: the {stage} stage has not completed for run {self.recipe.name!r} "
                f"(no manifest in {self.stage_uri(stage)})",
                hint=f"run `{envs.command()} {stage} {self.recipe.path or 'RECIPE'}` first",
            )
        return found

    def scratch(self, *parts: str) -> Path:
        """A local working folder for this stage (kept between runs, never the source of truth)."""
        p = cache_dir(self.recipe.name).joinpath(self.stage, *parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def cache_dir(run_name: str) -> Path:
    """This machine's working folder for a run: ``<the user's cache folder>/<run>`` (``storage.cache_root``)."""
    return storage.cache_root() / run_name


@dataclass
class StageResult:
    outputs: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)


def execute(module: Any, ctx: StageContext) -> dict | None:
    """Run one stage unless its manifest already shows the same config and inputs."""
    config = module.config(ctx)
    inputs = module.inputs(ctx)
    cacheable = getattr(module, "CACHEABLE", True)
    fp = manifest.fingerprint(ctx.stage, config, inputs)
    if cacheable and not ctx.force:
        existing = manifest.read(ctx.out_uri)
        if existing is not None and existing.get("fingerprint") == fp:
            say(f"[{ctx.stage}] up to date ({ctx.out_uri}); skipped (use --force to rerun)")
            return existing
    if cacheable:
        manifest.invalidate(ctx.out_uri)
    started = manifest.now()
    say(f"[{ctx.stage}] running -> {ctx.out_uri}")
    result = module.run(ctx)
    if not cacheable:
        return None
    written = manifest.write(ctx.out_uri, stage=ctx.stage, run=ctx.recipe.name, config=config, inputs=inputs,
                             outputs=result.outputs, started_at=started, summary=result.summary)
    say(f"[{ctx.stage}] done; manifest {manifest.manifest_uri(ctx.out_uri)}")
    return written


def report_failure(err: BaseException, *, debug: bool) -> int:
    """Print one line for the user (a traceback with --debug) and return the exit code."""
    if debug:
        print(redact("".join(traceback.format_exception(err))), file=sys.stderr, flush=True)
    if isinstance(err, WorkflowError):
        print(f"error: {redact(str(err))}", file=sys.stderr, flush=True)
        return 2
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    line = " ".join(str(err).split())[:500]
    print(f"error: {type(err).__name__}: {redact(line)}" + ("" if debug else " (rerun with --debug for the traceback)"),
          file=sys.stderr, flush=True)
    return 1
