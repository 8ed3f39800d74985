"""The run report: one self-contained HTML page (``<run>/report.html``, ``workflow show --html``).

Built from what the run already holds — each stage's manifest (``show.lineage``) and its outputs:
the lineage with fingerprints and finish times, the training loss curve, the evaluation metrics with
their intervals and chart, the worst errors, the serving smoke check and, where a stage wrote one,
the parity check. Images are inline (base64 data URIs), the CSS is inline and scoped to the page's
own class (a notebook shows the page inline without restyling itself), there is no script and no
external URL. A stage that has not run is shown as "not run".
"""

from __future__ import annotations

import base64
import html
import io
import json
import re

from .core import manifest, storage
from .core.secrets import redact
from .evaluation.report import score_text
from .show import lineage
from .stages import ORDER

REPORT = "report.html"
# What each stage's manifest summary says about its link in the chain, and what the stage stands for.
LINEAGE = {
    "ingest": ("dataset", ("rows", "format")),
    "model": ("base model", ("kind", "source", "revision")),
    "train": ("adapter", ("adapter_name", "lora_rank", "global_step", "final_loss")),
    "evaluate": ("evaluation", ("rows", "main_metric", "errors")),
    "serve": ("endpoint", ("model_ids", "base_url")),
}
CSS = """
.wf-report { font: 14px/1.45 system-ui, sans-serif; color: #1d2430; max-width: 1100px; margin: 0 auto; padding: 12px 20px; background: #fff; }
.wf-report h1 { font-size: 22px; margin: 4px 0; }
.wf-report h2 { font-size: 17px; margin: 26px 0 8px; padding-bottom: 3px; border-bottom: 2px solid #3b6fb6; color: #24497a; }
.wf-report h3 { font-size: 14px; margin: 14px 0 6px; }
.wf-report table { border-collapse: collapse; margin: 6px 0; }
.wf-report th, .wf-report td { border: 1px solid #c9d2de; padding: 3px 8px; text-align: left; vertical-align: top; }
.wf-report th { background: #e8eef7; }
.wf-report td.num { text-align: right; font-variant-numeric: tabular-nums; }
.wf-report code, .wf-report .mono { font: 12px ui-monospace, monospace; word-break: break-all; }
.wf-report .meta { color: #5a6473; }
.wf-report .done { color: #1d7a36; font-weight: 600; }
.wf-report .missing { color: #9a5b00; font-weight: 600; }
.wf-report .failed { color: #b3261e; font-weight: 600; }
.wf-report img { max-width: 100%; border: 1px solid #c9d2de; }
"""


def write_report(run_uri: str, dest: str | None = None) -> str:
    """Render the run's page and write it (atomically) to ``dest``, by default ``<run>/report.html``."""
    dest = dest or storage.join(run_uri, REPORT)
    storage.write_text(dest, redact(render(run_uri)))  # the same masking as logs and manifests
    return dest


def render(run_uri: str) -> str:
    stages = lineage(run_uri)
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    body = [f"<h1>Run {_e(name)}</h1>",
            f"<p class=meta>storage <code>{_e(run_uri)}</code> · report written {_e(manifest.now())}</p>",
            _lineage_section(stages), _training_section(stages.get("train")),
            _evaluation_section(stages.get("evaluate")), _serving_section(stages.get("serve")),
            _parity_section(run_uri, stages)]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>Run {_e(name)}</title><style>{CSS}</style></head>\n"
            "<body><div class=wf-report>\n" + "\n".join(part for part in body if part) + "\n</div></body></html>\n")


