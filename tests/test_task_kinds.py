"""Each task kind through `workflow run` by YAML alone: a dataset of a shape unlike ViGGO per kind, the recipe
recipes/viggo-cpu.yaml with only its name, ingest section and served model id changed (no evaluate.task),
shrunk for CI (see ``CI_EVALUATE``): here call, label and text; the json kind (a third of the outputs ``{}``,
nested values) runs in notebooks/your_dataset.ipynb (tests/test_notebooks.py) with a training of two steps
and its own hand count, so that CI runs four kinds' pipelines, not five.

Asserted: exit 0, the closing summary printed, report.md and report.html written, the kind the evaluate
stage inferred (and the misfits line where some outputs do not fit), and every figure of metrics.json equal
to a count done here by hand from predictions.parquet (the tiny random base answers garbage unconstrained
and something of the right form constrained, so most figures are small; they are still counted exactly;
the text kind's ROUGE-L and chrF are counted by hand in tests/evaluation/test_metrics.py, not here).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_workflow

from workflow.config import load_recipe

# ---------------------------------------------------------------- the datasets (made here, none is ViGGO's)

ACTS = ["inform", "?request", "confirm", "!deny", "hello"]
AREAS = ["north", "south", "east", "west", "centre"]
FOODS = ["thai", "greek", "pizza", "sushi", "tapas", "noodles"]
VERBS = ["book", "cancel", "change", "check", "find", "rate", "share", "track"]
THINGS = ["flight", "hotel", "table", "taxi", "ticket", "train", "parcel", "order"]


def dialogue_acts(n: int, seed: int) -> list[dict]:
    """``act(attr=value;attr=value)``, acts that start with punctuation, requests of a value-less slot."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        act, area, food = rng.choice(ACTS), rng.choice(AREAS), rng.choice(FOODS)
        if act == "?request":
            out, text = f"?request({rng.choice(['area', 'food', 'price'])})", "which one would you like?"
        elif act == "hello":
            out, text = "hello()", "hi there, how can I help?"
        else:
            out, text = f"{act}(area={area};food={food})", f"{act.strip('?!')} a {food} place in the {area}"
        rows.append({"input": text, "output": out})
    return rows


def call_dataset() -> dict[str, list[dict]]:
    train = dialogue_acts(200, 1)
    for i, misfit in enumerate(["bye", "thank you, goodbye", "inform(area=north;food thai"]):  # 3 of 203: 1.5%
        train.insert(40 * (i + 1), {"input": "see you", "output": misfit})
    test = dialogue_acts(5, 2) + [{"input": "ok, bye", "output": "bye"}]
    return {"train": train, "test": test}


def label_dataset() -> dict[str, list[dict]]:
    labels = [f"{v}_{t}" for v in VERBS for t in THINGS]  # 64 labels, 10 rows each: 10% distinct
    train = [{"input": f"please {lab.replace('_', ' ')} for me ({i})", "output": lab} for i in range(10)
             for lab in labels]
    test = [{"input": f"could you {lab.replace('_', ' ')}", "output": lab} for lab in labels[::11]]
    return {"train": train, "test": test}


def text_dataset() -> dict[str, list[dict]]:
    rng = random.Random(4)
    train = [{"input": f"{a} {f}", "output": f"There is a {f} place in the {a}, open until {rng.randint(8, 11)} pm."}
             for a in AREAS for f in FOODS for _ in range(3)]
    test = [{"input": "north thai", "output": "There is a thai place in the north."},
            {"input": "east sushi", "output": "Sushi   in the EAST, open late ✓"}]
    return {"train": train, "test": test}


DATASETS = {"call": call_dataset, "label": label_dataset, "text": text_dataset}
INSTRUCTIONS = {"call": "Write the dialogue act of the sentence.", "label": "Name the intent of the request.",
                "text": "Describe the place in one sentence."}

