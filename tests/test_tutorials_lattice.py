"""The Simplex-GP tutorials execute from top to bottom (with CI set, so at tiny sizes), print the
operator's accuracy against the exact kernel and draw their figures; the Pyro one trains and
predicts with ``SimplexGPMarginal``, the NumPyro one checks its jitted gradient against finite
differences and trains (SVI under jit) and predicts with its ``SimplexGPMarginal``; both draw from the
prior of the trained kernel (``prior_samples``) and from the marginal (``sample``)."""
from __future__ import annotations

import re

import pytest

from tests.test_tutorials import execute_notebook


def _execute(name, monkeypatch):
    nb, _, text, figures = execute_notebook(name, monkeypatch)
    cosines = [float(c) for c in re.findall(r"cosine=([0-9.]+)", text)]
    assert cosines and min(cosines) > 0.9, cosines  # accuracy table printed, lattice close to the exact kernel
    # the nearest-neighbour variances: close to the exact GP's
    gap = re.search(r"variances from \d+ neighbours: max \|difference\| from the exact GP's ([0-9.e+-]+)", text)
    assert gap is not None and float(gap.group(1)) < 0.05, text[-2000:]
    # the exact prior draws: the covariance of 20000 of them within Monte Carlo error of the operator's matrix
    cov = re.search(r"max \|covariance of 20000 draws - K\| / variance = ([0-9.]+)", text)
    assert cov is not None and float(cov.group(1)) < 0.1, text[-2000:]
    assert "has shape (3, " in text  # the marginal's own draws
    return nb, text, figures


@pytest.mark.slow
def test_lattice_pyro_tutorial_runs(monkeypatch):
    _, text, figures = _execute("lattice_pyro.ipynb", monkeypatch)
    assert "trained in" in text
    rmse = [float(v) for v in re.findall(r"RMSE ([0-9.]+)", text)]
    assert len(rmse) == 2 and all(v == v for v in rmse)  # Simplex-GP and exact GP, not NaN
    assert len(figures) == 3  # accuracy / time against N, the predictions, and prior draws


@pytest.mark.slow
def test_lattice_numpyro_tutorial_runs(monkeypatch):
    _, text, figures = _execute("lattice_numpyro.ipynb", monkeypatch)
    rel = re.search(r"autodiff vs finite differences: ([^\s]+)", text)
    assert rel is not None and float(rel.group(1)) < 1e-5
    assert "trained in" in text
    rmse = [float(v) for v in re.findall(r"RMSE ([0-9.]+)", text)]
    assert len(rmse) == 2 and all(v == v for v in rmse)  # Simplex-GP and exact GP, not NaN
    assert len(figures) == 3  # accuracy / time against N, the predictions, and prior draws
