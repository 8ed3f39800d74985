"""Which embedding modules vLLM's class for a model architecture adapts with LoRA.

The adapter lint (``inference.adapters.lint_adapters``) refuses an adapter with LoRA weights on
``lm_head`` or an embedding before an engine loads it, unless vLLM's model class declares the
module in ``embedding_modules`` (most do not; Exaone does). vLLM has no public way to get the
class of an architecture without building a ``ModelConfig`` (which reads the model's files): its
registry's ``_try_load_model_cls`` (vllm/model_executor/models/registry.py) is what vLLM itself
calls, so it is used only with the vLLM versions in ``TESTED``.

Outside them (or where the registry has no such method) :func:`embedding_modules` says it does
not know, with one warning line, and the lint leaves those modules to vLLM, which refuses such an
adapter when it loads it (on a serving replica, at the first request that names it).
"""

from __future__ import annotations

from . import supported, warn

PATCH = "workflow.patches.vllm_model_registry"
TESTED = {"vllm": "==0.32.*"}
CONSEQUENCE = ("adapters with LoRA weights on lm_head or an embedding are not refused before an engine loads them "
               "(vLLM refuses them when it loads them)")


def embedding_modules(architecture: str) -> set[str] | None:
    """The ``embedding_modules`` of vLLM's class for ``architecture`` (empty for an architecture vLLM
    does not know); None where this cannot be told here (outside ``TESTED``: one warning)."""
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return None
    from vllm.model_executor.models import ModelRegistry

    load = getattr(ModelRegistry, "_try_load_model_cls", None)
    if load is None:
        warn(PATCH, f"vllm.model_executor.models.ModelRegistry._try_load_model_cls does not exist; {CONSEQUENCE}")
        return None
    return set(getattr(load(architecture), "embedding_modules", None) or {})
