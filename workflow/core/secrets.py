"""Keep tokens and keys out of logs, manifests, reports and error messages."""

from __future__ import annotations

import hashlib
import os
import re

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OPENAI_API_KEY",
    "WORKFLOW_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
_SECRET_NAME = re.compile(r"(token|secret|password|api_key|apikey|access_key|credential)", re.I)
REDACTED = "***"


def key_digest(key: str) -> str:
    """The SHA-256 digest (hex) that stands in for an API key wherever the key itself must not go."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's value is a secret (by its name)."""
    return name in SECRET_ENV_VARS or bool(_SECRET_NAME.search(name))


def secret_values() -> list[str]:
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    values |= {v for k, v in os.environ.items() if _SECRET_NAME.search(k)}
    # Short values ("1", "true") would redact ordinary text; real secrets are longer.
    return sorted((v for v in values if len(v) >= 6), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact_mapping(obj):
    """A copy of a JSON-like object with secret-named keys and secret values masked."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET_NAME.search(str(k)) and obj[k] else redact_mapping(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_mapping(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj
