"""The notebooks execute (nbclient): the walkthrough on the CI recipe, your_dataset.ipynb on a dataset it makes,
both on the tiny model, through the package's Python API."""

from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
OWN_DATASET = NOTEBOOKS_DIR / "your_dataset.ipynb"
NOTEBOOKS = sorted(p for p in NOTEBOOKS_DIR.glob("*.ipynb") if p != OWN_DATASET)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, ci_recipe, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKFLOW_NOTEBOOK_RECIPE", str(ci_recipe))
    monkeypatch.setenv("WORKFLOW_API_KEY", "notebook-test-key")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # The walkthrough shows the loss curve and the metrics chart.
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 2
    # ... and the run report page inline (workflow/report_html.py).
    assert any("<h2>Lineage</h2>" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    nbformat.write(nb, tmp_path / path.name)


@pytest.mark.heavy  # a whole run: training, an engine
def test_your_dataset_notebook_runs_a_json_dataset_by_yaml_alone(tiny_model, monkeypatch, tmp_path):
    """The walkthrough of a dataset made in the notebook (trip slots as JSON, a third of them {}): the json
    kind's run of tests/test_task_kinds.py, with a two-step training; its last cells count the report's
    figures by hand and fail on a difference."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKFLOW_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("WORKFLOW_NOTEBOOK_MODEL", str(tiny_model))
    monkeypatch.setenv("WORKFLOW_NOTEBOOK_SHRINK", "1")
    nb = nbformat.read(OWN_DATASET, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(OWN_DATASET.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert '"kind": "json"' in text  # the task the ingest stage read off the data
    assert "hand count = report: 20 figures over 4 variants" in text  # base, adapter, each constrained
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the metrics chart
