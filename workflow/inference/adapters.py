"""LoRA adapters and the base model as a vLLM engine loads them: where from, and rank limits.

A model or adapters in object storage reach each engine as URIs that ray.data.llm downloads on
the engine's own node; local folders are used as they are. vLLM accepts a fixed set of ranks
(``vllm.config.lora.MaxLoRARanks``); an adapter whose rank the recipe's engine settings cannot
hold is refused here, before any engine starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.console import say
from ..core.errors import WorkflowError
from ..patches import vllm_model_registry

# vLLM's allowed values for max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise WorkflowError(f"LoRA rank {rank} is larger than vLLM supports ({LORA_RANKS[-1]})")


def adapter_rank(location: str | Path) -> int:
    """The LoRA rank of the adapter in ``location`` (a local folder or a storage URI)."""
    config = storage.join(str(location), "adapter_config.json")
    if not storage.exists(config):
        raise WorkflowError(f"{location}: not a LoRA adapter (no adapter_config.json)")
    return int(storage.read_json(config)["r"])


def stored_adapters(adapters_dir: str) -> list[str]:
    """The names of the adapters in a train stage's ``adapters_dir``: its sub-folders holding an
    ``adapter_config.json`` (which the train stage writes last), sorted."""
    return sorted({rel.split("/")[0] for rel in storage.list_files(adapters_dir)
                   if rel.endswith("/adapter_config.json") and rel.count("/") == 1})


# safetensors' dtype names -> the names of vLLM's ``dtype`` setting
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def lint_adapters(adapters: dict[str, str], where: str, architectures: list[str] | None = None, *,
                  engine_dtype: str | None = None, dtype_key: str = "engine_kwargs.dtype") -> None:
    """Refuse, before an engine loads them, adapters the engine would serve differently from training
    or reject only when a request first names them.

    ``modules_to_save`` (LLaMA-Factory's ``additional_target``): full copies of modules such as
    ``lm_head`` or ``embed_tokens`` trained beside the low-rank weights. vLLM 0.32 applies saved
    modules only to a cross-encoder's score head; a generative model's are dropped, so its answers
    would not be the trained adapter's.

    Low-rank weights on a module vLLM does not adapt in the base model's architecture (its
    ``config.json``'s ``architectures``): vLLM refuses such an adapter when it loads it, which on a
    serving replica is at the first request that names it (vLLM issues #9280, #30690).

    LoRA weights in another dtype than the engine's (``engine_dtype``, the recipe's ``dtype_key``):
    vLLM casts them when it loads them, silently. bfloat16 weights into a float16 engine are refused
    (float16 holds values up to 65504, bfloat16 up to 3e38: large ones would become inf); any other
    cast is said in one line (PEFT saves float32 weights, engines mostly compute in bfloat16: the
    parity check measures what the cast changes).
    """
    for name, location in adapters.items():
        config = storage.read_json(storage.join(str(location), "adapter_config.json"))
        saved = sorted(config.get("modules_to_save") or [])
        if saved:
            raise WorkflowError(f"{where}: adapter {name!r} saves full modules {saved} (modules_to_save), which vLLM "
                                "does not apply to a generative model: its answers would differ from training",
                                hint="train without them (remove train.llamafactory.additional_target), or evaluate "
                                     "it with transformers + PEFT instead of vLLM")
        tensors = adapter_tensors(location)
        _check_dtype(name, tensors, engine_dtype, where, dtype_key)
        refused = modules_vllm_does_not_adapt(tensors, architectures or [])
        if refused:
            architecture = (architectures or ["this model"])[0]
            raise WorkflowError(f"{where}: adapter {name!r} has LoRA weights on {refused}, which vLLM does not adapt in "
                                f"{architecture}: the engine would refuse the adapter when it loads it",
                                hint="train again with train.llamafactory.lora_target naming linear layers of the decoder "
                                     "only (`all` does; lm_head and the embeddings are not among them)")


def _check_dtype(name: str, tensors: dict[str, Any], engine_dtype: str | None, where: str, dtype_key: str) -> None:
    engine_dtype = {"half": "float16", "float": "float32"}.get(engine_dtype or "", engine_dtype)
    if engine_dtype in (None, "auto") or not tensors:
        return
    weights = sorted({_DTYPES.get(t["dtype"], t["dtype"].lower()) for t in tensors.values()})
    if engine_dtype == "float16" and "bfloat16" in weights:
        raise WorkflowError(f"{where}: adapter {name!r} has bfloat16 LoRA weights and the engine computes in float16 "
                            f"({dtype_key}), which vLLM casts them to silently: values beyond 65504 become inf",
                            hint=f"set {dtype_key}: bfloat16")
    cast = [w for w in weights if w != engine_dtype]
    if cast:
        say(f"[{where}] adapter {name!r}: LoRA weights in {', '.join(cast)}, cast to the engine's {engine_dtype} when "
            "loaded (the parity check measures what that changes)")


def adapter_tensors(location: str | Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape"} from the adapter's safetensors header, read alone (a ranged
    read in object storage, not the weights); empty for an adapter saved in another format."""
    uri = storage.join(str(location), "adapter_model.safetensors")
    if not storage.exists(uri):
        return {}
    (size,) = struct.unpack("<Q", storage.read_bytes(uri, 0, 8))
    header = json.loads(storage.read_bytes(uri, 8, 8 + size))
    header.pop("__metadata__", None)
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()}