# What CI changes in the copied recipe, beyond name, ingest and the served model id, to keep the kinds' runs
# within a few minutes of CI: the session's tiny model as the base (no tiny build, no pre-training), no
# bootstrap, 32 new tokens (the random base's answers run to the limit), and no train or serve section (on 2 cores a Ray Train start costs about a minute
# and a Serve deploy as much; the demo's run tests both, the notebook's run trains): the run is
# ingest -> model -> evaluate, the base model answering with and without the kind's constraint.
CI_EVALUATE = {"bootstrap": 0, "sampling_params": {"temperature": 0.0, "max_tokens": 32}}


def write_dataset(folder: Path, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def recipe_for(kind: str, folder: Path, model: Path) -> Path:
    """recipes/viggo-cpu.yaml with the dataset's name, ingest section and served model id; then shrunk for CI."""
    data = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())
    data["name"] = f"kind-{kind}"
    data["storage"] = str(folder / "runs")
    data["ingest"] = {"source": str(folder), "splits": {"train": "train.jsonl", "test": "test.jsonl"},
                      "format": "alpaca", "columns": {"input": "input", "output": "output"},
                      "instruction": INSTRUCTIONS[kind]}
    data["serve"]["llm_config"]["model_loading_config"]["model_id"] = f"kind-{kind}"
    data["evaluate"].pop("task")
    if kind == "text":  # a text task has no decoding constraint (the demo's recipe asks for one)
        data["evaluate"].pop("constrained_decoding")
    # CI only:
    data["model"] = {"source": str(model)}
    data.pop("serve")
    data.pop("train")
    data["evaluate"].update(CI_EVALUATE)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- the hand count

def hand_call(text: str):
    """(name, slots, complete) of ``act(attr=value;attr=value)`` as the docs define it, or None."""
    text = text.strip()
    m = re.fullmatch(r"([^\s()\[\];=]+)\((.*)", text, re.S)
    if m is None:
        return None
    name, rest = m.groups()
    if not rest.endswith(")"):
        return name, set(), False
    body, slots = rest[:-1].strip(), set()
    if not body:
        return name, slots, True
    for part in body.split(";"):
        attr, eq, value = part.partition("=")
        attr = attr.strip()
        if not eq and attr.endswith("[]"):  # attr[]: a value-less slot
            attr, allowed = attr[:-2].rstrip(), r"[^\s()\[\];=]+"
        else:  # attr=value, or attr alone (which holds none of the characters any syntax writes a value with)
            allowed = r"[^\s()\[\];=]+" if eq else r"[^\s=:;,()\[\]{}]+"
        if not re.fullmatch(allowed, attr):
            return name, slots, False
        slots.add((attr, value.strip()))
    return name, slots, True


def ratio(tp, got, expected):
    p = tp / got if got else 0.0
    r = tp / expected if expected else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def squash(text: str) -> str:
    """Lower case, whitespace runs as one space, none around brackets, commas, colons and the like."""
    return re.sub(r"\s*([()\[\]{},;:=])\s*", r"\1", " ".join(text.lower().split()))


