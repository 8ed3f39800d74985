"""Ingest stage: sources (local, http, S3), formats, validation, splits, LLaMA-Factory's dataset_info."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import workflow.stages.ingest as ingest
from workflow.config import load_recipe
from workflow.config.evaluate import ConstrainedDecoding
from workflow.core import storage
from workflow.core.errors import WorkflowError
from workflow.core.stage import StageContext, execute

REPO = Path(__file__).resolve().parents[2]
VIGGO = REPO / "data" / "viggo"
VIGGO_RECIPE = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())


def run_ingest(tmp_path, ingest_cfg, *, storage_uri=None, name="t", force=False):
    recipe = {"name": name, "storage": storage_uri or str(tmp_path / "runs"), "model": {"source": "tiny"},
              "ingest": ingest_cfg}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = load_recipe(path)
    execute(ingest, StageContext(recipe=r, stage="ingest", force=force))
    return r


def read_jsonl(uri):
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def test_viggo_cpu_recipe_writes_all_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKFLOW_STORAGE", str(tmp_path / "runs"))
    r = load_recipe(REPO / "recipes" / "viggo-cpu.yaml")
    m = execute(ingest, StageContext(recipe=r, stage="ingest"))
    assert m["summary"]["rows"] == {"train": 5103, "val": 714, "test": 1083}
    out = Path(r.run_uri) / "ingest"
    assert sum(1 for _ in open(out / "test.jsonl")) == 1083
    row = json.loads(open(out / "train.jsonl").readline())
    assert row["instruction"].startswith("Given a target sentence") and row["output"].startswith("inform(")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["train"] == {"file_name": "train.jsonl", "formatting": "alpaca",
                             "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    # Every ViGGO training output is a call in the default syntax (value-less slots such as
    # player_perspective[] included): the task is recorded with its evidence, beside the split counts.
    task = m["summary"]["task"]
    assert json.loads((out / "stats.json").read_text())["task"] == task
    assert {k: task[k] for k in ("task", "kind", "from", "outputs", "fit", "misfits", "misfit_examples")} == {
        "task": {"kind": "call"}, "kind": "call", "from": "training", "outputs": 5103, "fit": 5103, "misfits": 0,
        "misfit_examples": []}


def run_ingest_with_evaluate(tmp_path, rows, evaluate, *, name="t"):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in rows))
    recipe = {"name": name, "storage": str(tmp_path / "runs"), "model": {"source": "tiny"},
              "ingest": {"source": str(src), "instruction": "Do.", "split_ratios": {"train": 1.0}},
              "evaluate": evaluate}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = load_recipe(path)
    return r, execute(ingest, StageContext(recipe=r, stage="ingest"))


def test_the_inferred_task_is_printed_and_written_with_how_to_pin_it(tmp_path, capsys):
    rows = [(f"sentence {i}", label) for i, label in enumerate(["yes", "no", "maybe"] * 20)]
    _, m = run_ingest_with_evaluate(tmp_path, rows, {"constrained_decoding": {}})
    task = m["summary"]["task"]
    assert (task["task"], task["from"], task["outputs"], task["fit"], task["misfits"]) == (
        {"kind": "label"}, "training", 60, 60, 0)
    said = [line for line in capsys.readouterr().out.splitlines() if "[ingest] task:" in line]
    assert len(said) == 1 and "inferred kind 'label' from 60 training outputs" in said[0]
    assert 'to pin it, set evaluate.task: {"kind": "label"}' in said[0]


def test_an_evaluate_section_the_data_contradicts_fails_in_ingest_before_anything_is_written(tmp_path, capsys):
    rows = [(f"s{i}", text) for i, text in enumerate(["The cat sat on the mat.", "A dog ran in the park.",
                                                      "Rain fell all night.", "She read by the window."])]
    with pytest.raises(WorkflowError, match=r"evaluate\.task \(inferred from the training outputs, which read as "
                                            r"'text'\): a text task has no decoding constraint"):
        run_ingest_with_evaluate(tmp_path, rows, {"constrained_decoding": {}})
    assert not (tmp_path / "runs" / "t" / "ingest").exists() or not any((tmp_path / "runs" / "t" / "ingest").iterdir())
    # An explicit evaluate.task wins over what the data reads as: the same outputs as a label task pass.
    _, m = run_ingest_with_evaluate(tmp_path, rows, {"constrained_decoding": {}, "task": {"kind": "label"}},
                                    name="pinned")
    assert m["summary"]["task"]["kind"] == "text"
    assert "[ingest] warning: evaluate.task is a label task, and the training outputs read as 'text'" in \
        capsys.readouterr().out


def test_a_skipped_ingest_is_checked_against_a_changed_evaluate_section_at_the_start_of_a_run(tmp_path):
    """The ingest stage that is up to date does not run, so workflow run checks its recorded task itself."""
    from workflow.preflight import check_skipped_ingest

    rows = [(f"s{i}", text) for i, text in enumerate(["The cat sat on the mat.", "A dog ran in the park."])]
    first, _ = run_ingest_with_evaluate(tmp_path, rows, {})
    check_skipped_ingest(first)  # the recipe the data was read with: nothing to say
    changed = first.model_copy(update={"evaluate": first.evaluate.model_copy(
        update={"constrained_decoding": ConstrainedDecoding()})})
    changed._path = first.path
    with pytest.raises(WorkflowError, match=r"a text task has no decoding constraint"):
        check_skipped_ingest(changed)
    # Data that changed since is read again by the ingest stage, which checks then: nothing is said here.
    (tmp_path / "d.jsonl").write_text(json.dumps({"input": "x", "output": "yes"}) + "\n")
    check_skipped_ingest(changed)


def test_rerun_is_skipped_and_force_reruns(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"q": f"x{i}", "a": f"y{i}"}) + "\n" for i in range(10)))
    cfg = {"source": str(src), "columns": {"input": "q", "output": "a"}, "instruction": "Do it."}
    run_ingest(tmp_path, cfg)
    run_ingest(tmp_path, cfg)
    assert "up to date" in capsys.readouterr().out
    run_ingest(tmp_path, cfg, force=True)
    assert "up to date" not in capsys.readouterr().out
    # A changed source invalidates the manifest.
    src.write_text(src.read_text() + json.dumps({"q": "new", "a": "row"}) + "\n")
    run_ingest(tmp_path, cfg)
    assert "up to date" not in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_file_format(tmp_path, fmt):
    rows = [{"sentence": f"s{i}", "mr": f"inform(name[g{i}])"} for i in range(20)]
    src = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        src.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(src, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["sentence", "mr"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), src)
    r = run_ingest(tmp_path, {"source": str(src), "columns": {"input": "sentence", "output": "mr"},
                              "instruction": "Parse.", "split_ratios": {"train": 0.5, "val": 0.25, "test": 0.25}})
    out = Path(r.run_uri) / "ingest"
    train = read_jsonl(str(out / "train.jsonl"))
    assert len(train) == 10 and len(read_jsonl(str(out / "val.jsonl"))) == 5 and len(read_jsonl(str(out / "test.jsonl"))) == 5
    assert train[0] == {"instruction": "Parse.", "input": "s0", "output": "inform(name[g0])"}


def test_http_source(tmp_path, http_server):
    served = tmp_path / "site"
    shutil.copytree(VIGGO, served)
    base = http_server(served)
    cfg = dict(VIGGO_RECIPE["ingest"], source=base + "/", max_samples=50)
    r = run_ingest(tmp_path, cfg)
    m = json.loads((Path(r.run_uri) / "ingest" / "manifest.json").read_text())
    assert m["summary"]["rows"] == {"train": 50, "val": 50, "test": 50}
    assert m["summary"]["stats"]["test"]["source"] == base + "/test.csv"


def test_s3_source_and_s3_storage(tmp_path, s3_bucket):
    import boto3

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for name in ("train.csv", "valid.csv", "test.csv"):
        s3.upload_file(str(VIGGO / name), bucket, f"viggo/{name}")
    cfg = dict(VIGGO_RECIPE["ingest"], source=f"{s3_bucket}/viggo")
    r = run_ingest(tmp_path, cfg, storage_uri=f"{s3_bucket}/runs")
    out = f"{s3_bucket}/runs/t/ingest"
    assert len(read_jsonl(out + "/test.jsonl")) == 1083
    assert set(storage.list_files(out)) == {"train.jsonl", "val.jsonl", "test.jsonl", "dataset_info.json",
                                            "stats.json", "manifest.json"}
    assert r.run_uri == f"{s3_bucket}/runs/t"


def test_sharegpt_from_messages_and_from_columns(tmp_path):
    src = tmp_path / "chat.jsonl"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}]
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    src.write_text(json.dumps({"conv": convo}) + "\n" + json.dumps({"conv": bad}) + "\n")
    r = run_ingest(tmp_path, {"source": str(src), "format": "sharegpt", "columns": {"messages": "conv"},
                              "split_ratios": {"train": 1.0}}, name="chat")
    out = Path(r.run_uri) / "ingest"
    assert read_jsonl(str(out / "train.jsonl")) == [{"system": "Be brief.", "messages": convo[1:]}]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_before_split"] == {"messages not alternating user/assistant ending with assistant": 1}
    info = json.loads((out / "dataset_info.json").read_text())["train"]
    assert info["formatting"] == "sharegpt" and info["columns"] == {"messages": "messages", "system": "system"}

    src2 = tmp_path / "qa.jsonl"
    src2.write_text(json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    r2 = run_ingest(tmp_path, {"source": str(src2), "format": "sharegpt", "columns": {"input": "q", "output": "a"},
                               "instruction": "Answer.", "split_ratios": {"train": 1.0}}, name="qa")
    assert read_jsonl(str(Path(r2.run_uri) / "ingest" / "train.jsonl")) == [
        {"messages": [{"role": "user", "content": "Answer.\n2+2?"}, {"role": "assistant", "content": "4"}]}]


# ---------------------------------------------------------------- bad input

def test_malformed_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": \n')
    with pytest.raises(WorkflowError, match=r"d\.jsonl:2: not valid JSON"):
        run_ingest(tmp_path, {"source": str(src), "instruction": "x"})
    assert not (tmp_path / "runs" / "t" / "ingest" / "manifest.json").exists()


def test_missing_column_names_column_and_alternatives(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"sentence": "a", "mr": "b"}) + "\n")
    with pytest.raises(WorkflowError, match=r"missing column 'ref' \(mapped to input\).*\['mr', 'sentence'\].*ingest\.columns\.input"):
        run_ingest(tmp_path, {"source": str(src), "columns": {"input": "ref", "output": "mr"}, "instruction": "x"})


def test_empty_file(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n")
    with pytest.raises(WorkflowError, match=r"d\.jsonl: the file is empty"):
        run_ingest(tmp_path, {"source": str(src)})


def test_missing_file(tmp_path):
    with pytest.raises(WorkflowError, match=r"nope\.jsonl: file not found"):
        run_ingest(tmp_path, {"source": str(tmp_path / "nope.jsonl")})


def test_invalid_rows_are_dropped_with_reasons_or_fail(tmp_path):
    rows = [{"input": "ok", "output": "fine"}, {"input": "x", "output": ""}, {"input": "y", "output": 3},
            {"input": "z", "output": None}, {"input": 5, "output": "w"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_ingest(tmp_path, {"source": str(src), "instruction": "Do.", "split_ratios": {"train": 1.0}})
    stats = json.loads((Path(r.run_uri) / "ingest" / "stats.json").read_text())
    assert stats["dropped_before_split"] == {"empty output": 2, "non-string output": 1, "non-string input": 1}
    assert stats["train"]["kept"] == 1
    with pytest.raises(WorkflowError, match=r"d\.jsonl: row 2: empty output.*on_invalid: drop"):
        run_ingest(tmp_path, {"source": str(src), "instruction": "Do.", "on_invalid": "fail",
                              "split_ratios": {"train": 1.0}}, name="strict")


def test_object_and_list_outputs_are_kept_as_canonical_json_text(tmp_path):
    rows = [{"input": "a", "output": {"b": [1, 2], "a": "é"}}, {"input": "b", "output": ["x", {"k": None}]},
            {"input": "c", "output": "plain"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_ingest(tmp_path, {"source": str(src), "instruction": "Extract.", "splits": None,
                              "split_ratios": {"train": 1.0}})
    written = read_jsonl(f"{r.run_uri}/ingest/train.jsonl")
    assert [w["output"] for w in written] == ['{"a":"é","b":[1,2]}', '["x",{"k":null}]', "plain"]
    stats = json.loads((Path(r.run_uri) / "ingest" / "stats.json").read_text())
    assert stats["json_outputs"]["rows"] == 2 and "canonical JSON" in stats["json_outputs"]["written_as"]
    assert stats["dropped_before_split"] == {}


def test_max_samples_and_seeded_shuffle(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"input": f"i{i}", "output": f"o{i}"}) + "\n" for i in range(100)))
    cfg = {"source": str(src), "instruction": "x", "shuffle": True, "seed": 7, "max_samples": {"train": 10},
           "split_ratios": {"train": 0.8, "test": 0.2}}
    a = read_jsonl(str(Path(run_ingest(tmp_path, cfg, name="a").run_uri) / "ingest" / "train.jsonl"))
    b = read_jsonl(str(Path(run_ingest(tmp_path, cfg, name="b").run_uri) / "ingest" / "train.jsonl"))
    c = read_jsonl(str(Path(run_ingest(tmp_path, dict(cfg, seed=8), name="c").run_uri) / "ingest" / "train.jsonl"))
    assert len(a) == 10 and a == b and a != c
    assert [r["input"] for r in a] != [f"i{i}" for i in range(10)]


def test_cli_reports_one_line_and_exit_code(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"input": "a", "output": "b"}\nnot json\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path / "runs"), "model": {"source": "tiny"},
                                      "ingest": {"source": str(src), "instruction": "x"}}))
    proc = subprocess.run([sys.executable, "-m", "workflow", "ingest", str(recipe)], capture_output=True, text=True,
                          env={**__import__("os").environ, "WORKFLOW_SERVE_PYTHON": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {src}:2: not valid JSON (Expecting value at column 1) (fix or remove that line)"]
    assert "Traceback" not in proc.stderr


@pytest.mark.train_env
def test_llamafactory_reads_the_ingested_dataset(tmp_path, tiny_model):
    """LLaMA-Factory's own loader accepts dataset_info.json and the JSONL splits."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    r = run_ingest(tmp_path, dict(VIGGO_RECIPE["ingest"], source=str(VIGGO), max_samples=40))
    model_args, data_args, training_args, finetuning_args, _ = get_train_args({
        "model_name_or_path": str(tiny_model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "train", "eval_dataset": "val", "dataset_dir": str(Path(r.run_uri) / "ingest"), "template": "qwen",
        "cutoff_len": 512, "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none",
        "preprocessing_num_workers": 1,
    })
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    data = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)
    assert len(data["train_dataset"]) == 40 and len(data["eval_dataset"]) == 40
    labels = [t for t in data["train_dataset"][0]["labels"] if t != -100]
    decoded = tokenizer_module["tokenizer"].decode(labels)
    assert decoded.startswith("inform(name[") and decoded.endswith(")<|im_end|>\n")


