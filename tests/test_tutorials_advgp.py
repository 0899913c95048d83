"""The ADVGP tutorials execute from top to bottom (with CI set, so on a 3,000-row subset of the
flights), train for three delay bounds with a straggling worker, and reach a test RMSE below the
constant predictor's for every bound; the staleness each update used respects its bound; minibatch
updates train too, and predict well at the server's averaged parameters."""
from __future__ import annotations

import re

import pytest

from tests.test_tutorials import execute_notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", ["advgp_pyro.ipynb", "advgp_numpyro.ipynb"])
def test_advgp_tutorial_runs(name, monkeypatch):
    _, _, text, figures = execute_notebook(name, monkeypatch)
    const = float(re.search(r"constant predictor RMSE \(minutes\): ([0-9.]+)", text).group(1))
    runs = re.findall(r"max_delay=(\d+): (\d+) updates, largest staleness (\d+), "
                      r"final RMSE \(minutes\): ([0-9.]+)", text)
    assert [int(tau) for tau, *_ in runs] == [0, 4, 16]
    for tau, updates, staleness, rmse in runs:
        assert int(updates) >= 20
        assert int(staleness) <= int(tau)
        assert float(rmse) < const - 0.5  # minutes: training improved on the constant predictor
    # the straggler sleeps before every gradient, so the largest bound lets the fast worker run ahead
    assert int(runs[-1][2]) >= 1
    # minibatch updates train too (how many more of them fit in the time depends on the shard size:
    # on this 3,000-row subset a whole shard costs little more than a batch)
    sizes = re.findall(r"(whole shards|minibatches of \d+ rows per worker): (\d+) updates in \d+ s, "
                       r"test RMSE \(minutes\): ([0-9.]+), at the averaged parameters: ([0-9.]+)", text)
    assert [label.split()[0] for label, *_ in sizes] == ["whole", "minibatches"]
    (_, full_updates, *full_rmse), (_, batch_updates, *batch_rmse) = sizes
    assert int(batch_updates) >= 20 and int(full_updates) >= 20
    assert max(map(float, full_rmse + batch_rmse)) < const - 0.5  # at the last iterate and at the average
    best = re.search(r"final RMSE \(minutes\): ([0-9.]+), NLPD \(minutes\): ([-0-9.]+), "
                     r"95% interval coverage: ([0-9.]+)", text)
    assert best is not None
    assert float(best.group(1)) < const and 0.8 < float(best.group(3)) <= 1.0
    assert len(figures) == 2  # RMSE against time, predictions