def modules_vllm_does_not_adapt(tensors: dict[str, Any], architectures: list[str]) -> list[str]:
    """The modules of an adapter's low-rank weights that vLLM would refuse, by last name component.

    vLLM adapts every linear layer of its model (``vllm.lora.utils.get_supported_lora_modules``) and
    the embedding modules its model class declares (``embedding_modules``, empty for most, Qwen2 and
    Llama included); its LM head and token embeddings are not linear layers there. So ``lm_head`` and
    any module with embedding weights (PEFT's ``lora_embedding_A/B``) must be declared by the class.
    Only then is vLLM's model registry consulted (importing it costs seconds), through
    ``patches.vllm_model_registry``: where it cannot tell (another vLLM), nothing is refused here.
    """
    candidates = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors
                  if ".lora_embedding_" in name or name.split(".lora_")[0].endswith("lm_head")}
    if not candidates or not architectures:  # an unknown architecture: nothing to tell from
        return []
    adapted = vllm_model_registry.embedding_modules(architectures[0])
    return [] if adapted is None else sorted(candidates - adapted)


def model_architectures(model_uri: str, revision: str | None = None) -> list[str]:
    """The ``architectures`` of the base model's ``config.json`` (a folder, a bucket or the hub at the
    pinned ``revision``); empty where it cannot be read here (a hub model without network or cache)."""
    if storage.is_local(model_uri) or "://" in model_uri:
        uri = storage.join(model_uri, "config.json")
        return list(storage.read_json(uri).get("architectures") or []) if storage.exists(uri) else []
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_uri, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - offline, gated or missing: the lint then skips this check
        return []
    return list(json.loads(Path(path).read_text()).get("architectures") or [])


def check_trained_on(train_manifest: dict[str, Any], model_manifest: dict[str, Any], where: str) -> None:
    """Refuse adapters trained on another base than the run's model stage holds now (the model stage
    ran again since, and train did not)."""
    trained_on = (train_manifest.get("inputs") or {}).get("model")
    if trained_on and trained_on != model_manifest["fingerprint"]:
        raise WorkflowError(f"{where}: the run's adapters were trained on another base model (model stage "
                            f"{trained_on[:19]} at training, {model_manifest['fingerprint'][:19]} now)",
                            hint="run the train stage again: it trains on the model stage's current output")


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
    """Adapter name -> local folder: the folder itself, or a copy on this machine's disk."""
    return {name: str(storage.materialize(uri, cache_dir)) for name, uri in adapters.items()}


@dataclass(frozen=True)
class EngineAdapters:
    """How an engine finds each adapter.

    ``row_model``: the value of a row's ``model`` column for each adapter name; ``loading_path``:
    the remote folder each engine downloads them from on its own node (``dynamic_lora_loading_path``),
    or None when the rows name local folders.
    """

    row_model: dict[str, str]
    loading_path: str | None


def engine_adapters(adapters: dict[str, str], cache_dir: Path) -> EngineAdapters:
    """Adapters that are the sub-folders of one folder in object storage are loaded by each engine on
    its own node, by name; any others are copied to this machine (whose engines are on this node)."""
    parents = {uri.rstrip("/").rsplit("/", 1)[0] for uri in adapters.values()}
    named_by_folder = all(uri.rstrip("/").rsplit("/", 1)[-1] == name for name, uri in adapters.items())
    if adapters and len(parents) == 1 and named_by_folder and not storage.is_local(next(iter(parents))):
        return EngineAdapters({name: name for name in adapters}, parents.pop())
    return EngineAdapters(local_adapters(adapters, cache_dir), None)


def with_revision(engine_kwargs: dict[str, Any], revision: str | None) -> dict[str, Any]:
    """vLLM's engine kwargs loading the commit the model stage pinned a hub model to (``revision`` and
    ``tokenizer_revision``; the recipe's keys win)."""
    if revision is None:
        return engine_kwargs
    return {"revision": revision, "tokenizer_revision": revision, **engine_kwargs}


def model_for_engine(model_uri: str) -> str:
    """The base model as the engine loads it: a local folder, a hub id, or an s3/gs URI, which
    each engine downloads on its own node (ray.data.llm does; nothing goes through this machine)."""
    return str(storage.local_path(model_uri)) if storage.is_local(model_uri) else model_uri
