"""LoRA adapters and the base model as a vLLM engine loads them: local folders, rank limits.

vLLM loads LoRA weights from local disk only and accepts a fixed set of ranks
(``vllm.config.lora.MaxLoRARanks``); an adapter whose rank the recipe's engine settings cannot
hold is refused here, before any engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.errors import WorkflowError

# vLLM's allowed values for max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise WorkflowError(f"LoRA rank {rank} is larger than vLLM supports ({LORA_RANKS[-1]})")


def adapter_rank(adapter_dir: str | Path) -> int:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise WorkflowError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json)")
    return int(json.loads(path.read_text())["r"])


def lora_engine_kwargs(engine_kwargs: dict[str, Any], adapters: dict[str, str], where: str) -> dict[str, Any]:
    """engine_kwargs with enable_lora, max_lora_rank and max_loras derived from the adapters.

    A rank the recipe pins below an adapter's rank is refused here, before the engine starts
    (vLLM would fail much later, inside a worker).
    """
    if not adapters:
        return dict(engine_kwargs)
    ranks = {name: adapter_rank(path) for name, path in adapters.items()}
    name, top = max(ranks.items(), key=lambda kv: kv[1])
    fitting = [r for r in LORA_RANKS if r >= top]
    if not fitting:
        raise WorkflowError(f"adapter {name!r} has rank {top}; vLLM supports LoRA ranks up to {LORA_RANKS[-1]}")
    pinned = engine_kwargs.get("max_lora_rank")
    if pinned is not None and pinned < top:
        raise WorkflowError(f"adapter {name!r} has rank {top}, above {where}.engine_kwargs.max_lora_rank={pinned}",
                            hint=f"set {where}.engine_kwargs.max_lora_rank to {fitting[0]} (or remove it to derive it)")
    out = dict(engine_kwargs)
    out["enable_lora"] = True
    out.setdefault("max_lora_rank", fitting[0])
    out.setdefault("max_loras", len(adapters))
    return out


def local_adapters(adapters: dict[str, str], cache_dir: Path) -> dict[str, str]:
    """Adapter name -> local folder (vLLM loads LoRA weights from local disk only)."""
    return {name: str(storage.materialize(uri, cache_dir)) for name, uri in adapters.items()}


def model_for_engine(model_uri: str, cache_dir: Path) -> str:
    """The base model as vLLM loads it: a local folder (downloaded from s3/gs into ``cache_dir``) or a hub id."""
    if storage.is_local(model_uri):  # a local folder, or a hub id (which has no scheme either)
        return str(storage.local_path(model_uri))
    return str(storage.materialize(model_uri, cache_dir))
