"""The notebooks execute (nbclient) on the CI recipe: the tiny model, through the package's Python API."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


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
