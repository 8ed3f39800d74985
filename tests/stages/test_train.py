"""The train stage through the runner: the adapter contract, vLLM serving it, resume after a kill, fail-fast keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import RUN_MARKER, checkpoint_so_far, run_workflow, wait_until_marked_gone

from workflow.core import envs

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "training_loss.png"}


def test_train_stage_publishes_the_adapter_contract(trained_run):
    found = trained_run["manifest"]
    run_dir = Path(found["outputs"]["adapters_dir"]).parent.parent
    assert found["outputs"]["adapter"] == str(run_dir / "train" / "adapters" / "trained")
    assert found["outputs"]["adapters_dir"] == str(run_dir / "train" / "adapters")
    assert ADAPTER_FILES <= {p.name for p in trained_run["adapter"].iterdir()}
    summary = found["summary"]
    assert summary["adapter_name"] == "trained" and summary["lora_rank"] == 8
    assert summary["base_model"] == str(run_dir / "model" / "weights")
    assert summary["global_step"] == 6 and summary["resumed_from_step"] == 0
    assert summary["workers"] == 2 and summary["final_loss"] > 0
    config = json.loads((trained_run["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == 8 and {"q_proj", "down_proj"} <= set(config["target_modules"])
    # Ray Train kept the last two checkpoints (steps 3 and 6) in the run's storage, and TensorBoard has the loss.
    checkpoints = next((run_dir / "train" / "checkpoints").iterdir())
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000006"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {
        p.name for p in (checkpoints / "checkpoint-000006").iterdir()}
    assert list((run_dir / "train" / "tensorboard").rglob("events.out.tfevents.*"))
    assert "[training] step 6/6 loss" in trained_run["log"]


def test_rerun_with_same_recipe_is_skipped(trained_run):
    proc = run_workflow("train", str(trained_run["recipe"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up to date" in proc.stdout


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

if __name__ == "__main__":
    base, adapter, rows = sys.argv[1], sys.argv[2], [json.loads(l) for l in open(sys.argv[3])][:4]
    llm = LLM(model=base, dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True,
              max_lora_rank=8, max_loras=1)
    chats = [[{"role": "user", "content": r["instruction"] + "\\n" + r["input"]}] for r in rows]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = [o.outputs[0].text for o in llm.chat(chats, params)]
    tuned = [o.outputs[0].text for o in llm.chat(chats, params, lora_request=LoRARequest("viggo", 1, adapter))]
    print("RESULT " + json.dumps({"plain": plain, "tuned": tuned}))
"""


def test_vllm_serves_the_trained_adapter_and_it_changes_answers(trained_run, tmp_path):
    found = trained_run["manifest"]
    rows = Path(found["outputs"]["adapters_dir"]).parent.parent / "ingest" / "test.jsonl"
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), found["summary"]["base_model"], str(trained_run["adapter"]),
                           str(rows)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert len(result["tuned"]) == 4 and result["plain"] != result["tuned"]


@pytest.mark.train_env
def test_killed_run_resumes_from_its_latest_checkpoint(train_recipe):
    from workflow.config import load_recipe
    from workflow.core import manifest
    from workflow.training.ray_train import latest_checkpoint_step

    path = train_recipe("resume", llamafactory={"max_steps": 12, "save_steps": 2, "per_device_train_batch_size": 8})
    proc = run_workflow("run", str(path), "--stages", "ingest,model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe = load_recipe(path)
    checkpoints = recipe.run_uri + "/train/checkpoints"
    marker = uuid.uuid4().hex
    env = {**envs.stage_environment(envs.TRAIN), RUN_MARKER: marker}
    first = subprocess.Popen([envs.python_for(envs.TRAIN), "-m", "workflow.stages", "train", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        experiment = None
        while time.monotonic() < deadline and first.poll() is None:
            found, step = checkpoint_so_far(Path(checkpoints), "resume")
            if step >= 2:
                experiment = found
                break
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the stage, its Ray cluster and the workers: a lost machine
        first.wait()
    # Ray's processes die a moment after the stage; what they write until then counts.
    wait_until_marked_gone(marker)
    assert experiment is not None, "no checkpoint appeared before the first run ended"
    killed_at = latest_checkpoint_step(checkpoints, experiment)
    assert 2 <= killed_at < 12
    assert manifest.read(recipe.run_uri + "/train") is None  # the killed run never looked complete

    proc = run_workflow("train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = manifest.read(recipe.run_uri + "/train")["summary"]
    assert summary["resumed_from_step"] == killed_at
    assert summary["global_step"] == 12
    assert f"resuming from step {killed_at}" in proc.stdout


def test_unknown_llamafactory_key_fails_fast_naming_it(train_recipe):
    path = train_recipe("badkey", llamafactory={"lora_rnak": 8})
    started = time.monotonic()
    proc = run_workflow("validate", str(path))
    assert proc.returncode == 2
    assert "train.llamafactory.lora_rnak: not a LLaMA-Factory argument (did you mean 'lora_rank'?)" in proc.stderr
    proc = run_workflow("train", str(path))  # the stage checks before it reads upstream stages or starts Ray
    assert proc.returncode != 0
    assert "lora_rnak" in proc.stderr and "Ray" not in proc.stdout
    assert time.monotonic() - started < 240