def hand_scores(kind: str, expected: list[str], got: list[str]) -> dict[str, float]:
    n = len(expected)
    out = {"exact_match": sum(e == g for e, g in zip(expected, got, strict=True)) / n}
    if kind == "call":
        pe, pg = [hand_call(e) for e in expected], [hand_call(g) for g in got]
        out["normalized_exact_match"] = sum(squash(e) == squash(g) for e, g in zip(expected, got, strict=True)) / n
        out["function_accuracy"] = sum(bool(e and g and e[0] == g[0]) for e, g in zip(pe, pg, strict=True)) / n
        es, gs = [e[1] if e else set() for e in pe], [g[1] if g else set() for g in pg]
        counts = ratio(sum(len(e & g) for e, g in zip(es, gs, strict=True)), sum(map(len, gs)), sum(map(len, es)))
        out |= {f"slot_{k}": v for k, v in counts.items()}
        out["parse_failure_rate"] = sum(g is None or not g[2] for g in pg) / n
    elif kind == "label":
        e, g = [x.strip() for x in expected], [x.strip() or None for x in got]
        out["accuracy"] = sum(a == b for a, b in zip(e, g, strict=True)) / n
        f1s = []
        for lab in set(e) | {x for x in g if x is not None}:
            tp = sum(a == b == lab for a, b in zip(e, g, strict=True))
            f1s.append(ratio(tp, g.count(lab), e.count(lab))["f1"])
        out["macro_f1"] = sum(f1s) / len(f1s)
    else:
        out["normalized_exact_match"] = sum(squash(e) == squash(g) for e, g in zip(expected, got, strict=True)) / n
        f1 = []
        for e, g in zip(expected, got, strict=True):
            et, gt = e.lower().split(), g.lower().split()
            common = sum((Counter(et) & Counter(gt)).values())
            f1.append(float(et == gt) if not et or not gt else
                      0.0 if not common else 2 * common / (len(et) + len(gt)))
        out["token_f1"] = sum(f1) / n
    return out


# ---------------------------------------------------------------- the runs

@pytest.fixture(scope="module", params=list(DATASETS))
def kind_run(request, tiny_model, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(f"kind-{kind}")
    splits = DATASETS[kind]()
    write_dataset(folder, splits)
    path = recipe_for(kind, folder, tiny_model)
    proc = run_workflow("run", str(path), timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    return {"kind": kind, "proc": proc, "recipe": load_recipe(path), "splits": splits}


def test_each_kind_runs_by_yaml_alone_and_its_figures_are_the_hand_count(kind_run):
    kind, proc, recipe = kind_run["kind"], kind_run["proc"], kind_run["recipe"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = proc.stdout
    assert f"== {recipe.name}: done." in out and "variant" in out  # the closing summary and its metrics table
    run = Path(recipe.run_uri)
    assert (run / "report.html").is_file() and (run / "evaluate" / "report.md").is_file()
    check_run(kind, out, run, kind_run["splits"])


def check_run(kind: str, out: str, run: Path, splits: dict[str, list[dict]]) -> None:
    """The inferred kind, and every figure of metrics.json against the hand count of predictions.parquet."""
    import pyarrow.parquet as pq

    evaluate = json.loads((run / "evaluate" / "manifest.json").read_text())
    assert evaluate["summary"]["task"]["kind"] == kind
    assert re.search(rf"\[(ingest|evaluate)\] task: .*kind {kind!r}", out), out[-3000:]
    if kind == "call":
        syntax = evaluate["summary"]["task"]["syntax"]
        assert (syntax["assign"], syntax["separator"]) == ("=", ";")
        # The three misfits are counted, and shown on the console.
        assert re.search(r"task: .*\b203\b.*'bye'", out), out[-3000:]
    results = json.loads((run / "evaluate" / "metrics.json").read_text())
    variants = {v for v in results if not v.endswith("+constrained")}
    assert "base" in variants
    assert set(results) == variants | ({f"{v}+constrained" for v in variants} if kind != "text" else set())
    table = pq.read_table(run / "evaluate" / "predictions.parquet").to_pandas()
    for variant, result in results.items():
        rows = table[table["variant"] == variant].sort_values("row_id")
        assert rows["expected"].tolist() == [r["output"] for r in splits["test"]]
        by_hand = hand_scores(kind, rows["expected"].tolist(), rows["generated_text"].tolist())
        reported = {k: v for k, v in result["metrics"].items() if k in by_hand}
        assert reported == pytest.approx(by_hand), (variant, rows["generated_text"].tolist())
        assert set(by_hand) <= set(result["metrics"])
    report_md = (run / "evaluate" / "report.md").read_text()
    for name in next(iter(results.values()))["metrics"]:  # each metric's line in the legend
        assert f"- `{name}`: " in report_md
