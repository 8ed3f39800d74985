"""Four task variants of the bundled ViGGO copy, each with a CPU recipe that runs it by YAML alone.

    python data/viggo/make_variants.py [OUT]        # default OUT: data/viggo-variants

writes ``OUT/<variant>/{train,valid,test}.jsonl`` (``input``, ``output``) and ``OUT/<variant>/recipe.yaml``
(recipes/viggo-cpu.yaml with the variant's data and instruction, storage ``./runs`` beside it, no
``evaluate.task``: the evaluate stage infers it and says how to pin it):

- ``text``: the reverse direction, meaning representation -> sentence;
- ``call-eq``: the meaning representations written ``fn(attr=value;attr=value)``;
- ``json``: the meaning representations as JSON objects ``{"function": ..., "attributes": {...}}``;
- ``label``: the function name alone (the dialogue act).

No network: it reads data/viggo/*.csv only.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPLITS = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\((.*)\)\s*$")
_SLOT = re.compile(r"\s*([A-Za-z_]\w*)\[([^\[\]]*)\]\s*(?:,|$)")

INSTRUCTIONS = {
    "text": "Write one natural sentence that expresses the meaning representation.",
    "call-eq": "Given a target sentence construct the underlying meaning representation of the input sentence as a "
               "single function with attributes and attribute values, written fn(attribute=value;attribute=value).",
    "json": "Given a target sentence construct the underlying meaning representation of the input sentence as a "
            "JSON object with the function and its attributes.",
    "label": "Name the dialogue act of the sentence.",
}


def parse_mr(mr: str) -> tuple[str, list[tuple[str, str]]]:
    m = _CALL.match(mr)
    if m is None:
        raise ValueError(f"not a ViGGO meaning representation: {mr!r}")
    return m.group(1), [(a, v.strip()) for a, v in _SLOT.findall(m.group(2))]


def variant_row(variant: str, mr: str, ref: str) -> dict:
    fn, slots = parse_mr(mr)
    if variant == "text":
        return {"input": mr, "output": ref}
    if variant == "call-eq":
        return {"input": ref, "output": f"{fn}(" + ";".join(f"{a}={v}" for a, v in slots) + ")"}
    if variant == "json":
        return {"input": ref, "output": {"function": fn, "attributes": dict(slots)}}
    if variant == "label":
        return {"input": ref, "output": fn}
    raise ValueError(f"unknown variant {variant!r}")


def recipe(variant: str) -> dict:
    data = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())
    data["name"] = f"viggo-{variant}-cpu"
    data["storage"] = "./runs"
    data["ingest"].update(source=".", splits={"train": "train.jsonl", "val": "valid.jsonl", "test": "test.jsonl"},
                          columns={"input": "input", "output": "output"}, instruction=INSTRUCTIONS[variant])
    data["evaluate"].pop("task", None)
    if variant == "text":
        data["evaluate"].pop("constrained_decoding", None)
    return data


def write(out: Path) -> None:
    for variant in INSTRUCTIONS:
        folder = out / variant
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLITS.values():
            with open(HERE / name, newline="", encoding="utf-8") as f:
                rows = [variant_row(variant, r["mr"], r["ref"]) for r in csv.DictReader(f)]
            tmp = folder / (Path(name).stem + ".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(folder / (Path(name).stem + ".jsonl"))
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe(variant), sort_keys=False, width=120))
        print(f"{folder}: train/valid/test.jsonl, recipe.yaml")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "data" / "viggo-variants")
