"""`evaluate:` — batch inference with vLLM through ``ray.data.llm`` and the metrics to report.

``processor`` holds ``ray.data.llm.vLLMEngineProcessorConfig`` fields verbatim (the model
and the LoRA settings are filled in from the run); ``sampling_params`` holds vLLM's.
"""

from __future__ import annotations

from typing import Any

from .base import Section


class EvaluateConfig(Section):
    split: str = "test"
    metrics: list[str] = ["exact_match", "normalized_exact_match", "function_accuracy", "slot_f1", "parse_failure_rate"]
    processor: dict[str, Any] = {}
    sampling_params: dict[str, Any] = {"temperature": 0.0, "max_tokens": 128}
    max_rows: int | None = None