def _lineage_section(stages: dict[str, dict]) -> str:
    by_fingerprint = {m["fingerprint"]: s for s, m in stages.items()}
    rows = []
    for stage in ORDER:
        what, facts = LINEAGE[stage]
        m = stages.get(stage)
        if m is None:
            rows.append(f"<tr><td><b>{stage}</b><br>{what}</td><td class=missing>not run</td>"
                        "<td></td><td></td><td></td><td></td></tr>")
            continue
        inputs = "<br>".join(
            f"{_e(k)} <code>{_e(str(v)[:12])}</code>"
            + (f" ← {_e(by_fingerprint[v])}" if v in by_fingerprint else "") for k, v in m["inputs"].items())
        summary = m.get("summary", {})
        shown = "<br>".join(f"{_e(k)}: {_e(_short(summary[k]))}" for k in facts if k in summary)
        outputs = "<br>".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in m["outputs"].items())
        rows.append(f"<tr><td><b>{stage}</b><br>{what}</td><td><span class=done>done</span><br><span class=meta>"
                    f"{_e(m['finished_at'])}</span></td><td><code>{_e(m['fingerprint'][:12])}</code></td>"
                    f"<td>{inputs}</td><td>{shown}</td><td>{outputs}</td></tr>")
    return ("<h2>Lineage</h2><p class=meta>dataset → model → adapter → evaluation → endpoint; each stage's "
            "inputs name the fingerprints of the stages it read.</p><table><tr><th>stage</th><th>status</th>"
            "<th>fingerprint</th><th>inputs</th><th>summary</th><th>outputs</th></tr>"
            + "".join(rows) + "</table>")


def _training_section(train: dict | None) -> str:
    if train is None:
        return "<h2>Training</h2><p class=missing>not run</p>"
    adapter = train["outputs"]["adapter"]
    summary = train.get("summary", {})
    facts = ", ".join(f"{k} {_short(summary[k])}" for k in ("global_step", "final_loss", "train_samples_per_second")
                      if k in summary)
    png = _read(storage.join(adapter, "training_loss.png")) or _loss_chart(_read(storage.join(adapter,
                                                                                               "trainer_state.json")))
    curve = _image(png, "training loss") if png else "<p class=meta>no loss curve recorded for this adapter</p>"
    return f"<h2>Training</h2><p>adapter <code>{_e(adapter)}</code>{' · ' + _e(facts) if facts else ''}</p>{curve}"


def _loss_chart(trainer_state: bytes | None) -> bytes | None:
    """The loss curve drawn from the trainer's logged losses, where LLaMA-Factory drew none (``plot_loss``
    off)."""
    points = [(e["step"], e["loss"]) for e in json.loads(trainer_state).get("log_history", [])
              if "loss" in e] if trainer_state else []
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points, strict=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _evaluation_section(evaluate: dict | None) -> str:
    if evaluate is None:
        return "<h2>Evaluation</h2><p class=missing>not run</p>"
    outputs = evaluate["outputs"]
    results = json.loads(_read(outputs["metrics.json"]) or b"{}")
    parts = ["<h2>Evaluation</h2>"]
    report_md = (_read(outputs.get("report.md", "")) or b"").decode()
    if results:
        variants = list(results)
        names = list(next(iter(results.values()))["metrics"])
        definitions = metric_definitions_in_report(report_md)
        parts.append("<p class=meta>each cell: the score (±sd over seeds, where there are several) and its 95% bootstrap "
                     "interval over rows</p><table><tr>"
                     "<th>metric</th>" + "".join(f"<th>{_e(v)}</th>" for v in variants) + "<th>what it is</th></tr>")
        for n in names:
            parts.append(f"<tr><td>{_e(n)}</td>" + "".join(
                f"<td class=num>{_e(score_text(results[v], n))}</td>" for v in variants)
                + f"<td class=meta>{_e(definitions.get(n, ''))}</td></tr>")
        for key in ("rows", "errors", "generated_tokens"):
            parts.append(f"<tr><td>{key}</td>" + "".join(
                f"<td class=num>{_e(results[v].get(key, ''))}</td>" for v in variants) + "<td></td></tr>")
        parts.append("</table>")
    for chart in ("metrics.png", "confusion.png"):
        if chart in outputs and (png := _read(outputs[chart])):
            parts.append(_image(png, chart))
    worst = worst_errors_in_report(report_md)
    parts.append("<h2>Worst errors</h2>")
    if not worst:
        parts.append("<p class=meta>report.md lists none</p>")
    for variant, table in worst.items():
        parts.append(f"<h3>{_e(variant)}</h3>" + (_table(table[0], table[1:]) if table else
                                                   "<p class=meta>No wrong answers.</p>"))
    return "".join(parts)


def metric_definitions_in_report(report_md: str) -> dict[str, str]:
    """Each metric's one-line definition from ``report.md``'s legend ("Metrics, as computed here:", written by
    ``workflow/evaluation/report.py`` from the metrics' registered definitions)."""
    definitions, inside = {}, False
    for line in report_md.splitlines():
        if line.startswith("Metrics, as computed here:"):
            inside = True
        elif inside and (found := re.match(r"- `([^`]+)`: (.*)", line)):
            definitions[found[1]] = found[2]
        elif inside and line.strip():
            break
    return definitions


