"""Batch inference shared by the evaluate stage and the ``batch`` job.

One vLLM engine (``ray.data.llm.build_processor`` with ``vLLMEngineProcessorConfig``) serves
every row; a row's ``model`` column picks the base model or a LoRA adapter, and its
``sampling_params`` may carry a decoding constraint and a seed of its own. The other way in is any
OpenAI-compatible chat completions URL (``HttpRequestProcessorConfig``). Either way the
output has every input column plus ``generated_text``, ``num_input_tokens``,
``num_generated_tokens`` and ``error`` (empty when the row succeeded), one output row per
input row.

Throughput on few cores (see bench/README.md, "Batch inference"): Ray Data's chat-template,
tokenize and detokenize stages are separate actor pools that compete with the engine for
the same cores, and the detokenize stage repeats work vLLM already does. So by default the
prompt text is rendered in the (fused, task-based) preprocess step with the model's own
chat template, vLLM tokenizes it, and vLLM's own detokenized text is used. A recipe can
turn any of those stages back on through ``processor``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
from typing import Any

from ..core import ray_cluster, storage
from ..core.console import say
from ..core.errors import WorkflowError
from ..patches import vllm_offline_batch_defaults
from ..prompts import messages as prompts
from ..prompts.guard import is_tokenizer_file
from .adapters import lora_engine_kwargs, with_revision

OUTPUT_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens", "error")
# Columns the engine stage reads or overwrites; an input column of the same name is kept aside.
ENGINE_COLUMNS = ("prompt", "messages", "tokenized_prompt", "sampling_params", "model", "tokenization_kwargs",
                  "multimodal_data", "mm_processor_kwargs", "multimodal_uuids", "payload", "http_response")
_SAVED = "__input_"
# What the engine path does unless the recipe's `processor` says otherwise (see the module doc).
# Logical CPUs that the row-shaping steps (prompt rendering before the engine, column selection
# after it) reserve. They are light; at a whole CPU each they queue behind the engine actor's
# reservation on a small machine (2 logical CPUs: the engine's 1 plus 1 for every other
# task), which starved the engine of batches: 0.43x plain vLLM at steady state before, see
# bench/README.md.
LIGHT_TASK_CPUS = 0.25
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "chat_template_stage": False,
    "tokenize_stage": False,
    "detokenize_stage": False,
    "should_continue_on_error": True,
    # Exporting vLLM's per-step stats to Ray's Prometheus endpoint costs CPU in the engine's
    # frontend process, which shares its core with everything else here.
    "log_engine_metrics": False,
}


# Ray's vLLM stage imports torch and vLLM in this process too (its module imports vLLM's exception
# types): ~6 s on a 2-core VM, on the way to the engine's start. Begun before ray.init, which mostly
# waits for the processes it starts, the import overlaps it (bench/README.md, "Batch inference").
_engine_imports: threading.Thread | None = None


def _import_engine_modules() -> None:
    try:
        import torch  # noqa: F401
        import vllm.v1.engine.exceptions  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - engine_processor imports them again and reports the error
        pass


def init_ray(storage_uri: str | None = None, *, engine: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS, else start a private local one (``core.ray_cluster``);
    the workers' logs reach this process only with ``WORKFLOW_RAY_LOGS`` set. ``engine``: the rows
    will go through a vLLM engine (``engine_processor``), whose modules load in a thread meanwhile."""
    global _engine_imports
    if engine and _engine_imports is None:
        _engine_imports = threading.Thread(target=_import_engine_modules, name="engine-imports", daemon=True)
        _engine_imports.start()
    ray_cluster.init_ray(log_to_driver=bool(os.environ.get("WORKFLOW_RAY_LOGS")), storage_uri=storage_uri,
                         needs=("vllm",))


@functools.lru_cache(maxsize=4)
def model_tokenizer(model_source: str, model_key: str, revision: str | None = None):
    """The model's tokenizer where this task runs: from a local folder or hub id, else from a copy of
    the model's tokenizer files on this node (``model_key`` names the model's content)."""
    from transformers import AutoTokenizer

    if not storage.is_local(model_source):
        model_source = storage.node_local_copy(model_source, model_key, include=is_tokenizer_file)
    return AutoTokenizer.from_pretrained(model_source, revision=revision)


def _keep_aside(row: dict[str, Any], input_columns: list[str]) -> dict[str, Any]:
    """Input columns the engine would overwrite, saved under another name for the output."""
    return {_SAVED + c: row[c] for c in input_columns if c in ENGINE_COLUMNS}


def _per_row(row: dict[str, Any]) -> dict[str, Any]:
    """Sampling settings a row carries: its decoding constraint (vLLM ``structured_outputs`` as JSON
    text: ``{"regex": ...}``, ``{"json": schema}``, ``{"choice": [...]}``) and its sampling seed."""
    found: dict[str, Any] = {}
    if row.get("__constraint"):
        constraint = json.loads(row["__constraint"])
        # A schema as JSON text: nested dicts of mixed types do not make one Arrow struct type across rows.
        if isinstance(constraint.get("json"), dict):
            constraint["json"] = json.dumps(constraint["json"])
        found["structured_outputs"] = constraint
    if row.get("__seed") is not None:
        found["seed"] = int(row["__seed"])
    return found


