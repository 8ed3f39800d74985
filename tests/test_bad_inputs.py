"""The bad-input corpus (tests/bad_inputs/*/case.yaml): each case fails with one clear line.

Through the real CLI: a non-zero exit, exactly one error line (the last on stderr) that
matches the case's ``expect``, no traceback (``--debug`` adds one), and nothing of the failed stage left in
storage, so a rerun starts clean. A case is a folder with ``case.yaml``:

- ``command``: the CLI command run on the recipe (``validate``, ``ingest``, ``evaluate``, ...);
- ``recipe``: the recipe's sections (name ``bad``, storage ``<tmp>/runs`` and a tiny
  model come by default);
- ``files``: name -> text, written next to the recipe (sub-folders allowed);
- ``fixtures``: pytest fixtures the case needs; ``{name}`` in ``env``, ``recipe`` and
  ``upstream`` strings becomes the fixture's value (a path or a URL);
- ``env``: extra environment variables for the CLI;
- ``stages_before``: stages run through the CLI first (each must succeed);
- ``upstream``: stage -> outputs of upstream stages that are written as completed
  manifests instead of being run (relative paths are next to the recipe);
- ``expect``: a regex the one stderr line must match. A case whose bad input must be
  survived rather than refused sets ``succeeds: true``: then ``expect`` matches stdout and
  ``expect_summary`` (dotted path -> value) is checked in the stage's manifest;
- ``heavy: true``: the case starts an engine, a cluster or training (`make test-fast` leaves it out).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*/case.yaml"))


def _fill(value, values: dict[str, str]):
    """``{fixture}`` placeholders replaced in every string of a YAML value."""
    if isinstance(value, str):
        for name, text in values.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


def prepare(case_file: Path, tmp_path: Path, request) -> tuple[dict, Path, dict]:
    from workflow.core import manifest

    case = yaml.safe_load(case_file.read_text())
    values = {name: str(request.getfixturevalue(name)) for name in case.get("fixtures") or []}
    for name, text in (case.get("files") or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    recipe = {"name": "bad", "storage": str(tmp_path / "runs"), "model": {"source": "tiny"}}
    recipe.update(_fill(case["recipe"], values))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for stage, outputs in (case.get("upstream") or {}).items():
        outputs = {k: str(tmp_path / v) for k, v in _fill(outputs, values).items()}
        manifest.write(str(tmp_path / "runs" / "bad" / stage), stage=stage, run="bad", config={}, inputs={},
                       outputs=outputs, started_at=manifest.now())
    env = {**os.environ, **{k: str(v) for k, v in _fill(case.get("env") or {}, values).items()}}
    return case, path, env


def cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _at(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part]
    return obj


@pytest.mark.parametrize("case_file", [pytest.param(c, marks=pytest.mark.heavy) if yaml.safe_load(c.read_text()).get("heavy")
                                       else c for c in CASES], ids=[c.parent.name for c in CASES])
def test_bad_input_gives_one_clear_line(case_file, tmp_path, request):
    case, recipe, env = prepare(case_file, tmp_path, request)
    for stage in case.get("stages_before", []):
        before = cli(stage, str(recipe), env=env)
        assert before.returncode == 0, before.stderr
    proc = cli(case["command"], str(recipe), env=env)
    stage_dir = tmp_path / "runs" / "bad" / case["command"]
    if case.get("succeeds"):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert re.search(case["expect"], proc.stdout), proc.stdout[-3000:]
        summary = json.loads((stage_dir / "manifest.json").read_text())["summary"]
        for dotted, value in case["expect_summary"].items():
            assert _at(summary, dotted) == value, (dotted, summary)
        return
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    # One error line, the last one (a library may warn before it, e.g. vLLM about Triton on import).
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], proc.stderr
    assert re.search(case["expect"], lines[-1]), lines[-1]
    # Nothing half-written: the failed stage left no file at all, so a rerun starts clean.
    assert [p for p in stage_dir.rglob("*") if p.is_file()] == []


def test_debug_adds_the_traceback(tmp_path, request):
    case, recipe, env = prepare(Path(__file__).parent / "bad_inputs" / "missing_column" / "case.yaml", tmp_path,
                                request)
    proc = cli("--debug", "ingest", str(recipe), env=env)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "missing column 'mr'" in proc.stderr


def test_corpus_covers_the_listed_failures():
    names = {c.parent.name for c in CASES}
    assert {"malformed_json_line", "missing_column", "empty_file", "non_string_values", "unknown_recipe_key",
            "wrong_type_in_recipe", "nonexistent_model_path", "unreachable_storage", "wrong_credentials",
            "unknown_llamafactory_key", "adapter_rank_above_engine_max", "prompt_longer_than_max_model_len"} <= names
