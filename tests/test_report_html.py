"""The run report page (workflow/report_html.py): its sections, its self-containment, and how headless
Chromium renders it.

The full run is built without running the pipeline: hand-written manifests for the five stages, the
evaluate outputs written by the evaluation's own report functions on a small predictions table, a
smoke check in the serve stage's form. Chromium is Debian's ``chromium`` package (``.ci/run``
installs it); without it the browser test skips, unless ``WORKFLOW_REQUIRE_CHROMIUM`` is set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ingest_only_recipe

CHROMIUM = "/usr/bin/chromium"
REF = "inform(name[Tom Clancy's The Division], genres[role-playing, shooter], rating[poor])"
PLANTED = "<script>alert('x')</script> & Co"  # an input that must reach the page as text
SECTIONS = ("Lineage", "Training", "Evaluation", "Worst errors", "Serving", "Parity")
WINDOW = (1200, 2400)


def _stage(run: str, stage: str, inputs: dict, outputs: dict, summary: dict) -> dict:
    from workflow.core import manifest

    return manifest.write(f"{run}/{stage}", stage=stage, run="report-run", config={"stage": stage}, inputs=inputs,
                          outputs=outputs, started_at=manifest.now(), summary=summary)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> str:
    """A run whose five stages look completed, with real evaluate outputs; returns its folder."""
    import pyarrow as pa

    from workflow.config.evaluate import EvaluateConfig
    from workflow.config.task import TaskConfig
    from workflow.core import storage
    from workflow.evaluation import report, tasks

    run = str(tmp_path_factory.mktemp("report") / "runs" / "report-run")
    ingest = _stage(run, "ingest", {"source": "0f" * 32}, {"test": f"{run}/ingest/test.jsonl"},
                    {"rows": {"train": 40, "test": 3}, "format": "alpaca"})
    model = _stage(run, "model", {}, {"model": f"{run}/model/weights"}, {"kind": "tiny"})
    adapter = f"{run}/train/adapters/report-run"
    # LLaMA-Factory's trainer state with no training_loss.png beside it: the page draws the curve itself.
    storage.write_json(f"{adapter}/trainer_state.json",
                       {"log_history": [{"step": s, "loss": 3.0 / s} for s in range(1, 9)] + [{"step": 8}]})
    train = _stage(run, "train", {"ingest": ingest["fingerprint"], "model": model["fingerprint"]},
                   {"adapter": adapter, "adapters_dir": f"{run}/train/adapters"},
                   {"adapter_name": "report-run", "lora_rank": 8, "global_step": 8, "final_loss": 0.375})

    task = tasks.build(TaskConfig(kind="call"), None)
    close = "inform(name[Tom Clancy's The Division], genres[role-playing, shooter], rating[average])"
    answers = {"base": ["garbage", "nothing", "x"], "adapter:report-run": [REF, close, "inform(name[x])"]}
    table = pa.Table.from_pylist([
        {"row_id": i, "variant": v, "seed": None, "input": PLANTED if i == 2 else f"sentence {i}", "expected": REF,
         "generated_text": got, "error": "", "num_generated_tokens": 5}
        for v, got_all in answers.items() for i, got in enumerate(got_all)])
    results = report.score(table, task, bootstrap=100)
    out = Path(run) / "evaluate"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(results))
    (out / "report.md").write_text(report.markdown_report("report-run", results, table, EvaluateConfig(), task))
    report.chart(results, list(task.metrics), out / "metrics.png")
    (out / "parity.json").write_text(json.dumps({"report-run": {  # as workflow/evaluation/parity.py compares
        "rows": 3, "identical": 2, "share_identical": 2 / 3, "mean_common_prefix": 9.3,
        "mismatches": [{"row": 1, "position": 7, "reference": "poor", "engine": "average"}]}}))
    evaluate = _stage(run, "evaluate", {"ingest": ingest["fingerprint"], "train": train["fingerprint"]},
                      {n: f"{out}/{n}" for n in ("metrics.json", "report.md", "metrics.png")},
                      {"rows": 3, "main_metric": task.main_metric})

    smoke = {"base_url": "http://127.0.0.1:8000/v1", "model_ids": ["report-run", "report-run:report-run"],
             "models": {"report-run": {"answered": True, "exact": 0, "mean_similarity": 0.12,
                                       "samples": [{"answer": "x", "target": REF, "similarity": 0.12}]},
                        "report-run:report-run": {"answered": True, "exact": 1, "mean_similarity": 1.0,
                                                  "beats_base": True,
                                                  "samples": [{"answer": REF, "target": REF, "similarity": 1.0}]}},
             "passed": True, "problems": []}
    storage.write_json(f"{run}/serve/smoke.json", smoke)
    _stage(run, "serve", {"train": train["fingerprint"], "evaluate": evaluate["fingerprint"]},
           {"smoke": f"{run}/serve/smoke.json", "endpoint": f"{run}/serve/endpoint.json"},
           {"model_ids": smoke["model_ids"], "base_url": smoke["base_url"]})
    return run


def outside_references(page: str) -> list[str]:
    """Attributes that would make the browser fetch something from outside the page."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)[^"'\s>]*""", page, flags=re.IGNORECASE)


