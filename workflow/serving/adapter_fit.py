"""Whether an adapter of the adapters folder fits the served model, read before anything loads it (issue 34).

A replica asks at an adapter's first request (``serving/llm_server.py``): its rank against the engine's
``max_lora_rank`` (vLLM refuses a larger one only inside the engine), and, where the served model is a folder
on this machine, the adapter's tensors against the model's ``config.json`` (the hidden size its LoRA A
matrices read, the layers it names). A misfit is one line naming what does not fit; the request gets it as
OpenAI's 400 and nothing is loaded. Only the standard library: the safetensors header is JSON.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

# vLLM's LoRAConfig.max_lora_rank where engine_kwargs names none.
VLLM_DEFAULT_MAX_LORA_RANK = 16
WEIGHTS = "adapter_model.safetensors"
# LoRA A of the projections that read the hidden state: (rank, hidden size).
_READS_HIDDEN = re.compile(r"\.layers\.(\d+)\..*\b(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of a safetensors file's tensors, from its header only."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def misfit(name: str, folder: Path, config: dict, *, max_lora_rank: int | None, model_source: str | None) -> str | None:
    """Why adapter ``name`` (``folder``, its ``adapter_config.json`` read as ``config``) cannot serve on this
    model, or None where it fits."""
    limit = max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    rank = max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > limit:
        return (f"adapter '{name}' has LoRA rank {rank}, over the served model's max_lora_rank {limit} "
                "(serve.llm_config.engine_kwargs.max_lora_rank)")
    model_config = Path(model_source) / "config.json" if model_source and Path(model_source).is_dir() else None
    weights = folder / WEIGHTS
    if model_config is None or not model_config.is_file() or not weights.is_file():
        return None
    model = json.loads(model_config.read_text())
    hidden, layers = model.get("hidden_size"), model.get("num_hidden_layers")
    for tensor, shape in tensor_shapes(weights).items():
        reads = _READS_HIDDEN.search(tensor)
        if reads and hidden and shape[-1] != hidden:
            return (f"adapter '{name}' was trained on a model of hidden size {shape[-1]} ({reads.group(2)}); the "
                    f"served model's is {hidden}")
        layer = _LAYER.search(tensor)
        if layer and layers and int(layer.group(1)) >= layers:
            return (f"adapter '{name}' has weights for layer {layer.group(1)}; the served model has {layers} layers "
                    "(another base model)")
    return None
