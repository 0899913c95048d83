"""AsyncProximalSVI, NumPyro side (issue 4, part 3): the same protocol with jitted gradients."""
from __future__ import annotations

import multiprocessing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from numpyro_scalegp import async_svi
from numpyro_scalegp import kernels as nk
from numpyro_scalegp.advgp import ADVGP
from numpyro_scalegp.async_svi import AsyncProximalSVI
from numpyro_scalegp.optim import proximal_adadelta
from numpyro_scalegp.worker import _flatten, _Gradient, _layout
from scalegp.async_server import ProcessWorkers, batch_rows
from scalegp.processes import start_fork_server
from tests.reference import moving_average

OPTIM = {"learning_rate": 2.0, "rho": 0.9}
SHARDS = [np.arange(0, 13), np.arange(13, 40)]
MINIBATCHES = {"batch_size": 6, "seed": 5}


pytestmark = pytest.mark.usefixtures("jax_x64")


def data(N=40, M=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(N, 2))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1]) + 0.3 * rng.normal(size=N)
    return X, y, X[:M] + 0.05


def new_model(Z):
    return ADVGP(nk.RBF(2, 1.3, jnp.asarray([0.7, 1.2])), jnp.asarray(Z), 0.2)


def proximal_gd(model, X, y, num_steps, *, batch_size=None, seed=0):
    """As the Pyro test's: full-data gradients, or the sum over ``SHARDS`` of the workers'
    minibatch estimates on the rows ``batch_rows`` draws for each version."""
    tx = proximal_adadelta(**OPTIM)
    params = model.init_params()
    state = tx.init(params)
    grad_g = jax.jit(jax.grad(lambda p, X, y: model.data_term(X, y, params=p)))

    def gradient(version, params):
        if batch_size is None:
            return grad_g(params, X, y)
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for k, shard in enumerate(SHARDS):
            rows = shard[batch_rows(version, len(shard), batch_size, seed, k)]
            total = jax.tree_util.tree_map(lambda t, g, n=len(shard): t + n / batch_size * g,
                                           total, grad_g(params, X[rows], y[rows]))
        return total

    history = []
    for version in range(num_steps):
        updates, state = tx.update(gradient(version, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


def assert_params_equal(params, expected, rtol):
    for name in expected:
        np.testing.assert_allclose(np.asarray(params[name]), np.asarray(expected[name]), rtol=rtol, atol=1e-13,
                                   err_msg=name)


def test_one_synchronous_worker_is_proximal_gradient_descent_step_for_step():
    X, y, Z = data()
    model = new_model(Z)
    expected = proximal_gd(model, X, y, 4)
    with AsyncProximalSVI(model, X, y, num_workers=1, max_delay=0, optim=OPTIM, stand_in=False) as svi:
        losses = []
        for t in range(4):
            losses.append(svi.step())
            assert_params_equal(svi.params, expected[t], rtol=1e-10)
        assert svi.staleness == [0, 0, 0, 0]
    assert losses[0] == pytest.approx(float(model.loss(X, y)), rel=1e-10)
    assert losses[-1] < losses[0]


def test_predict_uses_the_moving_average_of_the_iterates():
    X, y, Z = data()
    model = new_model(Z)
    expected = proximal_gd(model, X, y, 5)
    initial = model.init_params()
    averages = {n: moving_average([initial[n]] + [h[n] for h in expected], 0.5) for n in initial}
    Xt = X[:7] + 0.1
    with AsyncProximalSVI(model, X, y, num_workers=1, optim=OPTIM, stand_in=True, average_decay=0.5) as svi:
        for t in range(5):
            svi.step()
            assert_params_equal(svi.averaged_params(), {n: a[t] for n, a in averages.items()}, rtol=1e-10)
        assert_params_equal(svi.params, expected[4], rtol=1e-10)  # params hold the last iterate
        pred, last = svi.predict(Xt), svi.predict(Xt, averaged=False)
    at_average = model.predict(Xt, params={n: jnp.asarray(a[-1]) for n, a in averages.items()})
    np.testing.assert_allclose(pred.mean, at_average.mean, rtol=1e-10)
    np.testing.assert_allclose(pred.variance, at_average.variance, rtol=1e-10)
    np.testing.assert_allclose(last.mean, model.predict(Xt, params=expected[4]).mean, rtol=1e-10)
    assert np.abs(np.asarray(pred.mean) - np.asarray(last.mean)).max() > 1e-6
    # by default whole-shard runs predict at the last iterate (decay 0), minibatch runs at an average
    with AsyncProximalSVI(model, X, y, num_workers=1, optim=OPTIM, stand_in=True) as svi:
        svi.run(3, progress_bar=False)
        assert svi.average_decay == 0.0
        np.testing.assert_array_equal(svi.predict(Xt).mean, svi.predict(Xt, averaged=False).mean)
    with AsyncProximalSVI(model, X, y, optim=OPTIM, **MINIBATCHES) as svi:
        assert svi.average_decay == 0.99


@pytest.mark.parametrize("batching", [{}, MINIBATCHES], ids=["full shards", "minibatches"])
def test_killed_worker_is_restarted_and_resume_equals_uninterrupted_run(batching):
    X, y, Z = data()
    model = new_model(Z)
    expected = proximal_gd(model, X, y, 6, **batching)
    if batching:  # minibatches follow other (stochastic) gradients than the full data's
        loc = "guide.loc_unconstrained"
        assert np.abs(np.asarray(proximal_gd(model, X, y, 6)[5][loc]) - np.asarray(expected[5][loc])).max() > 1e-3
    options = dict(num_workers=2, max_delay=0, optim=OPTIM, shards=SHARDS, stand_in=False, **batching)
    with AsyncProximalSVI(model, X, y, **options) as svi:
        svi.run(2, progress_bar=False)
        if "forkserver" in multiprocessing.get_all_start_methods():  # forked from the fork server, not spawned
            assert {type(p._popen).__module__ for p in svi.workers} == {"multiprocessing.popen_forkserver"}
        victim = svi.workers[1]
        victim.kill()
        victim.join()
        with pytest.warns(RuntimeWarning, match="worker 1 .* died"):
            svi.run(2, progress_bar=False)
        # the victim may have pushed its version-2 gradient before it died (see the Pyro test)
        assert len(svi.restarts) == 1 and svi.restarts[0][0] == 1 and svi.restarts[0][1] in (2, 3)
        assert_params_equal(svi.params, expected[3], rtol=1e-10)
        state = svi.state_dict()
    with AsyncProximalSVI(new_model(Z), X, y, **options) as svi2:
        svi2.load_state_dict(state)
        svi2.run(2, progress_bar=False)
        assert svi2.version == 6
        assert_params_equal(svi2.params, expected[5], rtol=1e-10)


def test_server_stands_in_for_starting_and_restarted_workers_with_their_numbers(stand_in_through_a_restart):
    X, y, Z = data()
    model = new_model(Z)
    with AsyncProximalSVI(model, X, y, num_workers=2, max_delay=0, optim=OPTIM, shards=SHARDS, **MINIBATCHES) as svi:
        num_steps = stand_in_through_a_restart(svi, victim=1)
        params = svi.params
    assert_params_equal(params, proximal_gd(model, X, y, num_steps, **MINIBATCHES)[-1], rtol=1e-10)


def test_bad_arguments_raise_before_spawning():
    X, y, Z = data()
    model = new_model(Z)
    with pytest.raises(ValueError, match="num_workers"):
        AsyncProximalSVI(model, X, y, num_workers=0)
    with pytest.raises(ValueError, match="max_delay"):
        AsyncProximalSVI(model, X, y, max_delay=-2)
    with pytest.raises(ValueError, match="shards"):
        AsyncProximalSVI(model, X, y, num_workers=2, shards=[np.arange(10), np.arange(10, 30)])
    with pytest.raises(ValueError, match="optim"):
        AsyncProximalSVI(model, X, y, optim={"lr": 1.0})
    with pytest.raises(ValueError, match="batch_size"):
        AsyncProximalSVI(model, X, y, batch_size=-3)
    with pytest.raises(ValueError, match="stand_in"):
        AsyncProximalSVI(model, X, y, stand_in="yes")
    with pytest.raises(ValueError, match="num_threads"):
        AsyncProximalSVI(model, X, y, num_threads=0)
    with pytest.raises(ValueError, match="average_decay"):
        AsyncProximalSVI(model, X, y, average_decay=-0.5)


def test_the_stand_in_compiles_one_minibatch_gradient_for_every_worker():
    X, y, Z = data()
    model = new_model(Z)
    with AsyncProximalSVI(model, X, y, num_workers=2, optim=OPTIM, shards=SHARDS, **MINIBATCHES) as svi:
        svi.step()
        assert svi.stood_in == [(0, 0), (1, 0)]
        here = svi._workers._stand_in
        assert list(here._minibatch) == [6]  # (one compile: seconds on a busy machine)
        assert here._jitted._cache_size() == 0  # no whole-shard gradient
        # the workers are handed that compiled program
        assert list(svi._workers._make_compute._executables) == [6]


LOADS = """
import pickle, sys
gradient, X, y, flat, rows = pickle.load(open(sys.argv[1], "rb"))
value, grad = gradient(X, y)(flat, rows)
pickle.dump((value, grad, gradient._jitted is None), open(sys.argv[1], "wb"))
"""


def test_a_fresh_process_loads_the_stand_ins_minibatch_gradient_instead_of_compiling(tmp_path):
    """The workers load the stand-in's compiled minibatch gradient: in a process that has lowered
    nothing (LAPACK's routines looked up only by importing the worker's module), with the same
    numbers, no tracing and nothing logged."""
    import pickle
    import subprocess
    import sys

    X, y, Z = data()
    model = new_model(Z)
    params = model.init_params()
    flat, rows = _flatten(params, sorted(params)), np.arange(3, 9)
    here = _Gradient(model, params)
    value, grad = here(X, y)(flat, rows)
    path = tmp_path / "gradient.pkl"
    path.write_bytes(pickle.dumps((_Gradient(model, params, executables=here.executables()), X, y, flat, rows)))
    run = subprocess.run([sys.executable, "-c", LOADS, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # (XLA's loader logs a false CPU-feature error and a version warning unless silenced)
    assert "cpu_aot_loader" not in run.stderr and "version compatibility" not in run.stderr, run.stderr
    loaded_value, loaded_grad, traced_nothing = pickle.loads(path.read_bytes())
    assert traced_nothing
    assert loaded_value == value
    np.testing.assert_array_equal(loaded_grad, grad)


def test_minibatch_and_whole_shard_gradients_agree():
    """Minibatch gradients are compiled apart from whole-shard ones (with quicker compiler
    options): on every row of a shard the two give the same value and gradient."""
    X, y, Z = data()
    model = new_model(Z)
    params = model.init_params()
    names = _layout(params)[0]
    flat = _flatten(params, names)
    compute = _Gradient(model, params)(X[:40], y[:40])
    value, grad = compute(flat)
    batch_value, batch_grad = compute(flat, np.arange(40))
    assert abs(batch_value - value) <= 1e-10 * abs(value)
    np.testing.assert_allclose(batch_grad, grad, rtol=1e-10, atol=1e-12)
    other_value, _ = compute(flat, np.arange(20))
    assert abs(other_value - value) > 1e-6 * abs(value)  # the rows are used


def test_the_server_compiles_before_it_starts_the_workers(monkeypatch, xla_compiles):
    """Spawned interpreters compete with compilation for the cores, so the server compiles its
    update and the stand-in's gradient (with a first computation of each) before starting them;
    the updates that follow compile nothing. Only the fork server, which imports the workers'
    module, starts before the compilations, beside them."""
    X, y, Z = data()
    model = new_model(Z)
    started_after, fork_server_started_after = [], []

    def recording_workers(*args, **kwargs):
        started_after.append(len(xla_compiles))
        return ProcessWorkers(*args, **kwargs)

    def recording_fork_server(context):
        fork_server_started_after.append((len(xla_compiles), context))
        start_fork_server(context)

    monkeypatch.setattr(async_svi, "ProcessWorkers", recording_workers)
    monkeypatch.setattr(async_svi, "start_fork_server", recording_fork_server)
    with AsyncProximalSVI(model, X, y, num_workers=2, optim=OPTIM, shards=SHARDS, **MINIBATCHES) as svi:
        svi.step()
        svi.step()
        assert svi.stood_in[:2] == [(0, 0), (1, 0)]
    assert len(started_after) == 1 and started_after[0] >= 2
    assert xla_compiles[started_after[0]:] == []
    [(compiled_before, context)] = fork_server_started_after
    # the update and the stand-in's gradient (at least) compiled while the fork server started
    assert compiled_before + 2 <= started_after[0] and context.get_start_method() == "forkserver"


WORKER_IMPORTS = """
import json, sys
from jaxlib import lapack
from threadpoolctl import threadpool_info
import numpyro_scalegp.worker
blas = len(threadpool_info())
lapack._lapack.initialize()
unlisted = sorted(set(numpyro_scalegp.__all__) - set(dir(numpyro_scalegp)))
print(json.dumps({"modules": sorted(sys.modules), "blas": blas, "blas_after_lookup": len(threadpool_info()),
                  "unlisted": unlisted}))
"""


def test_the_fork_server_imports_jax_and_lapacks_blas_but_not_numpyro():
    """The workers' fork server imports :mod:`numpyro_scalegp.worker`: JAX, but neither NumPyro
    nor the package's other modules (the package loads them on first use), and it has loaded
    the BLAS that XLA's LAPACK calls go through, so that each worker's thread limit reaches it."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", WORKER_IMPORTS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    imported = json.loads(run.stdout)
    assert "jax" in imported["modules"]
    assert [m for m in imported["modules"] if m.split(".")[0] in ("numpyro", "numpyro_scalegp")] == [
        "numpyro_scalegp", "numpyro_scalegp.worker"]
    assert imported["blas"] == imported["blas_after_lookup"]
    assert imported["unlisted"] == []  # dir() lists the names not loaded yet, loading nothing


def test_the_package_loads_each_name_from_its_module_on_first_use():
    import inspect

    import numpyro_scalegp
    from numpyro_scalegp import advgp, hgp, lattice

    assert numpyro_scalegp.ADVGP is advgp.ADVGP and numpyro_scalegp.HGPMarginal is hgp.HGPMarginal
    assert numpyro_scalegp.SimplexGPMarginal is lattice.SimplexGPMarginal and numpyro_scalegp.kernels is nk
    assert all(getattr(numpyro_scalegp, name) is not None for name in numpyro_scalegp.__all__)
    # dir() offers the public names and the submodules, nothing of the loading machinery (it offered ``importlib``)
    for name in (n for n in dir(numpyro_scalegp) if not n.startswith("_")):
        value = getattr(numpyro_scalegp, name)
        assert name in numpyro_scalegp.__all__ or (
            inspect.ismodule(value) and value.__name__ == f"numpyro_scalegp.{name}"), name
    with pytest.raises(AttributeError, match="no_such_name"):
        numpyro_scalegp.no_such_name


def blas_threads() -> set:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_a_worker_limits_its_blas_threads_and_the_stand_in_runs_on_one_and_gives_the_rest_back():
    # XLA's CPU LAPACK calls go through scipy's OpenBLAS, whose spinning threads took the cores
    # from the other local workers; the worker's gradient sets the count for its whole process
    X, y, Z = data()
    model = new_model(Z)
    with threadpool_limits(2, user_api="blas"):  # restored when the test ends
        assert blas_threads() == {2}
        compute = _Gradient(model, model.init_params(), num_threads=1)(X, y)
        assert blas_threads() == {1}
        threadpool_limits(2, user_api="blas")  # back to 2 for the server
        with AsyncProximalSVI(model, X, y, num_workers=1, optim=OPTIM, **MINIBATCHES) as svi:
            seen, compute_here = [], svi._workers.compute_here

            def recording(*args):  # the server's count while it computes a worker's gradient
                seen.append(blas_threads())
                return compute_here(*args)

            svi._workers.compute_here = recording
            svi.step()
            assert svi.stood_in == [(0, 0)] and seen == [{1}] and blas_threads() == {2}
    value, grad = compute(_flatten(model.init_params(), sorted(model.init_params())))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
