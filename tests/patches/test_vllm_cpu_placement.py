"""The engine-core placement plugin: which CPUs it picks, and a real vLLM engine placed by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from workflow.patches.vllm_cpu_placement import MP_METHOD, MP_METHOD_IN_ACTOR, engine_core_cpus, forks_worker


@pytest.mark.parametrize(("worker_cpus", "setting", "expected"), [
    ([[0]], "auto", {0}),             # a one-core worker (2-3 core machines): share its core
    ([[0, 1, 2]], "auto", None),      # a larger worker: vLLM's placement
    ([[0, 1, 2]], "1", {0, 1, 2}),    # forced
    ([[0]], "0", None),               # turned off
    ([], "1", None),                  # VLLM_CPU_OMP_THREADS_BIND=nobind: nothing to share
    ([[0], [1]], "1", {0, 1}),        # two workers (tensor parallel): all their cores
])
def test_engine_core_cpus(worker_cpus, setting, expected):
    assert engine_core_cpus(worker_cpus, setting) == expected


@pytest.mark.parametrize(("environ", "expected"), [
    ({MP_METHOD: "spawn", MP_METHOD_IN_ACTOR: "fork"}, True),    # spawn forced by vLLM in the Ray actor
    ({MP_METHOD: "spawn", MP_METHOD_IN_ACTOR: "spawn"}, False),  # spawn asked for: kept
    ({MP_METHOD: "spawn"}, False),                               # not started by a Ray actor with the plugin
    ({MP_METHOD: "fork", MP_METHOD_IN_ACTOR: "fork"}, False),    # already fork
    ({}, False),
])
def test_an_engine_core_started_by_a_ray_actor_forks_its_worker_unless_spawn_was_asked_for(environ, expected):
    assert forks_worker(environ) is expected


def test_a_vllm_engine_core_runs_on_its_workers_cpus(tiny_model, tmp_path):
    """vLLM starts its engine core and worker processes; the plugin, loaded by vLLM from the
    package's entry point, puts the engine core's main thread on the worker's CPUs (forced,
    so that the check holds on machines of any size)."""
    script = tmp_path / "placement.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import os
        from pathlib import Path
        from vllm import LLM, SamplingParams

        def affinity(title):
            for proc in Path("/proc").iterdir():
                try:
                    if (proc / "cmdline").read_bytes().split(b"\\0")[0].decode().startswith(title):
                        return sorted(os.sched_getaffinity(int(proc.name)))
                except (OSError, ValueError):
                    continue

        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model)!r}, dtype="float32", max_model_len=512, enforce_eager=True)
            out = llm.generate("Diablo II is", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            print("TOKENS", len(out[0].outputs[0].token_ids))
            print("PLACEMENT", json.dumps({{"engine": affinity("VLLM::EngineCore"), "all": sorted(os.sched_getaffinity(0))}}))
    """))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 4" in proc.stdout
    placement = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PLACEMENT"))[10:])
    # vLLM's own log names the cores it bound the worker's OpenMP threads to.
    bound = next(line for line in (proc.stdout + proc.stderr).splitlines() if "local_rank=0, core ids=" in line)
    worker_cores = json.loads(bound.split("core ids=")[1].strip())
    assert placement["engine"] == sorted(worker_cores), (placement, worker_cores)
    assert placement["engine"] != placement["all"]  # it was moved: vLLM leaves it on every CPU