def test_prompts_are_held_against_max_model_len_and_cutoff_len_when_the_tokenizer_is_at_hand(tmp_path, tiny_model,
                                                                                             capsys):
    """A local base model's tokenizer is read before the model stage: a prompt past the evaluate engine's
    max_model_len (an error row there) and a training row past cutoff_len (truncated by LLaMA-Factory) are
    counted in one line each; a split whose every prompt is too long fails here."""
    from transformers import AutoTokenizer

    from workflow.prompts.guard import chat_template_prompt_ids

    short, long = "Portal is fun.", " ".join(["word"] * 150)
    rows = [{"input": short, "output": "inform(name[Portal])", "split": s} for s in ("train", "test")] + [
        {"input": long, "output": "inform(name[x])", "split": s} for s in ("train", "test")]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"input": r["input"], "output": r["output"]}) + "\n"
                                                         for r in rows if r["split"] == split))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [len(chat_template_prompt_ids(tokenizer, [{"role": "user", "content": f"Parse.\n{text}"}]))
               for text in (short, long)]
    assert lengths[0] < 100 < lengths[1]  # the limits below sit between the two

    def recipe(name, max_model_len):
        data = {"name": name, "storage": str(tmp_path / "runs"), "model": {"source": str(tiny_model)},
                "ingest": {"source": str(tmp_path), "splits": {"train": "train.jsonl", "test": "test.jsonl"},
                           "instruction": "Parse."},
                "train": {"llamafactory": {"stage": "sft", "finetuning_type": "lora", "cutoff_len": 100}},
                "evaluate": {"task": {"kind": "call"}, "sampling_params": {"temperature": 0.0, "max_tokens": 16},
                             "processor": {"engine_kwargs": {"max_model_len": max_model_len}}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        return load_recipe(tmp_path / f"{name}.yaml")

    execute(ingest, StageContext(recipe=recipe("fits", 100), stage="ingest"))
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(said) == 2, said
    assert f"1 of 2 'train' rows (prompt and answer) are longer than train.llamafactory.cutoff_len (100 tokens; " \
           f"the longest {lengths[1] + len(tokenizer('inform(name[x])')['input_ids']) + 1})" in said[0]
    assert (f"1 of 2 'test' prompts are longer than evaluate.processor.engine_kwargs.max_model_len (100 tokens; the "
            f"longest {lengths[1]}): the engine answers them with an error") in said[1]
    with pytest.raises(WorkflowError, match=r"max_model_len is 8 tokens and every prompt of the 'test' split is "
                                             rf"longer \(the shortest {lengths[0]}\)"):
        execute(ingest, StageContext(recipe=recipe("none-fits", 8), stage="ingest"))