def _engine_preprocess(row: dict[str, Any], *, model_source: str, model_key: str, sampling_params: dict[str, Any],
                       input_columns: list[str], render: bool, revision: str | None = None) -> dict[str, Any]:
    messages = prompts.row_messages(row)
    out = _keep_aside(row, input_columns)
    if render:
        out["prompt"] = prompts.render(model_tokenizer(model_source, model_key, revision), messages)
    else:
        out["messages"] = messages
    out["sampling_params"] = {**sampling_params, "output_kind": _final_only(), **_per_row(row)}
    out["model"] = row.get("__adapter") or model_source
    return out


@functools.lru_cache(maxsize=1)
def _final_only():
    """vLLM's ``RequestOutputKind.FINAL_ONLY``: one output per request instead of one per token.

    ``vllm.LLM`` sets it for offline use; ray.data.llm's engine stage leaves the async
    engine's default (CUMULATIVE), which builds a cumulative output object for every request
    at every decoding step in the engine's frontend process. The value is an Enum, so Ray
    Data carries this column pickled rather than as Arrow.
    """
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY


def _http_preprocess(row: dict[str, Any], *, sampling_params: dict[str, Any], input_columns: list[str]) -> dict:
    out = _keep_aside(row, input_columns)
    out["payload"] = {"model": row["__endpoint_model"], "messages": prompts.row_messages(row), **sampling_params,
                      **_per_row(row)}
    return out


def _select(batch, *, input_columns: list[str], http: bool, extra_columns: tuple[str, ...] = ()):
    """The output table: the input columns as they came in, then the generation columns."""
    import pyarrow as pa

    names = batch.column_names
    cols = {c: batch.column(_SAVED + c if _SAVED + c in names else c) for c in input_columns}
    n = batch.num_rows
    # A batch whose rows all failed has no engine output columns.
    cols.update({c: batch.column(c) if c in names else pa.nulls(n) for c in extra_columns})
    if http:
        results = [_http_result(r) for r in batch.column("http_response").to_pylist()]
        cols.update(generated_text=pa.array([r[0] for r in results], pa.string()),
                    num_input_tokens=pa.array([r[1] for r in results], pa.int64()),
                    num_generated_tokens=pa.array([r[2] for r in results], pa.int64()),
                    error=pa.array([r[3] for r in results], pa.string()))
    else:
        error = batch.column("__inference_error__") if "__inference_error__" in names else pa.array([""] * n)
        cols.update(generated_text=batch.column("generated_text").cast(pa.string()),
                    num_input_tokens=batch.column("num_input_tokens").cast(pa.int64()),
                    num_generated_tokens=batch.column("num_generated_tokens").cast(pa.int64()),
                    error=error.cast(pa.string()))
    return pa.table(cols)


def _http_result(response: dict | None) -> tuple[str, int, int, str]:
    """(text, prompt tokens, completion tokens, error) from one chat completions response."""
    response = response or {}
    choices = response.get("choices")
    if not choices:
        error = response.get("error") or response.get("message") or response.get("detail") or "no choices in the response"
        return "", 0, 0, (error if isinstance(error, str) else json.dumps(error))[:500]
    usage = response.get("usage") or {}
    text = (choices[0].get("message") or {}).get("content") or ""
    return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), ""


def check_input_columns(columns: list[str], where: str) -> None:
    taken = [c for c in columns if c in OUTPUT_COLUMNS or c.startswith(("__", _SAVED))]
    if taken:
        raise WorkflowError(f"{where}: column(s) {taken} are names the output uses", hint="rename them in the input")
    prompts.check_columns(columns, where)


def engine_processor(model_source: str, processor: dict[str, Any], sampling_params: dict[str, Any],
                     adapters: dict[str, str], input_columns: list[str], where: str = "evaluate.processor", *,
                     model_key: str = "", lora_loading_path: str | None = None, revision: str | None = None):
    """The vLLM processor for rows with the given input columns (plus our ``__`` columns).

    ``adapters``: name -> location (folder or URI), for the LoRA engine settings; ``lora_loading_path``:
    the storage folder the engines load adapters from by name (``EngineAdapters.loading_path``);
    ``model_key``: what identifies the model's content (the model stage's fingerprint); ``revision``: the
    commit the model stage pinned a hub model to (vLLM's ``revision`` and ``tokenizer_revision``).
    """
    if _engine_imports is not None:
        _engine_imports.join()  # its import is over before this one: no half-imported module seen here
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    fields = {**PROCESSOR_DEFAULTS, **processor}
    if cpu_engine(fields):
        note_emulated_bfloat16(fields.get("engine_kwargs") or {}, f"{where}.engine_kwargs.dtype")
    fields["engine_kwargs"] = offline_scheduler_limits(
        with_revision(lora_engine_kwargs(fields.get("engine_kwargs") or {}, adapters, where), revision), fields)
    if lora_loading_path is not None:
        fields["dynamic_lora_loading_path"] = lora_loading_path
    config = vLLMEngineProcessorConfig(model_source=model_source, **fields)
    render = not _stage_enabled(fields["chat_template_stage"])
    preprocess = functools.partial(_engine_preprocess, model_source=model_source, model_key=model_key,
                                   sampling_params=sampling_params, input_columns=input_columns, render=render,
                                   revision=revision)
    light = {"num_cpus": LIGHT_TASK_CPUS, "concurrency": _engine_count(config.concurrency)}
    return build_processor(config, preprocess=preprocess, preprocess_map_kwargs=light, postprocess_map_kwargs=light)


