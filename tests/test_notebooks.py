"""Every example has a notebook twin, and each runs top to bottom (tiny settings) with its plot drawn."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = ROOT / "examples" / "notebooks"
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


def test_every_example_has_a_notebook_twin():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_notebook_runs_and_plots_its_learning_curves(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BETTY_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the learning curves, inline
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "accuracy" in printed or "MSE" in printed  # the script's comparison was printed
