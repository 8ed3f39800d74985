"""`serve:` — an OpenAI-compatible Ray Serve LLM app.

``llm_config`` holds ``ray.serve.llm.LLMConfig`` fields verbatim (the model source and the
adapters' location are filled in from the run).
"""

from __future__ import annotations

from typing import Any

from .base import Section


class ServeConfig(Section):
    llm_config: dict[str, Any] = {}
    host: str = "127.0.0.1"
    port: int = 8000
