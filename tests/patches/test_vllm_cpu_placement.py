"""The engine-core placement plugin, on real vLLM engines started by Ray actors (as the evaluate stage's
and the served app's are): how the engine core started its model worker, and which CPUs it runs on.

One script starts a local Ray cluster and, one after the other, two actors that each build a
``vllm.LLM`` on the tiny model and generate: one with vLLM's defaults and the placement forced on
(``WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES=1``, so that it holds on machines of any size), one with
``VLLM_WORKER_MULTIPROC_METHOD=spawn`` asked for and the placement turned off. Each actor then reads
its processes from ``/proc``: the engine core (``VLLM::EngineCore``, its child), the model worker
(the engine core's child), their environment blocks and CPU affinities.

How the worker was started shows in its environment block (``/proc/PID/environ``), which the kernel
fills at ``exec``: a forked worker has its parent's block byte for byte; a spawned one was exec'd with
the engine core's environment of that moment, which holds the OpenMP binding vLLM sets just before
it starts the worker (``GOMP_CPU_AFFINITY``, ``KMP_AFFINITY`` or ``OMP_PLACES``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.heavy

SCRIPT = textwrap.dedent('''
    import json
    import os
    import sys
    from pathlib import Path

    import ray


    def descendants(root):
        """pid -> (parent pid, process title) of the processes below ``root``."""
        procs = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    procs[int(p.name)] = (ppid, (p / "cmdline").read_bytes().split(b"\\0")[0].decode(errors="replace"))
                except (OSError, IndexError, ValueError):
                    continue
        found, frontier = {}, [root]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, title) in procs.items():
                if ppid == parent:
                    found[pid] = (ppid, title)
                    frontier.append(pid)
        return found


    def environ(pid):
        return sorted(e.decode(errors="replace") for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0") if e)


    @ray.remote(num_cpus=1)
    class Engine:
        def observe(self, model):
            from vllm import LLM, SamplingParams

            llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True)
            out = llm.generate("Diablo II is", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            procs = descendants(os.getpid())
            cores = [pid for pid, (_, title) in procs.items() if title.startswith("VLLM::EngineCore")]
            workers = [pid for pid, (ppid, _) in procs.items() if cores and ppid == cores[0]]
            return {"tokens": len(out[0].outputs[0].token_ids), "titles": sorted(t for _, t in procs.values()),
                    "cores": cores, "workers": workers,
                    "core_env": environ(cores[0]) if cores else [],
                    "worker_env": environ(workers[0]) if workers else [],
                    "core_cpus": sorted(os.sched_getaffinity(cores[0])) if cores else [],
                    "worker_cpus": sorted(os.sched_getaffinity(workers[0])) if workers else [],
                    "actor_cpus": sorted(os.sched_getaffinity(0))}


    if __name__ == "__main__":
        ray.init(num_cpus=2, include_dashboard=False)
        seen = {}
        for case, env in json.loads(sys.argv[2]).items():
            actor = Engine.options(runtime_env={"env_vars": env}).remote()
            seen[case] = ray.get(actor.observe.remote(sys.argv[1]))
            ray.kill(actor)
        print("SEEN", json.dumps(seen))
''')
CASES = {
    "defaults": {"WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES": "1"},
    "spawn-asked-for": {"WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"},
}
OPENMP_BINDING = ("GOMP_CPU_AFFINITY=", "KMP_AFFINITY=", "OMP_PLACES=")


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("placement") / "engines.py"
    script.write_text(SCRIPT)
    cases = {case: {"VLLM_CPU_KVCACHE_SPACE": "1", **env} for case, env in CASES.items()}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES", "RAY_ADDRESS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    for case, found in seen.items():
        assert found["tokens"] == 4 and len(found["cores"]) == 1 and len(found["workers"]) == 1, (case, found["titles"])
    return seen


def test_an_engine_core_started_by_a_ray_actor_forks_its_worker_unless_spawn_was_asked_for(engines):
    forked, spawned = engines["defaults"], engines["spawn-asked-for"]
    # vLLM sets spawn in the actor (it must start the engine core so); the plugin notes the actor's own setting.
    assert "VLLM_WORKER_MULTIPROC_METHOD=spawn" in forked["core_env"]
    assert "WORKFLOW_VLLM_MULTIPROC_METHOD_IN_ACTOR=fork" in forked["core_env"]
    assert forked["worker_env"] == forked["core_env"]  # no exec: the worker was forked
    assert spawned["worker_env"] != spawned["core_env"]  # exec'd by spawn ...
    added = set(spawned["worker_env"]) - set(spawned["core_env"])
    assert any(entry.startswith(OPENMP_BINDING) for entry in added), sorted(added)  # ... after vLLM bound OpenMP


def test_the_engine_core_runs_on_its_workers_cpus_unless_turned_off(engines):
    placed, left = engines["defaults"], engines["spawn-asked-for"]
    assert placed["core_cpus"] == placed["worker_cpus"]
    assert placed["core_cpus"] != placed["actor_cpus"]  # it was moved: vLLM leaves it on every CPU
    assert left["core_cpus"] == left["actor_cpus"] != left["worker_cpus"]
