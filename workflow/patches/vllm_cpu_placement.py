"""Where vLLM's engine-core process runs on a small CPU machine, and how its worker starts; a vLLM plugin.

On the CPU, vLLM binds its model worker's OpenMP threads to all cores but
``VLLM_CPU_NUM_OF_RESERVED_CPU`` (one by default), which it leaves to "the scheduler process"
and everything else: the OpenAI server or Ray's processes, tokenization, the clients. The
engine-core process (the scheduler) waits for each model step by spinning (``sched_yield``
on vLLM's shared-memory queue), so on a machine where the worker has one core it keeps the
one reserved core busy, and the front end that must feed it requests and stream its tokens
gets what the spinning leaves. Measured on the 2-core dev VM with 16 streaming clients
(bench/README.md, "Serving"): plain vLLM's OpenAI server swung between 6 and 32 requests/s
with p99 time to first token of 2-14 s; with the engine core on the worker's core, 46
requests/s and 80 ms, run after run. The engine core and the worker take turns (the
scheduler waits while the model runs and the other way round), so they share that core well.

So when the worker is bound to a single core (machines with 2-3 cores), the engine core's
main thread is put on that core too. ``WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES=1`` does it for
any worker binding (untested beyond 2 cores: on larger machines the spinning can slow the
OpenMP threads it lands on), ``=0`` never. Nothing changes on GPUs or with
``VLLM_CPU_OMP_THREADS_BIND=nobind``.

Inside a Ray actor (the evaluate/batch stage's engine, a Ray Serve LLM replica) vLLM must start
its engine-core process with ``spawn`` (forking a Ray actor is undefined behaviour: vllm-project/vllm
#14768) and says so by setting ``VLLM_WORKER_MULTIPROC_METHOD=spawn``, which the engine core
inherits: it then spawns its model worker too, a fresh interpreter that imports torch and vLLM
again although the engine core is no Ray actor (outside Ray vLLM forks the worker from the engine
core). On the CPU the plugin records the setting the actor had before vLLM
changed it, and the engine core forks its worker when that was ``fork`` (vLLM's default): the
stage's engine started 4-12 s sooner on the 2-core AVX2 VM (bench/README.md, "Batch inference").
``VLLM_WORKER_MULTIPROC_METHOD=spawn`` set for the engine keeps vLLM's spawn.

Registered in pyproject.toml under the ``vllm.general_plugins`` entry point group; applied only
to the vLLM versions in ``TESTED`` (elsewhere vLLM's placement and start method stay, with one warning line).
"""

from __future__ import annotations

import logging
import os

from . import supported, warn

ENV = "WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES"
PATCH = "workflow.patches.vllm_cpu_placement"
TESTED = {"vllm": "==0.32.*"}
CONSEQUENCE = ("vLLM's placement stays: on a machine of 2-3 cores the engine core's spinning can starve the "
               "front end (plain vLLM swung between 6 and 32 requests/s at 16 clients on 2 cores); in Ray, "
               "the engine core spawns its worker (a few seconds more at start)")
MP_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
MP_METHOD_IN_ACTOR = "WORKFLOW_VLLM_MULTIPROC_METHOD_IN_ACTOR"  # the actor's setting before vLLM forced spawn
logger = logging.getLogger(__name__)


def engine_core_cpus(worker_cpu_lists: list[list[int]], setting: str) -> set[int] | None:
    """The CPUs the engine core should run on, or None to leave vLLM's placement."""
    cpus = {cpu for cpus in worker_cpu_lists for cpu in cpus}
    if not cpus or setting == "0":
        return None
    if setting == "1" or len(cpus) == 1:
        return cpus
    return None


def forks_worker(environ) -> bool:
    """Whether this engine-core process should fork its model worker: vLLM set ``spawn`` only because
    the Ray actor that started this process had to spawn it (the actor's own setting was ``fork``)."""
    return environ.get(MP_METHOD) == "spawn" and environ.get(MP_METHOD_IN_ACTOR) == "fork"


def register() -> None:
    """vLLM plugin entry: place the engine core when vLLM computes its workers' CPU binding; in an
    engine core started by a Ray actor, fork the worker."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not supported(PATCH, TESTED, CONSEQUENCE):
        return
    from vllm.ray.lazy_utils import is_in_ray_actor

    if is_in_ray_actor():  # before vLLM builds the engine here and forces spawn (once per process)
        os.environ.setdefault(MP_METHOD_IN_ACTOR, os.environ.get(MP_METHOD, "fork"))
    elif forks_worker(os.environ):
        os.environ[MP_METHOD] = "fork"
        logger.info("engine core started by a Ray actor: its model worker is forked (%s)", MP_METHOD)
    if os.environ.get(ENV) == "0":
        return
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if getattr(OMPProcessManager.__init__, "_workflow_placement", False):
        return  # loaded twice in one process (vLLM loads plugins per engine and per worker)
    original_init = OMPProcessManager.__init__

    def init_and_place(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        # The executor builds this manager in the engine-core process, on its main thread
        # (the scheduling loop); threads it starts later inherit the placement.
        if not hasattr(self, "cpu_lists"):
            warn(PATCH, f"OMPProcessManager has no cpu_lists; {CONSEQUENCE}")
            return
        cpus = engine_core_cpus(self.cpu_lists, os.environ.get(ENV, "auto"))
        if cpus:
            os.sched_setaffinity(0, cpus)
            logger.info("engine core placed on the worker's CPUs %s (%s)", sorted(cpus), ENV)

    init_and_place._workflow_placement = True
    OMPProcessManager.__init__ = init_and_place