def offline_scheduler_limits(engine_kwargs: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """engine_kwargs with vLLM's offline scheduler limits for a CPU engine, where the recipe sets none.

    Ray's engine stage builds vLLM's engine config without a usage context, which gets vLLM's
    generic limits (128 sequences and 2,048 tokens a step) instead of those ``vllm.LLM`` has
    (on the CPU 256 and 4,096 per tensor/pipeline rank): half the batch per decoding step, 0.86x
    plain vLLM's steady rows/s on the 2-core VM against 0.92x with these (bench/README.md, "Batch
    inference"). vLLM's offline limits depend on the device the engine runs on, known here only for
    a CPU engine (placement bundles without GPUs) read in a driver that runs on the CPU too; a GPU
    recipe sets ``max_num_seqs`` / ``max_num_batched_tokens`` itself.
    """
    if not cpu_engine(fields) or {"max_num_seqs", "max_num_batched_tokens"} <= engine_kwargs.keys():
        return engine_kwargs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return engine_kwargs
    world_size = engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("pipeline_parallel_size", 1)
    limits = vllm_offline_batch_defaults.offline_limits(world_size)  # None with another vLLM (one warning)
    return engine_kwargs if limits is None else {**limits, **engine_kwargs}


def cpu_engine(fields: dict[str, Any]) -> bool:
    """Whether a vLLMEngineProcessorConfig's engines run on the CPU (placement bundles without GPUs)."""
    bundles = (fields.get("placement_group_config") or {}).get("bundles") or []
    return bool(bundles) and not fields.get("accelerator_type") and not any(b.get("GPU") for b in bundles)


def note_emulated_bfloat16(engine_kwargs: dict[str, Any], dtype_key: str) -> None:
    """One line when a CPU engine would compute in bfloat16 on an x86 CPU without AVX512-BF16 (this one).

    vLLM's CPU kernels then emulate bfloat16: the CPU demo's evaluation took 489 s in bfloat16 against 180 s
    in float32 on a 2-core AVX2 VM (bench/README.md, "Why it is fast"). ``auto`` is bfloat16 on
    the CPU for a float32 or bfloat16 model. Only a note: the engine may run on another node than this one.
    """
    if str(engine_kwargs.get("dtype", "auto")) not in ("auto", "bfloat16") or not _x86_without_bfloat16():
        return
    say(f"[{dtype_key.split('.')[0]}] note: the engine computes in bfloat16 and this CPU has no AVX512-BF16, so vLLM "
        f"emulates it (about 2.7x slower than float32 on the CPU demo); set {dtype_key}: float32 for full speed")


@functools.lru_cache(maxsize=1)
def _x86_without_bfloat16() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool(flags) and "avx512_bf16" not in flags and "amx_bf16" not in flags


def _engine_count(concurrency: int | tuple[int, int]) -> int:
    """As many prompt-rendering (and column-selecting) tasks at a time as there can be engines.

    Each such task runs in a worker process that starts Python, Ray and a tokenizer first; unbounded,
    Ray Data starts several at once, on the cores where the engine actor is importing vLLM: on the
    2-core VM the engine's first request came 3 s later (bench/README.md, "Batch inference"). One
    task renders a block far faster than one engine answers it.
    """
    return concurrency if isinstance(concurrency, int) else max(concurrency)


def http_processor(processor: dict[str, Any], sampling_params: dict[str, Any], input_columns: list[str]):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(**processor)
    preprocess = functools.partial(_http_preprocess, sampling_params=sampling_params, input_columns=input_columns)
    return build_processor(config, preprocess=preprocess, preprocess_map_kwargs={"num_cpus": LIGHT_TASK_CPUS},
                           postprocess_map_kwargs={"num_cpus": LIGHT_TASK_CPUS})


def _stage_enabled(value: Any) -> bool:
    return value.get("enabled", True) if isinstance(value, dict) else bool(value)


def run(ds, processor, input_columns: list[str], *, http: bool = False, extra_columns: tuple[str, ...] = ()):
    """Apply a processor and shape its output (a lazy Ray dataset).

    ``extra_columns`` keeps more of the engine's columns, e.g. ``generated_tokens`` (the generated
    token ids) for the evaluate stage's parity check.
    """
    out = processor(ds)
    return out.map_batches(functools.partial(_select, input_columns=input_columns, http=http,
                                             extra_columns=extra_columns),
                           batch_format="pyarrow", batch_size=None, zero_copy_batch=True, num_cpus=LIGHT_TASK_CPUS)