def worst_errors_in_report(report_md: str) -> dict[str, list[list[str]]]:
    """The "Worst errors" tables of ``report.md`` (``workflow/evaluation/report.py`` writes them): per variant,
    the header row and the rows (empty where the variant made no wrong answer)."""
    tables: dict[str, list[list[str]]] = {}
    variant, inside = None, False
    for line in report_md.splitlines():
        if line.startswith("## "):
            inside = line == "## Worst errors"
        elif inside and line.startswith("### "):
            variant = line[4:].strip()
            tables[variant] = []
        elif inside and variant and line.startswith("|") and set(line) - set("|-"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            tables[variant].append([c.strip().replace("\\|", "|") for c in cells])
    return tables


def _serving_section(serve: dict | None) -> str:
    if serve is None:
        return "<h2>Serving</h2><p class=missing>not run</p>"
    smoke = _smoke(serve)
    parts = ["<h2>Serving</h2>", f"<p>endpoint <code>{_e(serve.get('summary', {}).get('base_url', ''))}</code>"
             f" · models {_e(', '.join(serve.get('summary', {}).get('model_ids', [])))}</p>"]
    if not smoke:
        return "".join(parts) + "<p class=meta>no smoke check recorded</p>"
    verdict = "<span class=done>passed</span>" if smoke.get("passed") else "<span class=failed>failed</span>"
    parts.append(f"<h3>Smoke check: {verdict}</h3>")
    models = smoke.get("models", {})
    columns = sorted({k for r in models.values() for k in r if k != "samples"}, key=lambda k: (k != "answered", k))
    parts.append(_table(["model", *columns], [[m, *(_short(r.get(c, "")) for c in columns)]
                                              for m, r in models.items()]))
    parts += [f"<p class=failed>{_e(p)}</p>" for p in smoke.get("problems", [])]
    for model, r in models.items():
        samples = r.get("samples", [])
        if samples:
            parts.append(f"<details><summary>{_e(model)}: {len(samples)} answers</summary>"
                         + _table(["target", "answer"], [[s.get("target", ""), s.get("answer", "")]
                                                        for s in samples]) + "</details>")
    return "".join(parts)


def _parity_section(run_uri: str, stages: dict[str, dict]) -> str:
    """The parity results the evaluate stage (``evaluate/parity.json``) or the smoke check (its ``parity``)
    recorded, if either did."""
    found = {}
    if "evaluate" in stages and (data := _read(storage.join(run_uri, "evaluate", "parity.json"))):
        found["evaluate/parity.json"] = json.loads(data)
    if "parity" in (smoke := _smoke(stages.get("serve"))):
        found["serve/smoke.json: parity"] = smoke["parity"]
    if not found:
        return ""
    return "<h2>Parity</h2>" + "".join(f"<h3>{_e(where)}</h3>{_json_tables(data)}" for where, data in found.items())


def _smoke(serve: dict | None) -> dict:
    """The serve stage's ``smoke.json``; empty where it wrote none."""
    data = _read(serve["outputs"].get("smoke", "")) if serve else None
    return json.loads(data) if data else {}


def _json_tables(data) -> str:
    """A JSON document of unknown shape as tables: its scalars by dotted key, and each list of objects in
    it (a parity check's mismatching rows) as a table of its own."""
    scalars: list[list[str]] = []
    lists: list[str] = []

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(c for v in value for c in v))
            lists.append(f"<p>{_e(key)}</p>" + _table(columns, [[_short(v.get(c, "")) for c in columns]
                                                               for v in value]))
        else:
            scalars.append([key or "value", _short(value, 300)])

    walk(data, "")
    return (_table(["key", "value"], scalars) if scalars else "") + "".join(lists)


def _table(header: list[str], rows: list[list]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _image(png: bytes, alt: str) -> str:
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _read(uri: str) -> bytes | None:
    return storage.read_bytes(uri) if uri and storage.exists(uri) else None


def _short(value, limit: int = 120) -> str:
    """A value as text for a cell: floats to 4 significant digits, structures as JSON, cut at ``limit``."""
    text = value if isinstance(value, str) else f"{value:.4g}" if isinstance(value, float) else json.dumps(
        value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