def test_the_page_has_every_section_escaped_text_and_nothing_from_outside(full_run):
    from workflow.report_html import render
    from workflow.show import lineage

    page = render(full_run)
    assert [s for s in SECTIONS if f"<h2>{s}</h2>" not in page] == []
    assert outside_references(page) == [] and "<script" not in page.lower() and "<link" not in page.lower()
    assert outside_references('<img src="https://x/y.png">') != []  # the check sees one
    for m in lineage(full_run).values():
        assert m["fingerprint"][:12] in page and m["finished_at"] in page
    assert page.count('src="data:image/png;base64,') == 2  # the drawn loss curve and metrics.png
    assert "not run" not in page and "passed" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Co" in page  # a worst error, escaped
    assert "report-run.share_identical" in page and "<th>position</th>" in page  # evaluate/parity.json


def test_each_metric_row_says_in_one_line_what_the_metric_is(full_run):
    from workflow.evaluation import metrics
    from workflow.report_html import render

    page = render(full_run)
    call_metrics = metrics.METRICS["call"]
    for name in ("exact_match", "function_accuracy", "slot_f1"):
        row = re.search(rf"<tr><td>{name}</td>.*?</tr>", page)
        assert row and f"<td class=meta>{_escaped(call_metrics[name].definition)}</td>" in row[0], name
    assert "<th>what it is</th>" in page


def _escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_a_run_with_only_ingest_renders_the_rest_as_not_run(tmp_path):
    from workflow.report_html import render

    run = str(tmp_path / "only-ingest")
    _stage(run, "ingest", {"source": "ab" * 32}, {"test": f"{run}/ingest/test.jsonl"}, {"rows": {"test": 1}})
    page = render(run)
    assert page.count("not run") == 4 + 3  # model, train, evaluate, serve in the lineage; three sections
    assert "<h2>Parity</h2>" not in page and outside_references(page) == []


def test_the_page_is_written_into_a_bucket(s3_bucket):
    from workflow.core import storage
    from workflow.report_html import write_report

    run = f"{s3_bucket}/runs/in-a-bucket"
    _stage(run, "ingest", {"source": "cd" * 32}, {"test": f"{run}/ingest/test.jsonl"}, {"rows": {"test": 1}})
    assert write_report(run) == f"{run}/report.html"
    assert "<h2>Lineage</h2>" in storage.read_text(f"{run}/report.html")


def test_show_html_writes_the_page_where_asked(full_run, tmp_path, capsys):
    from workflow.cli import main

    assert main(["show", full_run, "--html", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'page.html'}"
    assert "<h2>Lineage</h2>" in (tmp_path / "page.html").read_text()
    assert main(["show", full_run, "--html"]) == 0
    assert (Path(full_run) / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_workflow_run_writes_the_report_and_names_it(tmp_path):
    recipe = ingest_only_recipe(tmp_path, "paged")
    proc = subprocess.run([sys.executable, "-m", "workflow", "run", str(recipe), "--stages", "ingest"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = tmp_path / "runs" / "paged" / "report.html"
    assert f"report    {page}" in proc.stdout
    assert "<h2>Lineage</h2>" in page.read_text() and page.read_text().count("not run") == 7


def test_chromium_renders_the_page_without_console_errors(full_run, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("WORKFLOW_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is missing and WORKFLOW_REQUIRE_CHROMIUM is set: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; WORKFLOW_REQUIRE_CHROMIUM=1 makes this fail)")
    import numpy as np
    from PIL import Image

    from workflow.report_html import write_report

    page = Path(write_report(full_run))
    # The test's copy reports, once loaded, any image the browser could not decode (the page has no script).
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", (
        "<script>window.onload = () => { const broken = [...document.images].filter(i => !i.naturalWidth);"
        " console.log(`report check: ${document.images.length} images, ${broken.length} broken`); };"
        "</script></body>")))
    for html_file, screenshot in ((checked, tmp_path / "checked.png"), (page, Path(full_run) / "report.png")):
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                               "--enable-logging=stderr", "--v=0", html_file.as_uri()],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
        expected = ['"report check: 2 images, 0 broken"'] if html_file == checked else []
        assert [line.split("] ", 1)[1].split(", source:")[0] for line in console] == expected, console
    image = np.asarray(Image.open(Path(full_run) / "report.png").convert("RGB"))
    assert image.shape[:2] == (WINDOW[1], WINDOW[0])
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50, len(colours)  # text, tables, the two charts: not a blank or single-colour page
    assert (image != 255).any(axis=2).mean() > 0.05  # a good part of the page is not white
