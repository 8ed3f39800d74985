"""Where vLLM's engine-core process runs on a small CPU machine; a vLLM plugin.

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

Registered in pyproject.toml under the ``vllm.general_plugins`` entry point group; applied only
to the vLLM versions in ``TESTED`` (elsewhere vLLM's placement stays, with one warning line).
"""

from __future__ import annotations

import logging
import os

from . import supported, warn

ENV = "WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES"
PATCH = "workflow.patches.vllm_cpu_placement"
TESTED = {"vllm": "==0.32.*"}
CONSEQUENCE = ("vLLM's placement stays: on a machine of 2-3 cores the engine core's spinning can starve the "
               "front end (plain vLLM swung between 6 and 32 requests/s at 16 clients on 2 cores)")
logger = logging.getLogger(__name__)


def engine_core_cpus(worker_cpu_lists: list[list[int]], setting: str) -> set[int] | None:
    """The CPUs the engine core should run on, or None to leave vLLM's placement."""
    cpus = {cpu for cpus in worker_cpu_lists for cpu in cpus}
    if not cpus or setting == "0":
        return None
    if setting == "1" or len(cpus) == 1:
        return cpus
    return None


def register() -> None:
    """vLLM plugin entry: place the engine core when vLLM computes its workers' CPU binding."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get(ENV) == "0" or not supported(PATCH, TESTED, CONSEQUENCE):
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
