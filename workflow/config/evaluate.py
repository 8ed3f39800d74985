"""`evaluate:` — batch inference with vLLM through ``ray.data.llm`` and the metrics to report.

``processor`` holds ``ray.data.llm.vLLMEngineProcessorConfig`` fields verbatim (the model
and the LoRA settings are filled in from the run); ``sampling_params`` holds vLLM's
``SamplingParams`` fields; ``endpoint.processor`` holds ``HttpRequestProcessorConfig``
fields. Our own keys are checked here; the library keys are checked against the libraries
by :func:`check_library_fields`, which needs the serve environment and runs before any
engine starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..core.errors import WorkflowError
from .base import Section, check_engine_kwargs, format_validation_error
from .task import TaskConfig

# Filled in from the run; a recipe that sets them is refused.
RUN_OWNED_PROCESSOR_KEYS = ("model_source",)
RUN_OWNED_ENGINE_KEYS = ("model",)


class ConstrainedDecoding(Section):
    """Also answer every row constrained by the task's structured output (vLLM structured outputs):
    a call regex, a JSON schema or a choice of labels (evaluation/constraints.py). The report
    shows each variant with and without.
    """

    # Bounds that keep a constrained answer finite even when the model would ramble.
    max_value_chars: int = Field(default=80, ge=1)
    max_slots: int | None = Field(default=None, ge=1)  # None = the number of attributes


class EndpointConfig(Section):
    """Evaluate through an OpenAI-compatible chat completions URL instead of a local engine."""

    # HttpRequestProcessorConfig fields, e.g. {url: http://host:8000/v1/chat/completions, qps: 20}.
    processor: dict[str, Any]
    # The model names to ask for; each is one variant in the report.
    models: list[str] = Field(min_length=1)


class ParityConfig(Section):
    """Train/serve parity (evaluation/parity.py): the first ``rows`` rows of the split, decoded greedily by
    each adapter as trained (PEFT + transformers in the train environment: on this machine for an engine on
    the CPU, as a Ray task with one GPU for an engine on GPUs), against the engine's answers (the
    unconstrained adapter variant). Left out, with one line, when ``sampling_params`` is not greedy.
    """

    rows: int = Field(default=16, ge=1)
    # The share of rows whose generated token ids must equal training's: 2 rows of 16 may differ. Measured on
    # the CPU demo's model and adapter (64 ViGGO test rows, up to 96 tokens, 2026-11-27): vLLM in float32 (the
    # CPU recipe's engine dtype since 2026-11-28) with PEFT in float32 agreed on 64/64; vLLM in bfloat16 with
    # PEFT in float32 on 63/64 and with PEFT in bfloat16 on 63/64 (another row); PEFT bfloat16 vs float32 on
    # 62/64. Rounding moves a near-tie between two tokens about once in 64 rows (engines in bfloat16, as on
    # GPUs); a dropped adapter or sampling moves most rows.
    min_identical: float = Field(default=0.85, ge=0.0, le=1.0)
    # The dtype the reference computes in: "engine" (the engine's engine_kwargs.dtype; its "auto" is the model's
    # own: a 7B model in bfloat16 takes half the GPU memory of float32), "auto" (the model's own), or a torch dtype.
    # The CPU recipes' engines compute in float32, so their reference does too (64/64 rows above).
    reference_dtype: Literal["float32", "engine", "auto", "bfloat16", "float16"] = "engine"
    # Proceed (with a warning) when an adapter is below min_identical.
    allow_mismatch: bool = False


class EvaluateConfig(Section):
    split: str = "test"
    # What the answers are and how they are scored (config/task.py); None = inferred from the training outputs.
    task: TaskConfig | None = None
    # Evaluate the base model beside the adapters.
    base: bool = True
    # Adapter names under the train stage's adapters folder; None = every one of them.
    adapters: list[str] | None = None
    processor: dict[str, Any] = {}
    sampling_params: dict[str, Any] = {"temperature": 0.0, "max_tokens": 128}
    constrained_decoding: ConstrainedDecoding | None = None
    endpoint: EndpointConfig | None = None
    max_rows: int | None = Field(default=None, ge=1)
    # Resamplings of the rows for each metric's 95% interval (0: no intervals).
    bootstrap: int = Field(default=1000, ge=0)
    # Sampling seeds, one pass over the rows each (temperature > 0): metrics are their mean, with the spread.
    seeds: list[int] | None = Field(default=None, min_length=1)
    # How many wrong predictions per variant the report lists.
    worst_errors: int = Field(default=10, ge=0)
    # Run even when the engine's tokenizer renders prompts differently from training (see prompts/guard.py).
    allow_prompt_mismatch: bool = False
    # Check that each adapter's answers are training's (None: no check).
    parity: ParityConfig | None = ParityConfig()

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if self.seeds and not self.sampling_params.get("temperature"):
            raise ValueError("seeds: greedy decoding (temperature 0) gives one answer whatever the seed; set "
                             "sampling_params.temperature above 0 or remove seeds")
        if self.constrained_decoding is not None and self.task is not None and self.task.kind == "text":
            raise ValueError("constrained_decoding: a text task has no decoding constraint; remove it, or give a "
                             "task kind that has one (call, json, label)")
        return self

    @field_validator("processor")
    @classmethod
    def _no_run_owned_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = [k for k in RUN_OWNED_PROCESSOR_KEYS if k in v]
        owned += [f"engine_kwargs.{k}" for k in RUN_OWNED_ENGINE_KEYS if k in (v.get("engine_kwargs") or {})]
        if owned:
            raise ValueError(f"{owned} come from the run's model stage; remove them")
        return v


def check_library_fields(cfg: EvaluateConfig, where: str = "evaluate") -> None:
    """Check the pass-through sections against ray.data.llm and vLLM (serve env only).

    Raises a one-line WorkflowError naming the key. Imports Ray and vLLM, so call it in
    the stage process, before starting any worker.
    """
    from pydantic import ValidationError
    from ray.data.llm import HttpRequestProcessorConfig, vLLMEngineProcessorConfig
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    try:
        vLLMEngineProcessorConfig(model_source="validation", **cfg.processor)
    except ValidationError as err:
        raise WorkflowError(format_validation_error(err, f"{where}.processor")) from None
    # ray.data.llm takes task_type from engine_kwargs besides vLLM's own arguments.
    check_engine_kwargs(cfg.processor.get("engine_kwargs"), f"{where}.processor.engine_kwargs", also=["task_type"])
    params = dict(cfg.sampling_params)
    structured = params.pop("structured_outputs", None)
    try:
        SamplingParams(**params, structured_outputs=StructuredOutputsParams(**structured) if structured else None)
    except (TypeError, ValueError) as err:
        raise WorkflowError(f"{where}.sampling_params: {err}", hint="use vllm.SamplingParams field names") from None
    if cfg.endpoint is not None:
        try:
            HttpRequestProcessorConfig(**cfg.endpoint.processor)
        except ValidationError as err:
            raise WorkflowError(format_validation_error(err, f"{where}.endpoint.processor")) from None
