"""Smoke tests of the benchmark helpers and scripts at tiny sizes (the numbers are not checked,
only that everything runs, writes its results and computes what it claims)."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is run from the repository root, not installed
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


@pytest.fixture
def float64_torch():
    """float64 default dtype, an empty Pyro param store and torch's thread count, all restored."""
    import pyro
    import torch

    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def _allocate(mib: int) -> int:
    block = np.ones(mib * 1024 * 1024 // 8)
    return int(block.sum())


def _fail():
    raise KeyError("boom")


def test_timeit_and_quick_mode(monkeypatch):
    calls = []
    out = common.timeit(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["times_s"]) == 3
    assert out["min_s"] <= out["median_s"] <= out["max_s"]
    with pytest.raises(ValueError, match="repeats"):
        common.timeit(lambda: None, repeats=0)
    monkeypatch.setenv("CI", "true")
    assert common.quick_mode()
    monkeypatch.setenv("CI", "0")
    assert not common.quick_mode()
    assert common.quick_mode(common.parser("x").parse_args(["--quick"]))


def test_gaussian_metrics_against_scipy():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    y, m, v = rng.standard_normal(50), rng.standard_normal(50), rng.uniform(0.5, 2, 50)
    out = common.gaussian_metrics(y, m, v, y_std=45.0)
    assert out["nlpd"] == pytest.approx(-norm.logpdf(y, m, np.sqrt(v)).mean(), rel=1e-12)
    assert out["rmse"] == pytest.approx(45.0 * np.sqrt(np.mean((y - m) ** 2)), rel=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        common.gaussian_metrics(y, m[:3], v)


def test_run_isolated_reports_peak_memory_and_errors():
    value, small = common.run_isolated(_allocate, 1)
    value2, big = common.run_isolated(_allocate, 300)
    assert value == 1024 * 1024 // 8 and value2 == 300 * 1024 * 1024 // 8
    assert big - small > 250  # MiB: the 300 MiB block shows in the child's peak RSS
    with pytest.raises(RuntimeError, match="KeyError"):
        common.run_isolated(_fail)


def test_write_results(tmp_path):
    rows = [{"method": "a", "rmse": 1.23456, "nan": float("nan")}, {"method": "b", "rmse": 2.0, "nan": 1e-7}]
    jpath, mpath = common.write_results("unit", rows, out=str(tmp_path), meta={"k": np.int64(3)}, notes="hello")
    payload = json.load(open(jpath))
    assert payload["rows"][0]["rmse"] == 1.23456 and payload["rows"][0]["nan"] is None
    assert payload["meta"]["k"] == 3 and "cpus" in payload["machine"]
    md = open(mpath).read()
    assert "| method | rmse | nan |" in md and "| a | 1.235 | - |" in md and "hello" in md


@pytest.mark.parametrize("method", ["local", "kdtree"])
def test_fit_and_predict_rules_match_hgp_predict(method, float64_torch):
    import torch

    from benchmarks.hgp_fit import fit_hgp, predict_rules
    from pyro_scalegp import HGPMarginal
    from scalegp import gp_draws

    X, y, _ = gp_draws(700, 2, lengthscale=0.8, noise=0.05, method="exact", seed=1)
    fit = fit_hgp(X[:600], y[:600], expert_size=100, method=method, max_iter=15, show_progress=False)
    assert fit.losses[-1] < fit.losses[0] and fit.iterations >= 1
    hyp = fit.hyperparameters()
    assert 0.01 < hyp["noise"] < 0.2
    preds = predict_rules(fit, X[600:], show_progress=False)
    assert set(preds) == {"poe", "gpoe", "bcm", "rbcm", "grbcm"}
    dist = HGPMarginal(fit.kernel, fit.X, fit.noise, experts=fit.experts)
    for rule in ("poe", "gpoe", "bcm", "rbcm"):
        ref = dist.predict(fit.y, torch.as_tensor(X[600:]), combine=rule)
        np.testing.assert_allclose(preds[rule][0], ref.mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(preds[rule][1], ref.variance.numpy(), rtol=1e-10)
    for mean, var, secs in preds.values():
        assert np.isfinite(mean).all() and (var > 0).all() and secs >= 0
        # a GP fitted to smooth draws predicts far better than the prior (variance 1)
        assert np.sqrt(np.mean((mean - y[600:]) ** 2)) < 0.5


def test_baselines_tiny(float64_torch):
    from benchmarks import baselines
    from scalegp import load_flights

    data = load_flights(num_train=400)
    data.X_test, data.y_test = data.X_test[:200], data.y_test[:200]
    runs = [
        baselines.exact_gpytorch(data, num_train=300, iters=3, show_progress=False),
        baselines.svgp_gpytorch(data, num_inducing=16, steps=3, batch_size=128, show_progress=False),
        baselines.sgpr_pyro(data, num_inducing=16, steps=3, show_progress=False),
    ]
    for r in runs:
        assert math.isfinite(r["rmse"]) and math.isfinite(r["nlpd"]) and r["wall_s"] > 0
        assert r["rmse"] == pytest.approx(r["rmse_std"] * data.y_std)
        assert 20 < r["rmse"] < 80  # minutes: the delays' std is 45
    assert runs[0]["n_train"] == 300 and runs[2]["n_train"] == 400
    n = baselines.exact_size_for_budget(data, 5.0, iters=10, probe=200)
    assert 200 <= n <= 400


@pytest.mark.slow
def test_demo_quick(tmp_path, monkeypatch, float64_torch):
    from benchmarks import demo

    monkeypatch.setenv("CI", "true")
    rows = demo.main(["--out", str(tmp_path), "--threads", "2"])
    methods = [r["method"] for r in rows]
    assert [m for m in methods if m.startswith("HGP")] == [f"HGP {r}" for r in ("poe", "gpoe", "bcm", "rbcm", "grbcm")]
    assert any(m.startswith("SVGP") for m in methods) and any(m.startswith("SGPR") for m in methods)
    assert any(m.startswith("exact") for m in methods)
    assert os.path.getsize(tmp_path / "demo.png") > 10_000
    payload = json.load(open(tmp_path / "demo.json"))
    assert all(math.isfinite(r["rmse"]) for r in payload["rows"])


@pytest.mark.slow
def test_speed_quick_torch(tmp_path):
    from benchmarks import hgp_speed

    rows = hgp_speed.main(["--quick", "--frameworks", "torch", "--out", str(tmp_path)])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"floor", "hgp", "autograd"}
    # ours and autograd through the Cholesky compute the same objective and gradient
    assert by["hgp"]["value"] == pytest.approx(by["autograd"]["value"], rel=1e-10)
    assert by["hgp"]["grad_norm"] == pytest.approx(by["autograd"]["grad_norm"], rel=1e-7)
    assert (tmp_path / "hgp_speed.md").exists()
