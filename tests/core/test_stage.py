"""The stage machinery: fingerprints, skip/force, manifests written last, failure leaves nothing complete."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import ingest_only_recipe

from workflow import runner, stages
from workflow.config import load_recipe
from workflow.core import manifest
from workflow.core.errors import WorkflowError
from workflow.core.stage import StageContext, StageResult, execute


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path / "runs"), "model": {"source": "tiny"},
                                 "ingest": {"source": str(tmp_path / "d.jsonl")}}))
    return load_recipe(p)


def counting_stage(calls, *, fail=False, config_value=1):
    """A minimal stage module: writes one file, or fails half-way."""

    def run(ctx):
        calls.append(ctx.stage)
        out = Path(ctx.out_uri)
        out.mkdir(parents=True, exist_ok=True)
        (out / "part.txt").write_text("x")
        if fail:
            raise RuntimeError("boom half-way")
        return StageResult(outputs={"part": str(out / "part.txt")}, summary={"n": len(calls)})

    return types.SimpleNamespace(config=lambda ctx: {"v": config_value}, inputs=lambda ctx: {"src": "h1"}, run=run)


def test_second_run_skips_and_force_reruns(recipe):
    calls = []
    ctx = StageContext(recipe=recipe, stage="fake")
    first = execute(counting_stage(calls), ctx)
    second = execute(counting_stage(calls), ctx)
    assert calls == ["fake"] and first["fingerprint"] == second["fingerprint"]
    execute(counting_stage(calls), StageContext(recipe=recipe, stage="fake", force=True))
    assert len(calls) == 2


def test_changed_config_reruns(recipe):
    calls = []
    ctx = StageContext(recipe=recipe, stage="fake")
    execute(counting_stage(calls, config_value=1), ctx)
    execute(counting_stage(calls, config_value=2), ctx)
    assert len(calls) == 2


def test_failure_leaves_no_manifest_and_rerun_starts_clean(recipe):
    calls = []
    ctx = StageContext(recipe=recipe, stage="fake")
    execute(counting_stage(calls), ctx)
    assert manifest.read(ctx.out_uri) is not None
    with pytest.raises(RuntimeError):
        execute(counting_stage(calls, fail=True, config_value=2), ctx)
    assert manifest.read(ctx.out_uri) is None  # the old manifest no longer vouches for the folder
    execute(counting_stage(calls, config_value=2), ctx)
    m = manifest.read(ctx.out_uri)
    assert m["config"] == {"v": 2} and m["inputs"] == {"src": "h1"} and m["versions"]["workflow"]
    assert m["started_at"] <= m["finished_at"]


def test_upstream_missing_says_which_command_to_run(recipe):
    ctx = StageContext(recipe=recipe, stage="train")
    with pytest.raises(WorkflowError, match=r"the ingest stage has not completed.*run `bin/workflow ingest .*r\.yaml` first"):
        ctx.upstream("ingest")


def test_select_stages_respects_sections_subset_and_from(recipe):
    assert runner.select_stages(recipe) == ["ingest", "model"]  # no train/evaluate/serve sections
    assert runner.select_stages(recipe, stages=["model"]) == ["model"]
    assert runner.select_stages(recipe, from_stage="model") == ["model"]
    with pytest.raises(WorkflowError, match="unknown stage 'trian'"):
        runner.select_stages(recipe, stages=["trian"])


def test_a_stage_module_that_does_not_exist_says_not_built(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "future", stages.StageSpec("workflow.future_stage", "serve", "ingest", ""))
    with pytest.raises(WorkflowError, match=r"the future stage is not built yet"):
        stages.stage_module("future")


def test_manifest_redacts_secrets(recipe, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    ctx = StageContext(recipe=recipe, stage="fake")
    stage = counting_stage([])
    stage.config = lambda ctx: {"token": "hf_supersecretvalue123", "note": "uses hf_supersecretvalue123"}
    execute(stage, ctx)
    text = Path(manifest.manifest_uri(ctx.out_uri)).read_text()
    assert "hf_supersecretvalue123" not in text and json.loads(text)["config"]["token"] == "***"


def test_run_through_the_cli_in_the_stage_environment(tmp_path):
    p = ingest_only_recipe(tmp_path, "cli")
    env = {**os.environ, "WORKFLOW_SERVE_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, "-m", "workflow", "run", str(p), "--stages", "ingest"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "run cli: ingest" in proc.stdout and "[ingest] done" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "workflow", "run", str(p), "--stages", "ingest"], capture_output=True,
                           text=True, env=env)
    assert "up to date" in again.stdout
    shown = subprocess.run([sys.executable, "-m", "workflow", "show", str(p)], capture_output=True, text=True, env=env)
    assert "ingest: done" in shown.stdout and "model: not completed" in shown.stdout


def test_stage_output_is_relayed_with_secrets_masked(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_plantedsecret987")
    code = runner._run_relaying_output(
        [sys.executable, "-c", "import os, sys; print('token=' + os.environ['HF_TOKEN']); "
                               "print('progress 50%', end='\\r'); print('err ' + os.environ['HF_TOKEN'], file=sys.stderr)"],
        dict(os.environ))
    out, err = capsys.readouterr()
    assert code == 0
    assert "hf_plantedsecret987" not in out + err
    assert "token=***" in out and "progress 50%\r" in out and "err ***" in err


def test_stage_environment_drops_a_callers_backend_module(monkeypatch):
    """Jupyter's inline plotting backend is not installed in the stage environments."""
    from workflow.core import envs

    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    assert "MPLBACKEND" not in envs.stage_environment(envs.TRAIN)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    assert envs.stage_environment(envs.TRAIN)["MPLBACKEND"] == "Agg"
