"""The bad-input corpus (tests/bad_inputs/*/case.yaml): each case fails with one clear line.

Each case names a command, the files it needs, a recipe fragment and the error it must
print. Through the real CLI: a non-zero exit, exactly one stderr line matching the
expectation, no traceback (``--debug`` adds one), and no manifest that would make the
failed stage look complete.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*/case.yaml"))


def prepare(case_file: Path, tmp_path: Path) -> tuple[dict, Path, dict]:
    case = yaml.safe_load(case_file.read_text())
    for name, text in (case.get("files") or {}).items():
        (tmp_path / name).write_text(text)
    recipe = {"name": "bad", "storage": str(tmp_path / "runs"), "model": {"source": "tiny"}}
    recipe.update(case["recipe"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, **{k: str(v) for k, v in (case.get("env") or {}).items()}}
    return case, path, env


def cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("case_file", CASES, ids=[c.parent.name for c in CASES])
def test_bad_input_gives_one_clear_line(case_file, tmp_path):
    case, recipe, env = prepare(case_file, tmp_path)
    for stage in case.get("stages_before", []):
        before = cli(stage, str(recipe), env=env)
        assert before.returncode == 0, before.stderr
    proc = cli(case["command"], str(recipe), env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and re.search(case["expect"], lines[0]), lines[0]
    if case["command"] != "validate":
        assert not (tmp_path / "runs" / "bad" / case["command"] / "manifest.json").exists()


def test_debug_adds_the_traceback(tmp_path):
    case, recipe, env = prepare(Path(__file__).parent / "bad_inputs" / "missing_column" / "case.yaml", tmp_path)
    proc = cli("--debug", "ingest", str(recipe), env=env)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "missing column 'mr'" in proc.stderr


def test_corpus_covers_the_listed_failures():
    names = {c.parent.name for c in CASES}
    assert {"malformed_json_line", "missing_column", "empty_file", "non_string_values", "unknown_recipe_key",
            "wrong_type_in_recipe", "nonexistent_model_path", "unreachable_storage"} <= names
