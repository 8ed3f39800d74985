"""Keep tokens and keys out of logs, manifests, reports and error messages.

Masking is by value: every value this process knows to be a secret is replaced by ``***`` wherever
it appears (:func:`redact`). The secrets it knows are the values of environment variables with a
secret's name (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``*_API_KEY``, ``*_TOKEN``, ``*PASSWORD*``,
...: :func:`is_secret_name`) and of variables registered as secrets (:func:`register_secret_env`,
e.g. the recipe's ``serve.api_key_env``). In JSON-like records (:func:`redact_mapping`) a field is
masked whole only when its name is a secret's name (``token``, ``api_key``, ``password``, ...):
``max_tokens`` or ``eos_token`` are settings, not secrets, and stay readable.
"""

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
    "AWS_SECURITY_TOKEN",
    "OPENAI_API_KEY",
    "WORKFLOW_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
# An environment variable's name that says its value is a secret (upper-case by convention):
# ..._TOKEN, ..._KEY, ..._KEY_ID, and any name with SECRET, PASSWORD/PASSWD or CREDENTIAL in it.
_SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|KEY|KEY_ID)$|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
# A field of a JSON-like record whose value is a secret: the name as a whole (case and '-' aside).
_SECRET_FIELDS = frozenset({
    "token", "hf_token", "auth_token", "access_token", "refresh_token", "session_token", "bearer_token",
    "api_key", "apikey", "openai_api_key", "password", "passwd", "secret", "secret_key", "client_secret",
    "access_key", "access_key_id", "secret_access_key", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "private_key", "credentials", "authorization",
})
REDACTED = "***"
# Values shorter than this are not masked: "1" or "true" would mask ordinary text (real secrets are longer).
MIN_SECRET_LENGTH = 6
_registered: set[str] = set()


def key_digest(key: str) -> str:
    """The SHA-256 digest (hex) that stands in for an API key wherever the key itself must not go."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's value is a secret (by its name, or registered as one)."""
    return name in SECRET_ENV_VARS or name in _registered or bool(_SECRET_ENV_NAME.search(name))


def register_secret_env(name: str) -> None:
    """Treat the variable ``name`` as a secret in this process (a recipe's ``serve.api_key_env``)."""
    _registered.add(name)


def is_secret_field(name: str) -> bool:
    """Whether a record's field holds a secret, by its whole name (``max_tokens`` does not)."""
    return str(name).lower().replace("-", "_") in _SECRET_FIELDS


def secret_values() -> list[str]:
    """Every secret value in this process's environment, longest first."""
    values = {v for k, v in os.environ.items() if is_secret_name(k)}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact_mapping(obj):
    """A copy of a JSON-like object with secret fields and every secret value masked."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_field(k) and obj[k] else redact_mapping(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_mapping(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj
