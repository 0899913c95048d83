"""The HGP tutorials execute from top to bottom (with CI set, so at reduced size).

nbclient starts the ``python3`` kernel; jupyter_client runs a kernel spec whose command is
``python`` with the interpreter running this test (``sys.executable``), so the notebooks see
this environment's packages.
"""
from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials")


def execute_notebook(name, monkeypatch):
    """Run ``tutorials/<name>`` with ``CI`` set; return the executed notebook, its code-cell outputs,
    the printed text and the PNG figures, after checking that no cell raised."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": TUTORIALS}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # stdout only: a worker's stderr chunk may land inside a printed line
    text = "".join(o.get("text", "") for o in outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    figures = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")
               and "image/png" in o.get("data", {})]
    return nb, outputs, text, figures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hgp_pyro.ipynb", "hgp_numpyro.ipynb"])
def test_tutorial_runs(name, monkeypatch):
    _, outputs, text, figures = execute_notebook(name, monkeypatch)
    assert "trained in" in text
    # the comparison table has one row per combination rule, with finite metrics
    html = "".join(o.get("data", {}).get("text/plain", "") for o in outputs if o.get("output_type") == "execute_result")
    for rule in ("poe", "gpoe", "bcm", "rbcm", "grbcm"):
        assert rule in html
    assert "nan" not in html.lower()
    # the plot is drawn
    assert figures
