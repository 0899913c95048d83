"""The bundled datasets: the flights loader (shapes, standardization, fixed split) and gp_draws."""
from __future__ import annotations

import numpy as np
import pytest

from scalegp import RegressionData, gp_draws, load_flights
from scalegp.datasets import FLIGHTS_FEATURES


@pytest.fixture(scope="module")
def flights() -> RegressionData:
    return load_flights()


def test_flights_shapes(flights):
    assert flights.X_train.shape == (243_853, 8)
    assert flights.X_test.shape == (30_000, 8)
    assert flights.y_train.shape == (243_853,)
    assert flights.y_test.shape == (30_000,)
    assert flights.feature_names == FLIGHTS_FEATURES
    assert "dep_delay" not in flights.feature_names
    for a in (flights.X_train, flights.y_train, flights.X_test, flights.y_test):
        assert a.dtype == np.float64
        assert np.isfinite(a).all()


def test_flights_standardized_with_training_statistics(flights):
    np.testing.assert_allclose(flights.X_train.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(flights.X_train.std(0), 1.0, rtol=1e-10)
    assert abs(flights.y_train.mean()) < 1e-10
    assert flights.y_train.std() == pytest.approx(1.0, rel=1e-10)
    # the test split uses the training statistics, so it is only roughly standardized
    assert abs(flights.y_test.mean()) < 0.05
    assert 0.9 < flights.y_test.std() < 1.1
    # arrival delays in 2013 NYC flights: std of about 45 minutes, mean of a few minutes
    assert 40 < flights.y_std < 50
    assert 0 < flights.y_mean < 15


def test_flights_raw_units_and_no_departure_delay():
    raw = load_flights(standardize=False)
    X = np.concatenate([raw.X_train, raw.X_test])
    y = np.concatenate([raw.y_train, raw.y_test])
    names = list(raw.feature_names)
    month, dom, dow = (X[:, names.index(c)] for c in ("month", "day_of_month", "day_of_week"))
    assert set(np.unique(month)) == set(range(1, 13))
    assert dom.min() == 1 and dom.max() == 31
    assert set(np.unique(dow)) == set(range(7))
    for col in ("dep_time_min", "arr_time_min"):
        t = X[:, names.index(col)]
        assert t.min() >= 0 and t.max() <= 24 * 60
    assert (X[:, names.index("air_time")] > 0).all()
    assert (X[:, names.index("distance")] > 0).all()
    assert X[:, names.index("plane_age")].min() >= 0
    # the standardized set is the raw one scaled with the training statistics
    std = load_flights()
    np.testing.assert_allclose((raw.X_train - std.x_mean) / std.x_std, std.X_train, atol=1e-12)
    np.testing.assert_allclose((raw.y_train - std.y_mean) / std.y_std, std.y_train, atol=1e-12)
    # no feature is the departure delay: none correlates with the arrival delay anywhere near it does
    corr = [abs(np.corrcoef(X[:, j], y)[0, 1]) for j in range(X.shape[1])]
    assert max(corr) < 0.5


def test_flights_split_is_fixed_and_seeded(flights):
    again = load_flights()
    np.testing.assert_array_equal(again.X_train, flights.X_train)
    np.testing.assert_array_equal(again.y_test, flights.y_test)
    other = load_flights(seed=1)
    assert other.X_train.shape == flights.X_train.shape
    assert not np.array_equal(other.y_test, flights.y_test)
    # the two parts are disjoint: no test row also occurs in the training rows
    raw = load_flights(standardize=False)
    rows = {tuple(r) + (t,) for r, t in zip(raw.X_train[:20000], raw.y_train[:20000])}
    dup = sum((tuple(r) + (t,)) in rows for r, t in zip(raw.X_test, raw.y_test))
    assert dup < 5  # exact duplicates of full rows are possible in the data itself, but rare


def test_flights_test_size_and_validation():
    small = load_flights(test_size=1000)
    assert small.X_test.shape == (1000, 8)
    assert small.X_train.shape == (272_853, 8)
    with pytest.raises(ValueError, match="test_size"):
        load_flights(test_size=0)


def test_flights_num_train_subset(flights):
    sub = load_flights(num_train=5000)
    assert sub.X_train.shape == (5000, 8) and sub.y_train.shape == (5000,)
    np.testing.assert_array_equal(sub.X_test, flights.X_test)
    assert sub.y_std == flights.y_std  # statistics of the full training part
    # the subset's rows are rows of the full training set
    full = {tuple(r) for r in flights.X_train}
    assert all(tuple(r) in full for r in sub.X_train[:200])
    np.testing.assert_array_equal(load_flights(num_train=5000).y_train, sub.y_train)
    np.testing.assert_array_equal(flights.subset(10**7).X_train, flights.X_train)


def test_flights_test_subset_samples_the_whole_year(flights):
    sub = flights.subset(num_test=2000, seed=1)
    assert sub.X_test.shape == (2000, 8) and sub.y_test.shape == (2000,)
    np.testing.assert_array_equal(sub.X_train, flights.X_train)
    rows = {tuple(r) for r in flights.X_test}
    assert all(tuple(r) in rows for r in sub.X_test)
    month = list(flights.feature_names).index("month")
    assert len(np.unique(flights.X_test[:2000, month])) == 1  # leading rows: January only
    assert len(np.unique(sub.X_test[:, month])) == 12
    np.testing.assert_array_equal(flights.subset(num_test=2000, seed=1).y_test, sub.y_test)


def test_gp_draws_exact_statistics():
    X, y, f = gp_draws(400, 2, lengthscale=0.7, variance=2.0, noise=0.1, method="exact", seed=3)
    assert X.shape == (400, 2) and y.shape == (400,) and f.shape == (400,)
    assert X.min() >= -2 and X.max() <= 2
    resid = y - f
    assert resid.var() == pytest.approx(0.1, rel=0.25)
    X2, y2, _ = gp_draws(400, 2, lengthscale=0.7, variance=2.0, noise=0.1, method="exact", seed=3)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(y, gp_draws(400, 2, method="exact", seed=4)[1])


def test_gp_draws_rff_matches_kernel():
    # over independent draws, E[f(x) f(x')] is the RBF kernel of the two inputs
    d, ls, var = 2, 0.8, 1.5
    prods, kern = [], []
    for s in range(200):
        X, _, f = gp_draws(40, d, lengthscale=ls, variance=var, method="rff", num_features=1024, seed=s)
        i, j = np.triu_indices(40)
        prods.append(f[i] * f[j])
        kern.append(var * np.exp(-0.5 * (((X[i] - X[j]) / ls) ** 2).sum(-1)))
    prods, kern = np.concatenate(prods), np.concatenate(kern)
    for lo, hi in ((0.0, 0.2), (0.4, 0.6), (0.8, 0.95), (0.999, 1.001)):
        sel = (kern >= lo * var) & (kern < hi * var)
        assert sel.sum() > 200
        assert prods[sel].mean() == pytest.approx(kern[sel].mean(), abs=0.12 * var)
    X, y, f = gp_draws(200_000, 8, method="rff", num_features=256, seed=0, dtype=np.float32)
    assert X.dtype == np.float32 and y.shape == (200_000,)
    assert np.isfinite(y).all()


def test_gp_draws_validation():
    with pytest.raises(ValueError, match="method"):
        gp_draws(10, 2, method="nope")
    with pytest.raises(ValueError, match="kernel"):
        gp_draws(10, 2, method="rff", kernel="matern32")
    with pytest.raises(ValueError, match="N, d"):
        gp_draws(0, 2)
