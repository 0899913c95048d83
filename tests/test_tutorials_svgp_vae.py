"""The SVGP-VAE tutorials execute from top to bottom (with CI set, so at reduced size), print their
metrics and draw their figures (trajectory plots and the rotated-digit image grid)."""
from __future__ import annotations

import re

import pytest

from tests.test_tutorials import execute_notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svgp_vae_pyro.ipynb", "svgp_vae_numpyro.ipynb"])
def test_svgp_vae_tutorial_runs(name, monkeypatch):
    _, _, text, figures = execute_notebook(name, monkeypatch)
    assert "ball model trained in" in text and "digits model trained in" in text
    for metric in ("trajectory RMSE after the affine map", "per-pixel MSE at the held-out angle"):
        value = re.search(metric + r": ([^ ]+)", text)
        assert value is not None and float(value.group(1)) == float(value.group(1))  # printed, not NaN
    assert len(figures) == 2
