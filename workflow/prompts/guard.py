"""Prompt-format guard: the prompt a served adapter sees must be token-for-token the one it was trained on.

The most common reason a fine-tuned adapter answers worse in vLLM than in training is a prompt
rendered differently: another chat template, a missing default system prompt, a stray newline.
The train stage records how LLaMA-Factory rendered a sample prompt (``record``); evaluate and
serve render the same sample with their tokenizer's chat template and refuse to run when the
token ids differ (``check``), showing the first differing token. An explicit override lets a
user proceed anyway.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.console import say
from ..core.errors import WorkflowError
from .messages import row_messages

FILE = "prompt_format.json"


def llamafactory_prompt_ids(tokenizer, template_name: str, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt as LLaMA-Factory's template renders it for training (train env only)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template_name))
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": ""}]
    prompt_ids, _ = template.encode_oneturn(tokenizer, turns, system)
    return list(prompt_ids)


def chat_template_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt as the tokenizer's chat template renders it (what vLLM and Serve do)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def record(tokenizer, template_name: str, sample_row: dict[str, Any]) -> dict[str, Any]:
    messages = row_messages(sample_row)
    ids = llamafactory_prompt_ids(tokenizer, template_name, messages)
    return {"template": template_name, "chat_template": tokenizer.chat_template, "messages": messages,
            "prompt_ids": ids, "prompt_text": tokenizer.decode(ids)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check(recorded: dict[str, Any], tokenizer, *, where: str, allow_mismatch: bool = False) -> bool:
    """Raise (or warn, with ``allow_mismatch``) when ``tokenizer`` renders the recorded sample differently."""
    expected = recorded["prompt_ids"]
    actual = chat_template_prompt_ids(tokenizer, recorded["messages"])
    i = first_difference(expected, actual)
    if i is None:
        return True

    def tok(ids: list[int]) -> str:
        return repr(tokenizer.decode(ids[i:i + 1])) if i < len(ids) else "<end of prompt>"

    context = repr(tokenizer.decode(expected[max(0, i - 8):i]))
    message = (f"{where}: the prompt differs from the one the adapter was trained on at token {i} "
               f"(after {context}: training had {tok(expected)}, this tokenizer's chat template gives {tok(actual)}; "
               f"training used LLaMA-Factory template {recorded['template']!r})")
    if allow_mismatch:
        print(f"warning: {message}; going on because the prompt-format check is overridden", flush=True)
        return False
    raise WorkflowError(message, hint="use the model's own tokenizer/chat template, or the matching "
                                      "train.llamafactory.template; set allow_prompt_mismatch: true to proceed anyway")


def write_record(model_dir: str | Path, dataset_dir: str | Path, dataset: str, template_name: str,
                 dest: str | Path) -> None:
    """Record how training rendered the first row of ``dataset`` into ``dest/prompt_format.json`` (train env)."""
    from transformers import AutoTokenizer

    info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text())
    file_name = info[dataset.split(",")[0].strip()]["file_name"]
    with open(Path(dataset_dir) / file_name, encoding="utf-8") as f:
        row = json.loads(next(line for line in f if line.strip()))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (Path(dest) / FILE).write_text(json.dumps(record(tokenizer, template_name, row), indent=1) + "\n")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str, revision: str | None = None):
    """One tokenizer load per base model, however many adapters are checked against it.

    ``revision`` (a hub id's pinned commit) is the one the engines load: the hub's current tokenizer
    may have changed its chat template since.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, revision=revision)


def check_adapter(adapter_dir: str | Path, tokenizer_source: str, *, where: str, allow_mismatch: bool = False,
                  revision: str | None = None) -> None:
    """Check an adapter's recorded prompt against the tokenizer that will serve it (no record: nothing to check)."""
    recorded = Path(adapter_dir) / FILE
    if not recorded.exists():
        say(f"[{where}] {adapter_dir}: no {FILE}; the prompt format cannot be checked")
        return
    tokenizer = _load_tokenizer(tokenizer_source, revision)
    if check(json.loads(recorded.read_text()), tokenizer, where=f"{where}: adapter {Path(adapter_dir).name}",
             allow_mismatch=allow_mismatch):
        say(f"[{where}] adapter {Path(adapter_dir).name}: prompt format matches training "
            f"(template {json.loads(recorded.read_text())['template']!r})")


def is_tokenizer_file(rel: str) -> bool:
    """A top-level file of a model folder other than weights: tokenizer, chat template, configs."""
    return "/" not in rel and not rel.endswith((".safetensors", ".bin", ".pt", ".pth"))


def _tokenizer_source(model_source: str, cache_dir: Path) -> str:
    """Where transformers can load the base model's tokenizer: a local folder, a hub id, or a download."""
    if storage.is_local(model_source):
        return model_source
    return str(storage.download_dir(model_source, cache_dir / "tokenizer", include=is_tokenizer_file))


def check_stored_adapters(adapters_dir: str, names: list[str], model_source: str, cache_dir: Path, *, where: str,
                          allow_mismatch: bool = False, revision: str | None = None) -> None:
    """``check_adapter`` for adapters in storage, reading only their records (and the base's tokenizer files).

    ``revision``: the commit a hub model is pinned to (the model stage's summary), for the tokenizer.
    """
    tokenizer = None
    for name in names:
        record_uri = storage.join(adapters_dir, name, FILE)
        if not storage.exists(record_uri):
            say(f"[{where}] adapter {name}: no {FILE}; the prompt format cannot be checked")
            continue
        local = cache_dir / name
        local.mkdir(parents=True, exist_ok=True)
        (local / FILE).write_bytes(storage.read_bytes(record_uri))
        tokenizer = tokenizer or _tokenizer_source(model_source, cache_dir)
        check_adapter(local, tokenizer, where=where, allow_mismatch=allow_mismatch,
                      revision=revision if tokenizer == model_source else None)
