"""vLLM's offline scheduler limits (those ``vllm.LLM`` gets) for an engine that Ray Data builds.

Ray's engine stage builds vLLM's engine config without a usage context, so its engines get vLLM's
generic limits instead of the offline ones (``inference.processor.offline_scheduler_limits`` says
what that costs). vLLM computes both in ``EngineArgs.get_batch_defaults``
(vllm/engine/arg_utils.py): an undocumented classmethod that ``EngineArgs`` calls on itself,
returning dicts keyed by ``UsageContext``, not an API vLLM promises to keep. So it is read only
with the vLLM versions in ``TESTED``; outside them :func:`offline_limits` says it does not know,
with one warning line, and the engines keep the limits Ray gives them.
"""

from __future__ import annotations

from . import supported, warn

PATCH = "workflow.patches.vllm_offline_batch_defaults"
TESTED = {"vllm": "==0.32.*"}
CONSEQUENCE = ("CPU engines keep vLLM's generic scheduler limits (half the batch per decoding step, fewer rows/s); "
               "set engine_kwargs.max_num_seqs and max_num_batched_tokens to choose them")


def offline_limits(world_size: int) -> dict[str, int] | None:
    """``max_num_seqs`` and ``max_num_batched_tokens`` of ``vllm.LLM`` on this process's device for an engine
    of ``world_size`` ranks; None outside ``TESTED`` (one warning)."""
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return None
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    defaults = getattr(EngineArgs, "get_batch_defaults", None)
    if defaults is None:
        warn(PATCH, f"vllm.engine.arg_utils.EngineArgs.get_batch_defaults does not exist; {CONSEQUENCE}")
        return None
    tokens, seqs = defaults(world_size)
    return {"max_num_seqs": seqs[UsageContext.LLM_CLASS], "max_num_batched_tokens": tokens[UsageContext.LLM_CLASS]}
