"""``workflow validate``: the shipped recipes, GPU ones included, checked in full on the CPU.

Besides the recipe schema and the LLaMA-Factory keys (train env), validate checks the library
sections against the libraries of the serve env: ``evaluate`` against ray.data.llm's
``vLLMEngineProcessorConfig``, vLLM's engine arguments and ``SamplingParams``, ``serve`` as the
serve stage builds its ``LLMConfig``. Each bad recipe below is a shipped one with one key changed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_workflow

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def storage_variable():
    """The GPU recipes require WORKFLOW_STORAGE (as `make validate` sets it); validation reaches no storage."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKFLOW_STORAGE", "s3://validate-only/workflow")
        yield


def _variant(shipped: str, out: Path, edit) -> Path:
    """A shipped recipe written to ``out`` with ``edit(data)`` applied; its local paths still resolve."""
    data = yaml.safe_load((REPO / "recipes" / shipped).read_text())
    if not str(data["ingest"]["source"]).startswith(("http://", "https://", "s3://", "gs://")):
        data["ingest"]["source"] = str((REPO / "recipes" / data["ingest"]["source"]).resolve())
        data["storage"] = str(out.parent / "runs")
    edit(data)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# name -> (shipped recipe, the change, what its one error line must say)
BAD = {
    "evaluate-engine-kwarg": (
        "viggo-qwen2.5-7b.yaml",
        lambda d: _rename(d["evaluate"]["processor"]["engine_kwargs"], "enable_prefix_caching", "enable_prefix_cachng"),
        "evaluate.processor.engine_kwargs: unknown vLLM engine argument(s) ['enable_prefix_cachng'] "
        "(did you mean 'enable_prefix_caching'?"),
    "serve-llm-config-field": (
        "viggo-qwen2.5-7b-fast.yaml",
        lambda d: _rename(d["serve"]["llm_config"], "accelerator_type", "accelerator_typ"),
        "serve.llm_config: accelerator_typ: unknown key"),
    "serve-engine-kwarg": (
        "viggo-cpu.yaml",
        lambda d: _rename(d["serve"]["llm_config"]["engine_kwargs"], "max_model_len", "max_model_length"),
        "serve.llm_config.engine_kwargs: unknown vLLM engine argument(s) ['max_model_length'] "
        "(did you mean 'max_model_len'?"),
    "sampling-params": (
        "viggo-qwen2.5-7b.yaml",
        lambda d: _rename(d["evaluate"]["sampling_params"], "max_tokens", "max_new_tokens"),
        "evaluate.sampling_params: "),
}


def test_shipped_recipes_validate():
    proc = run_workflow("validate", *map(str, RECIPES), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")] == list(map(str, RECIPES))
    assert "error" not in proc.stderr.lower() and "warning" not in proc.stderr.lower(), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> dict:
    """One ``workflow validate`` over every bad variant and one good one (vLLM imports once)."""
    tmp = tmp_path_factory.mktemp("validate")
    paths = {name: _variant(shipped, tmp / f"{name}.yaml", edit) for name, (shipped, edit, _) in BAD.items()}
    # Ray Serve LLM passes vLLM's OpenAI front-end arguments in engine_kwargs too.
    good = _variant("viggo-cpu.yaml", tmp / "frontend-arg.yaml",
                    lambda d: d["serve"]["llm_config"]["engine_kwargs"].update(max_log_len=100))
    proc = run_workflow("validate", *map(str, paths.values()), str(good), timeout=600)
    return {"proc": proc, "paths": paths, "good": good}


def test_each_bad_recipe_gets_one_error_line_and_exit_code_2(validated):
    proc = validated["proc"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == len(BAD), proc.stderr[-3000:]
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [["ok", str(validated["good"])]]


@pytest.mark.parametrize("name", BAD)
def test_bad_library_key_is_named_with_the_recipe_file(validated, name):
    path, expected = validated["paths"][name], BAD[name][2]
    lines = [line for line in validated["proc"].stderr.splitlines() if line.startswith(f"error: {path.resolve()}: ")]
    assert len(lines) == 1, validated["proc"].stderr[-3000:]
    assert expected in lines[0]
    if name == "sampling-params":
        assert "max_new_tokens" in lines[0]


# LLaMA-Factory settings that import an optional package when a run starts, and what they import.
def _modules_needed(args: dict) -> set[str]:
    needed = set()
    if args.get("enable_liger_kernel"):
        needed.add("liger_kernel.transformers")
    if args.get("use_unsloth"):
        needed.add("unsloth")
    if args.get("flash_attn") == "fa2":
        needed.add("flash_attn")
    if args.get("quantization_bit") is not None and args.get("quantization_method", "bnb") == "bnb":
        needed.add("bitsandbytes")
    if args.get("deepspeed"):
        needed.add("deepspeed")
    report_to = args.get("report_to") or []
    for tracker in [report_to] if isinstance(report_to, str) else report_to:
        if tracker in ("tensorboard", "wandb", "mlflow", "swanlab"):
            needed.add(tracker)
    return needed


def test_liger_setting_needs_liger_kernel():
    assert _modules_needed({"enable_liger_kernel": True, "report_to": "none"}) == {"liger_kernel.transformers"}
    assert _modules_needed({"enable_liger_kernel": False, "report_to": ["tensorboard"]}) == {"tensorboard"}


@pytest.mark.train_env
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_packages_the_recipes_llamafactory_settings_need_are_installed(path):
    from workflow.config import load_recipe
    from workflow.training.llamafactory_args import llamafactory_args

    recipe = load_recipe(path)
    sections = [recipe.model.pretrain] + ([recipe.train.llamafactory] if recipe.train else [])
    needed = set()
    for keys in filter(None, sections):
        needed |= _modules_needed(llamafactory_args(keys, model="m", dataset_dir="d", output_dir="o"))
    if path.name == "viggo-qwen2.5-7b-fast.yaml":
        assert "liger_kernel.transformers" in needed
    for module in sorted(needed):
        importlib.import_module(module)
    if "liger_kernel.transformers" in needed:  # what LLaMA-Factory imports for a Qwen2 model
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2  # noqa: F401


def test_the_readmes_cluster_example_passes_the_checks_a_run_makes_before_its_first_stage(monkeypatch):
    """README, "On a Ray cluster": `export ... WORKFLOW_API_KEY=...` then `workflow run recipes/viggo-qwen2.5-7b.yaml
    --address auto`. On a cluster the endpoint listens on every node, so the recipe names its key; the CPU demo,
    which leaves it out, is refused there before any stage (its own machine's loopback needs none)."""
    from workflow.config import load_recipe
    from workflow.core.errors import WorkflowError
    from workflow.preflight import check_recipe, check_serve_environment

    recipe = load_recipe(REPO / "recipes" / "viggo-qwen2.5-7b.yaml")
    check_recipe(recipe, on_cluster=True)
    monkeypatch.setenv("WORKFLOW_API_KEY", "a-key-for-the-test")
    check_serve_environment(recipe, address="auto")
    monkeypatch.delenv("WORKFLOW_API_KEY")
    with pytest.raises(WorkflowError, match=r"serve\.api_key_env: \$WORKFLOW_API_KEY is not set"):
        check_serve_environment(recipe, address="auto")
    demo = load_recipe(REPO / "recipes" / "viggo-cpu.yaml")
    check_recipe(demo, on_cluster=False)
    with pytest.raises(WorkflowError, match=r"viggo-cpu\.yaml: serve\.host: 0\.0\.0\.0 is reachable from other hosts"):
        check_recipe(demo, on_cluster=True)
