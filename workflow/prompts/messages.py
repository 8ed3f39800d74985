"""Turn dataset rows into chat messages exactly as training saw them.

LLaMA-Factory's Alpaca converter builds the user turn as ``instruction + "\\n" + input``
(only the non-empty parts), takes the row's ``system`` as the system turn and otherwise
leaves it to the chat template (Qwen's ChatML adds its default system prompt). ShareGPT
rows already hold ``messages``; their final assistant turn is the expected answer, so it is
cut off here. Evaluation, batch inference and serving all build prompts through this
module, so a served request sees the same text the adapter was trained on.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import WorkflowError


def user_text(instruction: str | None, input_text: str | None) -> str:
    """The user turn of an Alpaca row, as LLaMA-Factory's converter joins it."""
    return "\n".join(part for part in (instruction or "", input_text or "") if part)


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages to send for one row (without the expected answer).

    Accepts ``messages`` (ShareGPT/OpenAI form; a trailing assistant turn is dropped), or
    Alpaca ``instruction``/``input`` with an optional ``system``, or a plain ``prompt``.
    """
    system = row.get("system") or ""
    messages = row.get("messages")
    if messages is not None:
        turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in _as_list(messages)]
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if system and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("messages must end with a user turn (or a user turn then the expected answer)")
        return turns
    if row.get("instruction") or row.get("input"):
        user = user_text(row.get("instruction"), row.get("input"))
    elif row.get("prompt"):
        user = str(row["prompt"])
    else:
        raise ValueError("a row needs 'messages', 'instruction'/'input', or 'prompt'")
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": user})
    return turns


def expected_output(row: dict[str, Any]) -> str | None:
    """The reference answer of a row, if it has one (Alpaca ``output`` or a final assistant turn)."""
    if row.get("output") is not None:
        return str(row["output"])
    messages = row.get("messages")
    if messages is not None:
        turns = _as_list(messages)
        if turns and turns[-1]["role"] == "assistant":
            return str(turns[-1]["content"])
    return None


def check_columns(columns: list[str], where: str) -> None:
    """A dataset whose columns give no prompt is refused before any engine starts."""
    if not {"messages", "instruction", "input", "prompt"} & set(columns):
        raise WorkflowError(f"{where}: no prompt column; the data has {sorted(columns)}",
                            hint="give 'messages', 'instruction'/'input' (Alpaca) or 'prompt'")


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text: the tokenizer's own chat template with the generation prompt added."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _as_list(messages: Any) -> list[dict]:
    # Arrow hands nested lists to Python as numpy arrays.
    return list(messages.tolist() if hasattr(messages, "tolist") else messages)
