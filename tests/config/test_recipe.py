"""Recipe schema: every shipped recipe validates, library sections included; bad recipes fail with the file
and field path."""

import copy
from pathlib import Path

import pytest
import yaml

from workflow.config import load_recipe
from workflow.core.errors import WorkflowError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


# The sections a recipe hands to a library verbatim, as key paths into its YAML: `workflow validate`
# checks each against its library (LLaMA-Factory, ray.data.llm, vLLM, Ray Serve LLM).
LIBRARY_SECTIONS = ("model.pretrain", "train.llamafactory", "evaluate.processor", "evaluate.processor.engine_kwargs",
                    "evaluate.sampling_params", "serve.llm_config", "serve.llm_config.engine_kwargs")
UNKNOWN = "not_a_key_of_the_library"


def _section(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _validate(capsys, *paths: Path) -> tuple[int, str, str]:
    """``workflow validate PATHS`` in this process (the serve environment holds vLLM and Ray Serve)."""
    from workflow import cli

    code = cli.main(["validate", *map(str, paths)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path, tmp_path, monkeypatch, capsys):
    """The recipe passes `workflow validate`, and a key its library does not know, put into any one of its
    library sections, is refused in a line naming that section: each section was checked, not skipped."""
    monkeypatch.setenv("WORKFLOW_STORAGE", "s3://validate-only/workflow")  # the GPU recipes require it
    code, out, err = _validate(capsys, path)
    assert code == 0 and out.startswith(f"ok  {path}  ("), err[-3000:]

    data = yaml.safe_load(path.read_text())
    data["ingest"]["source"] = str((path.parent / data["ingest"]["source"]).resolve())
    sections = [s for s in LIBRARY_SECTIONS if isinstance(_section(data, s), dict)]
    assert {"train.llamafactory", "evaluate.processor", "serve.llm_config"} <= set(sections)
    variants = []
    for dotted in sections:
        variant = copy.deepcopy(data)
        _section(variant, dotted)[UNKNOWN] = 1
        variants.append(write(tmp_path, variant, f"{dotted}.yaml"))
    code, out, err = _validate(capsys, *variants)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and not out and len(errors) == len(sections), err[-3000:]
    for dotted, variant, line in zip(sections, variants, errors):
        assert line.startswith(f"error: {variant}") and dotted in line and UNKNOWN in line, (dotted, line)


@pytest.mark.parametrize("name", ["viggo-qwen2.5-7b.yaml", "viggo-qwen2.5-7b-fast.yaml"])
def test_gpu_recipes_require_their_bucket(name, monkeypatch):
    monkeypatch.delenv("WORKFLOW_STORAGE", raising=False)
    with pytest.raises(WorkflowError, match=r"viggo-qwen2\.5-7b.*\$\{WORKFLOW_STORAGE\} is not set"):
        load_recipe(Path(__file__).resolve().parents[2] / "recipes" / name)


def _cpu_bundles(placement_group_config: dict) -> bool:
    return all(set(bundle) == {"CPU"} for bundle in placement_group_config["bundles"])


def test_shipped_recipes_include_the_cpu_demo_and_both_gpu_recipes(monkeypatch):
    monkeypatch.setenv("WORKFLOW_STORAGE", "s3://validate-only/workflow")
    recipes = {p.name: load_recipe(p) for p in RECIPES}
    # The CPU demo: a model built from the data, and every stage on CPUs alone.
    cpu = recipes["viggo-cpu.yaml"]
    assert cpu.model.source == "tiny" and cpu.model.pretrain["use_cpu"] and cpu.train.llamafactory["use_cpu"]
    assert not cpu.train.scaling_config.use_gpu and set(cpu.train.scaling_config.resources_per_worker) == {"CPU"}
    assert "accelerator_type" not in cpu.evaluate.processor and _cpu_bundles(cpu.evaluate.processor["placement_group_config"])
    assert cpu.serve.llm_config["accelerator_config"] == {"kind": "cpu"}
    assert _cpu_bundles(cpu.serve.llm_config["placement_group_config"])
    # The reference model on GPUs: training workers, evaluation engines and served replicas each ask for one.
    for name in ("viggo-qwen2.5-7b.yaml", "viggo-qwen2.5-7b-fast.yaml"):
        gpu = recipes[name]
        assert gpu.model.source == "Qwen/Qwen2.5-7B-Instruct" and not gpu.train.llamafactory.get("use_cpu"), name
        assert gpu.train.scaling_config.use_gpu and gpu.train.scaling_config.resources_per_worker["GPU"] >= 1, name
        assert gpu.evaluate.processor["accelerator_type"] and gpu.serve.llm_config["accelerator_type"], name


def write(tmp_path, data, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {"name": "t", "model": {"source": "tiny"}, "ingest": {"source": "data.jsonl"}}


def test_unknown_key_names_file_and_field_path(tmp_path):
    p = write(tmp_path, {**BASE, "ingest": {"source": "d.jsonl", "fromat": "alpaca"}})
    with pytest.raises(WorkflowError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "ingest.fromat: unknown key" in msg and "\n" not in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(WorkflowError, match=r"deploy: unknown key"):
        load_recipe(write(tmp_path, {**BASE, "deploy": {}}))


def test_wrong_type_says_what_was_expected(tmp_path):
    p = write(tmp_path, {**BASE, "ingest": {"source": "d.jsonl", "shuffle": "sometimes"}})
    with pytest.raises(WorkflowError, match=r"ingest\.shuffle: Input should be a valid boolean.*'sometimes'"):
        load_recipe(p)


def test_missing_required_section(tmp_path):
    with pytest.raises(WorkflowError, match=r"ingest: required field is missing"):
        load_recipe(write(tmp_path, {"name": "t", "model": {"source": "tiny"}}))


def test_tiny_head_dim_below_64_is_refused(tmp_path):
    p = write(tmp_path, {**BASE, "model": {"source": "tiny", "tiny": {"head_dim": 16}}})
    with pytest.raises(WorkflowError, match=r"model\.tiny\.head_dim: must be >= 64"):
        load_recipe(p)


def test_invalid_yaml_reports_line(tmp_path):
    with pytest.raises(WorkflowError, match=r"not valid YAML at line 2, column 8"):
        load_recipe(write(tmp_path, "name: t\nmodel: : x\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(WorkflowError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "models" / "m").mkdir(parents=True)
    p = write(tmp_path / "sub", {**BASE, "storage": "../runs", "model": {"source": "../models/m"},
                                 "ingest": {"source": "../data/x.jsonl"}})
    r = load_recipe(p)
    assert r.storage == str(tmp_path / "runs")
    assert r.ingest.source == str(tmp_path / "data" / "x.jsonl")
    assert r.model.source == str(tmp_path / "models" / "m")
    assert r.run_uri == str(tmp_path / "runs" / "t")


def test_hub_ids_and_remote_uris_are_left_alone(tmp_path):
    r = load_recipe(write(tmp_path, {**BASE, "storage": "s3://b/p", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"},
                                     "ingest": {"source": "https://example.com/d/"}}))
    assert (r.storage, r.model.source, r.ingest.source) == ("s3://b/p", "Qwen/Qwen2.5-7B-Instruct", "https://example.com/d/")
    assert r.run_uri == "s3://b/p/t"


def test_environment_variables_are_substituted(tmp_path, monkeypatch):
    monkeypatch.setenv("BUCKET", "s3://mine")
    r = load_recipe(write(tmp_path, "name: t\nstorage: ${BUCKET}/x\nmodel: {source: tiny}\ningest: {source: ${SRC:-s3://d/f.jsonl}}\n"))
    assert r.storage == "s3://mine/x" and r.ingest.source == "s3://d/f.jsonl"


def test_unset_variable_without_default_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    with pytest.raises(WorkflowError, match=r"\$\{NOPE_NOT_SET\} is not set"):
        load_recipe(write(tmp_path, "name: t\nstorage: ${NOPE_NOT_SET}\nmodel: {source: tiny}\ningest: {source: x}\n"))


def test_run_name_must_be_a_path_segment(tmp_path):
    with pytest.raises(WorkflowError, match=r"name: must be letters"):
        load_recipe(write(tmp_path, {**BASE, "name": "a/b:c"}))


def test_a_task_is_named_from_the_projects_tasks_or_a_file_beside_the_recipe(tmp_path):
    from workflow.config.task import CallSyntax

    recipe = load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": "viggo"}}))
    assert recipe.evaluate.task.kind == "call" and recipe.evaluate.task.call_syntax == CallSyntax()
    (tmp_path / "mine.yaml").write_text("kind: call\nsyntax: {assign: '=', separator: ';'}\nmain_metric: slot_f1\n")
    recipe = load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": "mine.yaml"}}))
    assert recipe.evaluate.task.call_syntax.assign == "=" and recipe.evaluate.task.main() == "slot_f1"
    inline = load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": {"kind": "label", "labels": ["a", "b"]}}}))
    assert inline.evaluate.task.labels == ["a", "b"] and inline.evaluate.task.main() == "accuracy"


def test_task_mistakes_name_the_file_and_the_field(tmp_path):
    with pytest.raises(WorkflowError, match=r"evaluate.task: no task file .*nope.yaml.*'viggo'"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": "nope"}}))
    (tmp_path / "bad.yaml").write_text("kind: label\nmetrics: [slot_f1]\n")
    with pytest.raises(WorkflowError, match=r"bad\.yaml: metrics: \['slot_f1'\] are not metrics of kind 'label'"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": "bad.yaml"}}))
    with pytest.raises(WorkflowError, match=r"evaluate.task.main_metric: 'bleu' is not one of the task's metrics"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": {"kind": "text", "main_metric": "bleu"}}}))
    with pytest.raises(WorkflowError, match=r"evaluate.task.metrics: 'nowhere:f': cannot import nowhere"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": {"kind": "text", "metrics": ["nowhere:f"]}}}))


def test_seeds_need_sampling_and_text_has_no_constraint(tmp_path):
    with pytest.raises(WorkflowError, match=r"seeds: greedy decoding"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"seeds": [0, 1]}}))
    ok = load_recipe(write(tmp_path, {**BASE, "evaluate": {"seeds": [0, 1], "sampling_params": {"temperature": 0.3}}}))
    assert ok.evaluate.seeds == [0, 1]
    with pytest.raises(WorkflowError, match=r"constrained_decoding: a text task has no decoding constraint"):
        load_recipe(write(tmp_path, {**BASE, "evaluate": {"task": {"kind": "text"}, "constrained_decoding": {}}}))
