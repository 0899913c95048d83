"""The SVGP-VAE tutorials execute from top to bottom (with CI set, so at reduced size), print their
metrics and draw their figures (trajectory plots and the rotated-digit image grid)."""
from __future__ import annotations

import os
import re

import pytest

from tests.test_tutorials import TUTORIALS, nbclient, nbformat


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svgp_vae_pyro.ipynb", "svgp_vae_numpyro.ipynb"])
def test_svgp_vae_tutorial_runs(name, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": TUTORIALS}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "ball model trained in" in text and "digits model trained in" in text
    for metric in ("trajectory RMSE after the affine map", "per-pixel MSE at the held-out angle"):
        value = re.search(metric + r": ([^ ]+)", text)
        assert value is not None and float(value.group(1)) == float(value.group(1))  # printed, not NaN
    figures = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")
               and "image/png" in o.get("data", {})]
    assert len(figures) == 2
