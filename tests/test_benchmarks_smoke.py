"""Smoke tests of the benchmark helpers and scripts at tiny sizes (the numbers are not checked,
only that everything runs, writes its results and computes what it claims)."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time

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


SPAWNING_SCRIPT = """
import contextlib, multiprocessing, sys, time
if __name__ == "__mp_main__":
    print("main module re-run", flush=True)  # in a spawned child that re-runs this script
from benchmarks.common import spawning_as_from_a_notebook

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    for hidden in (True, False):
        with spawning_as_from_a_notebook() if hidden else contextlib.nullcontext():
            child = context.Process(target=time.sleep, args=(0.0,))
            child.start()
            child.join()
        print("hidden" if hidden else "not hidden", child.exitcode, flush=True)
    print("main module back", sys.modules["__main__"].__file__ == __file__)
"""


def test_processes_spawned_as_from_a_notebook_do_not_rerun_the_main_module(tmp_path):
    import subprocess

    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:4] == ["hidden 0", "main module re-run", "not hidden 0", "main module back True"]


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here")
def test_stop_fork_server_makes_the_next_worker_start_a_fresh_one():
    from multiprocessing import forkserver

    def fork_server_of_a_child() -> int:
        child = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(0.0,))
        child.start()
        child.join()
        assert child.exitcode == 0
        return forkserver._forkserver._forkserver_pid

    first = fork_server_of_a_child()
    assert fork_server_of_a_child() == first  # it stays for later processes
    common.stop_fork_server()
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)  # gone, and reaped
    assert fork_server_of_a_child() not in (None, first)
    common.stop_fork_server()
    common.stop_fork_server()  # none running: nothing to do


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


def test_fit_hgp_trains_float64_hyperparameters_and_rejects_wild_trials(monkeypatch):
    """Under torch's default float32 the kernel's parameters still follow X's float64 (in float32 a
    line-search trial at log-lengthscale -196 underflowed to 0 and the kernel matrices to NaN, which
    stopped the flights benchmark), and trial points outside exp(+-LOG_BOUND) count as evaluations
    with a huge loss, from which the search steps back, instead of being evaluated."""
    import math

    import pyro.contrib.gp as gp
    import torch

    from benchmarks import hgp_fit
    from scalegp import gp_draws

    assert torch.get_default_dtype() == torch.float32
    X, y, _ = gp_draws(300, 2, lengthscale=0.8, noise=0.05, method="exact", seed=1)
    in_range, calls = hgp_fit.hyperparameters_in_range, []

    def third_rejected(kernel):
        calls.append(in_range(kernel))
        return calls[-1] and len(calls) != 3

    monkeypatch.setattr(hgp_fit, "hyperparameters_in_range", third_rejected)
    fit = hgp_fit.fit_hgp(X, y, expert_size=100, method="local", max_iter=6, show_progress=False)
    assert fit.kernel.lengthscale.dtype == torch.float64 and fit.kernel.variance.dtype == torch.float64
    assert len(calls) == fit.evaluations >= 4 and len(fit.losses) == fit.evaluations - 1
    assert all(map(math.isfinite, fit.losses)) and fit.losses[-1] < fit.losses[0]

    def kernel(log_lengthscale, variance=1.0):
        return gp.kernels.Matern52(2, variance=torch.tensor(variance, dtype=torch.float64),
                                   lengthscale=torch.full((2,), math.exp(log_lengthscale), dtype=torch.float64))

    assert in_range(kernel(0.5)) and in_range(kernel(-hgp_fit.LOG_BOUND + 1))
    assert not in_range(kernel(-196.0)) and not in_range(kernel(hgp_fit.LOG_BOUND + 1))
    assert not in_range(kernel(0.5, variance=0.0)) and not in_range(kernel(0.5, variance=float("nan")))


def test_variance_scale_is_the_hgp_with_scaled_amplitude(float64_torch):
    """The calibrated predictor is the HGP with kernel variance and noise times s, for every rule,
    and s minimizes the held-out NLPD."""
    import pyro
    import pyro.contrib.gp as gp
    import torch

    from benchmarks.common import gaussian_metrics
    from benchmarks.hgp_fit import variance_scale
    from pyro_scalegp import HGPMarginal
    from scalegp import gp_draws, partition

    X, y, _ = gp_draws(500, 2, lengthscale=0.7, noise=0.05, method="exact", seed=3)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    experts = partition(X[:400].numpy(), expert_size=50, method="local", communication=True, seed=0)
    s = 2.7
    for rule in ("poe", "gpoe", "bcm", "rbcm", "grbcm"):
        preds = []
        for a in (1.0, s):
            pyro.clear_param_store()  # a PyroModule kernel reads its parameters from the store
            kernel = gp.kernels.Matern52(2, variance=torch.tensor(a * 1.3), lengthscale=torch.tensor([0.5, 0.9]))
            preds.append(HGPMarginal(kernel, X[:400], a * 0.05, experts=experts).predict(y[:400], X[400:], combine=rule))
        torch.testing.assert_close(preds[1].mean, preds[0].mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(preds[1].variance, s * preds[0].variance, rtol=1e-9, atol=0)
    mean, var = preds[0].mean.numpy(), preds[0].variance.numpy()
    best = variance_scale(y[400:].numpy(), mean, var)
    nlpd = [gaussian_metrics(y[400:].numpy(), mean, c * best * var)["nlpd"] for c in (0.9, 1.0, 1.1)]
    assert nlpd[1] < nlpd[0] and nlpd[1] < nlpd[2]
    assert variance_scale(np.array([1.0, -2.0]), np.zeros(2), np.array([1.0, 4.0])) == pytest.approx(1.0)


def test_fit_and_evaluate_holds_out_and_calibrates(float64_torch):
    from benchmarks.hgp_fit import fit_and_evaluate
    from scalegp import load_flights

    data = load_flights(num_train=1500)
    data.X_test, data.y_test = data.X_test[:300], data.y_test[:300]
    fit, rows, means = fit_and_evaluate(data, rules=("rbcm", "gpoe"), calibration_rows=300, expert_size=100,
                                        max_iter=3, show_progress=False)
    assert [r["method"] for r in rows] == ["HGP rbcm", "HGP rbcm cal", "HGP gpoe", "HGP gpoe cal"]
    assert len(fit.y) == 1200 and all(r["n_train"] == 1200 for r in rows)
    for plain, cal in (rows[:2], rows[2:]):
        assert cal["rmse"] == plain["rmse"] and plain["scale"] == 1.0 and cal["scale"] > 0
        assert cal["train_s"] > plain["train_s"] and cal["predict_s"] == plain["predict_s"]
    assert means["rbcm"].shape == (300,)
    _, rows, _ = fit_and_evaluate(data, rules=("rbcm",), calibration_rows=0, expert_size=100, max_iter=2,
                                  show_progress=False)
    assert [r["method"] for r in rows] == ["HGP rbcm"] and rows[0]["n_train"] == 1500


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
    assert runs[1]["steps"] == 3
    budget = baselines.svgp_gpytorch(data, num_inducing=16, steps=10**6, batch_size=128, time_s=1.0,
                                     show_progress=False)
    assert 0 < budget["steps"] < 10**6 and 1.0 <= budget["train_s"] < 5.0  # stopped by the time budget
    n = baselines.exact_size_for_budget(data, 5.0, iters=10, probe=200)
    assert 200 <= n <= 400


@pytest.mark.slow
def test_demo_quick(tmp_path, monkeypatch, float64_torch):
    from benchmarks import demo

    monkeypatch.setenv("CI", "true")
    rows = demo.main(["--out", str(tmp_path), "--threads", "2"])
    methods = [r["method"] for r in rows]
    assert [m for m in methods if m.startswith("HGP")] == [f"HGP {r}{c}" for r in ("poe", "gpoe", "bcm", "rbcm", "grbcm")
                                                          for c in ("", " cal")]
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
    assert set(by) == {"floor", "floor_split", "hgp", "autograd"}
    # ours and autograd through the Cholesky compute the same objective and gradient
    assert by["hgp"]["value"] == pytest.approx(by["autograd"]["value"], rel=1e-10)
    assert by["hgp"]["grad_norm"] == pytest.approx(by["autograd"]["grad_norm"], rel=1e-7)
    assert (tmp_path / "hgp_speed.md").exists()


def test_advgp_curve_comparisons():
    from benchmarks.advgp_flights import share_ahead, share_ahead_by_checkpoint, value_at
    from benchmarks.advgp_stragglers import time_to_reach

    ours = [{"time_s": 0.0, "rmse": 45.0}, {"time_s": 2.0, "rmse": 44.0}, {"time_s": 4.0, "rmse": 40.0}]
    other = [{"time_s": 0.0, "rmse": 45.0}, {"time_s": 1.0, "rmse": 43.0}, {"time_s": 3.0, "rmse": 42.0},
             {"time_s": 5.0, "rmse": 41.0}]
    assert value_at(ours, 1.9) == 45.0 and value_at(ours, 2.0) == 44.0 and value_at(ours, -1.0) is None
    # grid 0, 1, 2, 3, 4 (5 lies beyond ours): ahead at 0 (tie) and 4 only
    share, since = share_ahead(ours, [other])
    assert share == pytest.approx(2 / 5) and since == 4.0
    assert share_ahead(other, [ours]) == (pytest.approx(4 / 5), None)  # behind at the end
    # checkpoint by checkpoint (the first three of each): 45 = 45, 44 > 43, 40 < 42
    assert share_ahead_by_checkpoint(ours, [other]) == (pytest.approx(2 / 3), 4.0)
    assert share_ahead_by_checkpoint(other, [ours]) == (pytest.approx(2 / 3), None)
    # ours 1 ms late at every checkpoint, and better at each: by the union grid behind at each of the
    # other's checkpoint times after the first (1, 3, 5 of 0.001, 1, 1.001, 3, 3.001, 5), never by checkpoint
    late = [{"time_s": p["time_s"] + 0.001, "rmse": p["rmse"] - 0.5} for p in other]
    assert share_ahead(late, [other]) == (pytest.approx(1 / 2), None)
    assert share_ahead_by_checkpoint(late, [other]) == (1.0, late[0]["time_s"])
    assert time_to_reach(ours, 44.0) == 2.0 and time_to_reach(ours, 39.0) is None


def test_parameter_average_is_the_servers_moving_average_and_applied_only_inside_its_block():
    import torch

    from benchmarks.advgp_flights import ParameterAverage
    from tests.reference import moving_average

    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    average = ParameterAverage([w], 0.9)
    iterates = [w.detach().clone()]
    for t in range(1, 31):
        with torch.no_grad():
            w.add_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * t)
        average.update()
        iterates.append(w.detach().clone())
    expected = moving_average([i.numpy() for i in iterates], 0.9)[-1]
    np.testing.assert_allclose(average.average[0].numpy(), expected, rtol=1e-13)
    with average.applied():
        np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-13)
    np.testing.assert_array_equal(w.detach().numpy(), iterates[-1].numpy())  # restored after the block


@pytest.mark.slow
def test_advgp_flights_quick(tmp_path, float64_torch, jax_x64):
    from benchmarks import advgp_flights

    rows, curves = advgp_flights.main(["--quick", "--workers", "2", "--frontends", "pyro", "numpyro", "--budget", "2",
                                       "--average-baselines", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["ADVGP 2 workers", "ADVGP (NumPyro) 2 workers", "SVGP (GPyTorch), averaged",
                                           "VariationalSparseGP (Pyro), averaged"]
    for r in rows:
        assert r["steps"] >= 1 and math.isfinite(r["rmse"]) and math.isfinite(r["nlpd"])
        assert 30 < r["rmse"] < 60  # minutes
    for r in rows[:2]:
        assert 0.0 <= r["share_ahead"] <= 1.0 and 0.0 <= r["share_ahead_by_checkpoint"] <= 1.0 and r["startup_s"] > 0
        assert r["stood_in"] >= 2  # the first update's two gradients came from the server (minibatches)
    advgp = curves[20]["ADVGP 2 workers"]
    assert advgp[0]["step"] == 0 and advgp[-1]["time_s"] >= rows[0]["startup_s"] + 2
    assert all(a["time_s"] < b["time_s"] for a, b in zip(advgp, advgp[1:]))
    payload = json.load(open(tmp_path / "advgp_flights.json"))
    assert set(payload["meta"]["curves"]["20"]) == {r["method"] for r in rows}
    assert payload["meta"]["batch_size"] == 1024 and payload["meta"]["advgp_optim"]["eps"] == 1e-5  # minibatches
    assert payload["meta"]["average_decay"] == 0.99 and payload["meta"]["average_baselines"] is True
    assert os.path.getsize(tmp_path / "advgp_flights_M20.png") > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["pyro", "numpyro"])
def test_advgp_stragglers_quick(tmp_path, float64_torch, jax_x64, frontend):
    from benchmarks import advgp_stragglers

    rows, curves = advgp_stragglers.main(["--quick", "--workers", "2", "--delays", "0", "8", "--sleeps", "0", "0.5",
                                          "--budget", "2", "--seed", "1", "--frontend", frontend,
                                          "--out", str(tmp_path)])
    meta = json.load(open(tmp_path / "advgp_stragglers.json"))["meta"]
    assert meta["sleeps_s"] == [0.0, 0.5] and meta["frontend"] == frontend
    sync, bounded = rows
    assert sync["max_delay"] == 0 and sync["max_staleness"] == 0 and sync["ratio"] == pytest.approx(1.0)
    assert sync["ratio_to_sync_best"] <= sync["ratio"]  # its best is at most its final RMSE: reached no later
    # the fast worker runs ahead of the sleeping one, within the bound, and so updates more often
    assert 1 <= bounded["max_staleness"] <= 8 and bounded["updates"] > sync["updates"]
    assert all(math.isfinite(r["rmse"]) for r in rows)
    assert os.path.getsize(tmp_path / "advgp_stragglers.png") > 10_000


@pytest.mark.slow
def test_advgp_throughput_quick(tmp_path, float64_torch, jax_x64):
    from benchmarks import advgp_throughput

    rows = advgp_throughput.main(["--quick", "--warmup", "1", "--steps", "2", "--minibatch-steps", "5",
                                  "--out", str(tmp_path)])
    expected = [("in-process", "Pyro", 1, 4000)]
    expected += [("processes", f, w, 4000) for f in ("Pyro", "NumPyro") for w in (1, 2)]
    expected += [("torch.distributed (3 processes)", "Pyro", 2, 4000)]
    expected += [("processes, minibatches", f, w, 1024) for f in ("Pyro", "NumPyro") for w in (1, 2)]
    assert [(r["setup"], r["frontend"], r["workers"], r["rows_per_update"]) for r in rows] == expected
    for r in rows:
        assert r["rows_per_s"] == pytest.approx(r["rows_per_update"] / r["s_per_update"])
        assert r["rows_per_s_per_worker"] == pytest.approx(r["rows_per_s"] / r["workers"])
        if r["workers"] == 1 and r["setup"] != "in-process":
            assert r["efficiency_vs_1_worker"] == 1.0
    assert (tmp_path / "advgp_throughput.md").exists()


def test_streaming_data_term_equals_advgp_on_the_generated_rows(float64_torch):
    import pyro.contrib.gp as gp
    import torch

    from benchmarks.advgp_streaming import StreamingADVGP, SyntheticStream, grid_inducing
    from pyro_scalegp import ADVGP

    stream = SyntheticStream(3)
    D = torch.as_tensor(stream.descriptors(2500, 1000))
    assert D.tolist() == [[0, 1000], [1, 1000], [2, 500]]
    chunks = [stream.chunk(j, n) for j, n in [(0, 1000), (1, 1000), (2, 500)]]
    X, y = (torch.as_tensor(np.concatenate(a)) for a in zip(*chunks))
    np.testing.assert_array_equal(stream.chunk(1, 1000)[0], X[1000:2000].numpy())  # regenerated bit for bit

    def models():
        for cls, kwargs in ((StreamingADVGP, {"stream": stream}), (ADVGP, {})):
            kernel = gp.kernels.RBF(2, variance=torch.tensor(0.7), lengthscale=torch.tensor([0.8, 1.3]))
            model = cls(kernel, torch.as_tensor(grid_inducing(3)), 0.2, **kwargs)
            with torch.no_grad():
                model.guide.loc.copy_(torch.linspace(-1, 1, 9))
            yield model

    streaming, plain = models()
    v_stream = streaming.data_term(D, torch.zeros(len(D)))
    v_stream.backward()
    v_plain = plain.data_term(X, y)
    v_plain.backward()
    assert v_stream.item() == pytest.approx(v_plain.item(), rel=1e-12)
    for (name, p), q in zip(streaming.named_parameters(), plain.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.slow
def test_advgp_streaming_quick(tmp_path):
    import torch

    from benchmarks import advgp_streaming

    old = torch.get_default_dtype()
    try:
        row, curve = advgp_streaming.main(["--quick", "--num-points", "60000", "--chunk", "3000", "--budget", "2",
                                           "--out", str(tmp_path)])
    finally:
        torch.set_default_dtype(old)
    assert row["num_points"] == 60_000 and row["updates"] >= 2 and row["under_15_min"]
    assert curve[-1]["loss_per_point"] < curve[1]["loss_per_point"]  # the negative ELBO goes down
    assert [p["update"] for p in curve] == list(range(len(curve)))
    assert json.load(open(tmp_path / "advgp_streaming.json"))["rows"][0]["M"] == 16


@pytest.mark.slow
def test_lattice_flights_quick(tmp_path, monkeypatch, float64_torch):
    from benchmarks import lattice_flights

    monkeypatch.setenv("CI", "true")
    rows = lattice_flights.main(["--out", str(tmp_path), "--threads", "2", "--skip", "sgpr,exact"])
    methods = [r["method"] for r in rows]
    assert methods == ["Simplex-GP (NumPyro)"] + [f"HGP {r}" for r in ("poe", "gpoe", "bcm", "rbcm", "grbcm")] + [
        "SVGP (GPyTorch)"]
    simplex = rows[0]
    assert simplex["n_train"] == 2000 and simplex["steps"] == 3 and math.isfinite(simplex["loss_last"])
    for r in rows:
        assert math.isfinite(r["nlpd"]) and 20 < r["rmse"] < 80  # minutes: the delays' std is 45
    payload = json.load(open(tmp_path / "lattice_flights.json"))
    assert payload["meta"]["quick"] and len(payload["rows"]) == len(rows)
    assert "Simplex-GP (NumPyro)" in open(tmp_path / "lattice_flights.md").read()


def test_lattice_gpytorch_quick(tmp_path, monkeypatch):
    from benchmarks import lattice_gpytorch

    monkeypatch.setenv("CI", "true")
    rows = lattice_gpytorch.main(["--out", str(tmp_path), "--threads", "2"])
    assert [(r["method"], r["n_train"]) for r in rows] == [
        ("lattice operator", 1000), ("GPyTorch kernel", 1000), ("authors' lattice kernel", 1000)]
    if "skipped" in rows[2]:  # the authors' package comes with `make bench`, not `make test`
        assert "gpytorch_lattice_kernel" in rows[2]["skipped"] and "authors_step_over_ours" not in rows[0]
        rows = rows[:2]
    else:
        assert rows[0]["authors_step_over_ours"] == rows[2]["step_s"] / rows[0]["step_s"]
    for r in rows:
        assert math.isfinite(r["nlpd"]) and 20 < r["rmse"] < 80 and r["step_s"] > 0  # minutes: the delays' std is 45
    assert rows[0]["gpytorch_step_over_ours"] == rows[1]["step_s"] / rows[0]["step_s"]
    assert "lattice operator" in open(tmp_path / "lattice_gpytorch.md").read()


def test_lattice_mvm_quick_writes_table_and_figure(tmp_path, monkeypatch, float64_torch):
    from benchmarks import lattice_mvm

    monkeypatch.setenv("CI", "true")
    out = tmp_path / "mvm.json"
    lattice_mvm.main(["--no-peer", "--orders", "1", "--lengthscales", *["2.0"] * 8, "--variance", "1.0",
                      "--out", str(out)])
    rows = json.load(open(out))["rows"]  # quick: 2,000 flights rows, 1,000 normal points with d = 2 and 8
    assert [(r["data"], r["n"], r["d"]) for r in rows] == [("flights", 2000, 8), ("normal", 1000, 2),
                                                          ("normal", 1000, 8)]
    assert all(0.9 < r["cosine"] <= 1.0 and "peer_1col_s" not in r for r in rows)
    assert "| flights | 2000 |" in open(tmp_path / "mvm.md").read()
    figure = tmp_path / "mvm.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    lattice_mvm.main(["--replot", str(out)])  # the figure again, from the stored JSON alone
    assert figure.exists()
    synthetic = tmp_path / "synthetic.json"
    synthetic.write_text(json.dumps({"meta": {"threads": 2}, "rows": rows[1:]}))
    with pytest.raises(SystemExit, match="no flights rows"):
        lattice_mvm.main(["--replot", str(synthetic)])
