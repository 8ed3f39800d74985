"""The tiny base model's pre-training corpus: plain-text documents made from the ingested rows.

Each row gives the non-empty values of ``model.pretrain_text.fields`` as separate documents
(never the instruction or chat form), so the base learns the data's text, not the task.
"""

from __future__ import annotations

import json
import random

from ..config.model import PretrainTextConfig
from ..core import storage
from ..core.errors import WorkflowError

CORPUS = "pretrain"  # the corpus's dataset name in <run>/model/pretrain/dataset_info.json


def row_documents(row: dict, fields: list[str]) -> list[str]:
    """The non-empty values of ``fields`` in one row (a message list gives its contents), in order."""
    docs = []
    for name in fields:
        value = row.get(name)
        texts = [m.get("content", "") for m in value] if isinstance(value, list) else [value]
        docs += [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    return docs


def pretrain_corpus(rows: list[dict], fields: list[str], *, order: str, seed: int) -> list[str]:
    """The pre-training documents, in training order (see ``PretrainTextConfig``)."""
    rng = random.Random(seed)
    if order == "rows":
        rows = list(rows)
        rng.shuffle(rows)  # whole rows: a row's documents stay neighbours
        return [d for row in rows for d in row_documents(row, fields)]
    docs = list(dict.fromkeys(d for row in rows for d in row_documents(row, fields)))
    rng.shuffle(docs)  # a row's sentence and its MR are not neighbours in a packed sequence
    return docs


def write_corpus(text: PretrainTextConfig, ingest_outputs: dict, uri: str) -> int:
    """Write the corpus and its dataset_info.json to ``uri``; return the number of documents."""
    rows = []
    for split in text.splits:
        if split not in ingest_outputs:
            raise WorkflowError(f"model.pretrain_text.splits: the ingest stage wrote no {split!r} split "
                                f"(it wrote {', '.join(k for k in ingest_outputs if k != 'dataset_info')})")
        rows += [json.loads(line) for line in storage.read_text(ingest_outputs[split]).splitlines() if line.strip()]
    docs = pretrain_corpus(rows, text.fields, order=text.order, seed=text.seed)
    if not docs:
        raise WorkflowError(f"model.pretrain_text.fields: no text in fields {text.fields} of splits {text.splits}")
    storage.write_text(storage.join(uri, f"{CORPUS}.jsonl"), "".join(json.dumps({"text": d}) + "\n" for d in docs))
    storage.write_json(storage.join(uri, "dataset_info.json"),
                       {CORPUS: {"file_name": f"{CORPUS}.jsonl", "columns": {"prompt": "text"}}})
    return len(docs)
