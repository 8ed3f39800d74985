"""Model stage: a Hugging Face id pinned to the commit its revision resolves to.

No hub here: the tests build a Hugging Face cache by hand (``refs/<revision>`` naming a
commit, ``snapshots/<commit>/`` holding the files) and run offline (``HF_HUB_OFFLINE=1``),
which is how the stage resolves a revision when the hub cannot be reached. The resolution from
the hub itself (``HfApi.model_info``) is the same call with the network on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import VIGGO

from workflow.config import parse_recipe
from workflow.core import envs, manifest
from workflow.core.errors import WorkflowError
from workflow.serving import app
from workflow.training.llamafactory_args import llamafactory_args

HUB_ID = "acme/tiny-viggo"
COMMITS = ("1" * 40, "2" * 40)


def add_commit(hf_home: Path, model: Path, commit: str, ref: str = "main") -> None:
    """``model``'s files as ``commit`` of HUB_ID in a Hugging Face cache, plus files a model does not need."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model, snapshot)
    (snapshot / "README.md").write_text("model card\n")
    (snapshot / "pytorch_model.bin").write_bytes(b"old-format weights")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def run_model_stage(recipe: Path, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**envs.stage_environment(envs.SERVE), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "workflow", "model", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def write_recipe(path: Path, storage: Path, **model) -> Path:
    path.write_text(yaml.safe_dump({"name": "hub-pin", "storage": str(storage), "model": {"source": HUB_ID, **model},
                                    "ingest": {"source": str(VIGGO)}}))
    return path


def test_a_hub_model_is_pinned_to_its_commit_and_mirrored_without_files_it_does_not_need(tiny_model, tmp_path):
    hf_home, storage = tmp_path / "hf", tmp_path / "runs"
    add_commit(hf_home, tiny_model, COMMITS[0])
    recipe = write_recipe(tmp_path / "hub.yaml", storage, mirror=True)
    proc = run_model_stage(recipe, hf_home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    first = manifest.read(str(storage / "hub-pin" / "model"))
    assert first["inputs"]["revision"] == COMMITS[0] and first["summary"]["revision"] == COMMITS[0]
    weights = Path(first["outputs"]["model"])
    mirrored = sorted(p.name for p in weights.iterdir())
    assert "config.json" in mirrored and "model.safetensors" in mirrored and "tokenizer.json" in mirrored
    assert "README.md" not in mirrored and "pytorch_model.bin" not in mirrored
    assert json.loads((weights / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())

    # Unchanged upstream: the stage is up to date. main moves to a new commit: the stage reruns.
    again = run_model_stage(recipe, hf_home)
    assert again.returncode == 0 and manifest.read(str(storage / "hub-pin" / "model"))["fingerprint"] == \
        first["fingerprint"]
    add_commit(hf_home, tiny_model, COMMITS[1])
    moved = run_model_stage(recipe, hf_home)
    assert moved.returncode == 0, (moved.stdout + moved.stderr)[-3000:]
    second = manifest.read(str(storage / "hub-pin" / "model"))
    assert second["summary"]["revision"] == COMMITS[1] and second["fingerprint"] != first["fingerprint"]

    # A commit in the recipe is used as it is; a revision neither the hub nor the cache knows is one line.
    pinned = write_recipe(tmp_path / "pinned.yaml", storage, revision=COMMITS[0])
    assert run_model_stage(pinned, hf_home).returncode == 0
    assert manifest.read(str(storage / "hub-pin" / "model"))["summary"]["revision"] == COMMITS[0]
    unknown = run_model_stage(write_recipe(tmp_path / "unknown.yaml", storage, revision="v9"), hf_home)
    errors = [line for line in unknown.stderr.splitlines() if line.startswith("error:")]
    assert unknown.returncode == 2 and len(errors) == 1, unknown.stderr[-2000:]
    assert f"model.source: cannot resolve '{HUB_ID}' at revision v9" in errors[0]


def test_every_library_gets_the_pinned_commit():
    args = llamafactory_args({"stage": "sft"}, model=HUB_ID, dataset_dir="d", output_dir="o", model_revision=COMMITS[0])
    assert args["model_name_or_path"] == HUB_ID and args["model_revision"] == COMMITS[0]
    recipe = parse_recipe({"name": "r", "model": {"source": HUB_ID}, "ingest": {"source": "/d.jsonl"},
                           "serve": {}}, base_dir=Path("."), where="r.yaml")
    llm = app.build_llm_config(recipe.serve, model_source=HUB_ID, default_model_id="r", adapters_uri=None,
                               lora_rank=None, revision=COMMITS[0])
    assert llm["engine_kwargs"] == {"revision": COMMITS[0], "tokenizer_revision": COMMITS[0]}


def test_revision_is_for_hub_ids_and_the_pipeline_fills_in_llamafactory_model_revision():
    with pytest.raises(WorkflowError, match=r"model: revision: only for a Hugging Face id"):
        parse_recipe({"name": "r", "model": {"source": "tiny", "revision": "main"}, "ingest": {"source": "/d.jsonl"}},
                     base_dir=Path("."), where="r.yaml")
    with pytest.raises(WorkflowError, match=r"model_revision: filled in by the pipeline"):
        parse_recipe({"name": "r", "model": {"source": HUB_ID}, "ingest": {"source": "/d.jsonl"},
                      "train": {"llamafactory": {"stage": "sft", "model_revision": "main"}}},
                     base_dir=Path("."), where="r.yaml")


def test_the_prompt_format_guard_reads_the_tokenizer_of_the_pinned_commit(tiny_model, tmp_path, monkeypatch):
    """Main moved on to a commit whose chat template differs: adapters trained on the pinned commit still pass."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    from workflow.prompts import guard

    hf_home = tmp_path / "hf"
    add_commit(hf_home, tiny_model, COMMITS[0], ref="v1")
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                               "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    (changed / "chat_template.jinja").unlink(missing_ok=True)
    add_commit(hf_home, changed, COMMITS[1])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    messages = [{"role": "user", "content": "Diablo II is a great game."}]
    trained = AutoTokenizer.from_pretrained(tiny_model)
    record = {"template": "qwen", "messages": messages,
              "prompt_ids": guard.chat_template_prompt_ids(trained, messages)}
    adapters = tmp_path / "adapters"
    (adapters / "a").mkdir(parents=True)
    (adapters / "a" / guard.FILE).write_text(json.dumps(record))

    guard.check_stored_adapters(str(adapters), ["a"], HUB_ID, tmp_path / "cache", where="serve", revision=COMMITS[0])
    with pytest.raises(WorkflowError, match=r"serve: adapter a: the prompt differs .* at token 0"):
        guard.check_stored_adapters(str(adapters), ["a"], HUB_ID, tmp_path / "cache", where="serve")
