"""AsyncProximalSVI (issue 4, part 3): synchronous equivalence, worker faults, resume, delays."""
from __future__ import annotations

import multiprocessing
import os
import sys
import types

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from threadpoolctl import threadpool_limits

from pyro_scalegp import async_svi
from pyro_scalegp.advgp import ADVGP
from pyro_scalegp.async_svi import AsyncProximalSVI, StalledWorkerWarning
from pyro_scalegp.optim import ProximalAdadeltaOptimizer
from scalegp.async_server import batch_rows
from tests.reference import moving_average

OPTIM = {"lr": 2.0, "rho": 0.9}
SHARDS = [np.arange(0, 13), np.arange(13, 40)]
MINIBATCHES = {"batch_size": 6, "seed": 5}


pytestmark = pytest.mark.usefixtures("float64", "pyro_clean")


def data(N=40, M=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(N, 2))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1]) + 0.3 * rng.normal(size=N)
    return torch.tensor(X), torch.tensor(y), torch.tensor(X[:M] + 0.05)


def new_model(Z):
    kernel = gp.kernels.RBF(2, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.7, 1.2]))
    return ADVGP(kernel, Z, 0.2)


def proximal_gd(Z, X, y, num_steps, *, batch_size=None, seed=0):
    """Synchronous proximal ADADELTA in this process: the parameter vectors after each step.
    The gradient is the full data's or, with ``batch_size``, the sum over ``SHARDS`` of the
    workers' estimates ``(n_k / b) grad g_k`` on the rows ``batch_rows`` draws for each version."""
    model = new_model(Z)
    named = dict(model.named_parameters())
    opt = ProximalAdadeltaOptimizer([
        {"params": [named["guide.loc_unconstrained"]], "prox": "loc"},
        {"params": [named["guide.scale_tril_unconstrained"]], "prox": "scale_tril"},
        {"params": [p for n, p in named.items() if not n.startswith("guide.")]}], **OPTIM)
    history = []
    for version in range(num_steps):
        opt.zero_grad()
        if batch_size is None:
            loss = model.loss_terms(X, y)[0].sum()
        else:
            loss = 0.0
            for k, shard in enumerate(SHARDS):
                rows = torch.as_tensor(shard[batch_rows(version, len(shard), batch_size, seed, k)])
                loss = loss + len(shard) / batch_size * model.data_term(X[rows], y[rows])
        loss.backward()
        opt.step()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def assert_params_equal(model, expected, rtol):
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[name].numpy(), rtol=rtol, atol=1e-13,
                                   err_msg=name)


def test_one_synchronous_worker_is_proximal_gradient_descent_step_for_step():
    X, y, Z = data()
    expected = proximal_gd(Z, X, y, 4)
    model = new_model(Z)
    threads = torch.get_num_threads()
    with AsyncProximalSVI(model, X, y, num_workers=1, max_delay=0, optim=OPTIM, stand_in=False) as svi:
        losses = []
        for t in range(4):
            losses.append(svi.step())
            assert svi.version == t + 1
            assert_params_equal(model, expected[t], rtol=1e-12)
        assert svi.staleness == [0, 0, 0, 0]
        assert torch.get_num_threads() == threads  # the step runs on one thread and gives the others back
    # the reported loss is the exact negative ELBO before each update, and it decreases
    first = new_model(Z).loss(X, y).item()
    assert losses[0] == pytest.approx(first, rel=1e-12)
    assert losses[-1] < losses[0]


def random_parameters(model, seed):
    """Moves every parameter of ``model`` off its initial value (a full lower-triangular ``scale_tril``)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.as_tensor(0.3 * rng.normal(size=tuple(p.shape)), dtype=p.dtype))


@pytest.mark.parametrize("case", ["ard", "scalar_lengthscale", "active_dims", "float32"])
def test_one_thread_workers_numpy_gradient_equals_autograd(case):
    """A worker on one thread differentiates an RBF model in numpy, the chain rule through the
    parametrization written out (``_flat_rbf_gradient``): the same value and gradient, in the
    flat layout, as autograd through the module (what a worker of more threads computes), on its
    whole shard and on minibatch rows."""
    X, y, Z = data()
    dtype = torch.float32 if case == "float32" else torch.float64
    if case == "active_dims":  # a third input column the kernel ignores
        X, Z = torch.cat([X[:, :1], torch.randn(len(X), 1), X[:, 1:]], 1), torch.cat([Z[:, :1], torch.randn(len(Z), 1), Z[:, 1:]], 1)
    kernel = gp.kernels.RBF(2, variance=torch.tensor(1.3, dtype=dtype),
                            lengthscale=torch.tensor(0.9 if case == "scalar_lengthscale" else [0.7, 1.2], dtype=dtype),
                            active_dims=[0, 2] if case == "active_dims" else None)
    model = ADVGP(kernel, Z.to(dtype), 0.2)
    random_parameters(model, 4)
    X, y = X.to(dtype), y.to(dtype)  # (as AsyncProximalSVI hands them over)
    flat = async_svi._flatten([p.detach() for p in model.parameters()]).numpy()
    threads = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None, user_api="blas"):  # gives back the BLAS threads the worker limits
            written_out = async_svi._Gradient(model, num_threads=1)(X, y)
    finally:
        torch.set_num_threads(threads)
    autograd = async_svi._Gradient(model)(X, y)
    assert "lambda" in written_out.__qualname__ and "compute" in autograd.__qualname__  # the two paths
    rtol, atol = (2e-5, 1e-4) if case == "float32" else (1e-10, 1e-12)
    for rows in (None, np.array([1, 4, 5, 17, 30, 31, 39])):
        (v_w, g_w), (v_a, g_a) = written_out(flat, rows), autograd(flat, rows)
        assert v_w == pytest.approx(v_a, rel=rtol)
        assert g_w.dtype == g_a.dtype == torch.empty(0, dtype=dtype).numpy().dtype
        np.testing.assert_allclose(g_w, g_a, rtol=rtol, atol=atol)
        assert np.count_nonzero(g_a) == g_a.size - (len(Z) * (len(Z) - 1) // 2  # scale_tril's upper triangle
                                                    + (len(Z) if case == "active_dims" else 0))  # Z's ignored column


@pytest.mark.parametrize("change", ["matern", "fixed_variance", "another_constraint", "lengthscale_prior"])
def test_other_models_are_differentiated_by_autograd_in_the_workers(change):
    """Only Pyro's RBF with its own six trainable parameters and their constraints is written out;
    anything else goes through autograd."""
    X, y, Z = data()
    model = new_model(Z)
    if change == "matern":
        model.kernel = gp.kernels.Matern52(2, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.7, 1.2]))
    elif change == "fixed_variance":
        model.kernel.variance_unconstrained.requires_grad_(False)
    elif change == "another_constraint":
        model.kernel.lengthscale = pyro.nn.PyroParam(torch.tensor([0.7, 1.2]), pyro.distributions.constraints.greater_than(0.1))
    else:
        model.kernel.lengthscale = pyro.nn.PyroSample(pyro.distributions.LogNormal(torch.zeros(2), 1.0).to_event(1))
    assert async_svi._flat_rbf_gradient(model) is None
    assert async_svi._flat_rbf_gradient(new_model(Z)) is not None


FORK = pytest.param("fork", marks=pytest.mark.skipif(sys.platform != "linux", reason="forked on Linux only"))


@pytest.mark.parametrize("start", [FORK, "forkserver"])
@pytest.mark.parametrize("batching", [{}, MINIBATCHES], ids=["full shards", "minibatches"])
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's, where other tests started it
def test_killed_worker_is_restarted_and_resume_equals_uninterrupted_run(batching, start, monkeypatch):
    # both start methods, whichever worker_context would pick in this process
    fork_server = async_svi.preloading_context(async_svi.__name__)
    context = multiprocessing.get_context("fork") if start == "fork" else fork_server
    monkeypatch.setattr(async_svi, "worker_context", lambda num_threads: context)
    X, y, Z = data()
    expected = proximal_gd(Z, X, y, 6, **batching)
    if batching:  # minibatches follow other (stochastic) gradients than the full data's
        full = proximal_gd(Z, X, y, 6)
        assert (full[5]["guide.loc_unconstrained"] - expected[5]["guide.loc_unconstrained"]).abs().max() > 1e-3
    pyro.clear_param_store()
    model = new_model(Z)
    options = dict(num_workers=2, max_delay=0, optim=OPTIM, shards=SHARDS, stand_in=False, **batching)
    with AsyncProximalSVI(model, X, y, **options) as svi:
        svi.run(2, progress_bar=False)
        victim = svi.workers[0]
        victim.kill()
        victim.join()
        with pytest.warns(RuntimeWarning, match="worker 0 .* died"):
            svi.run(2, progress_bar=False)
        # the victim may have pushed its version-2 gradient before it died, so the death is
        # noticed while waiting for version 2's or version 3's gradients; either way none is lost
        assert len(svi.restarts) == 1 and svi.restarts[0][0] == 0 and svi.restarts[0][1] in (2, 3)
        assert svi.workers[0].pid != victim.pid and svi.workers[0].is_alive()
        assert_params_equal(model, expected[3], rtol=1e-10)
        state = svi.state_dict()
    # a fresh run (fresh model at the initial values) resumed from the checkpoint
    pyro.clear_param_store()
    resumed = new_model(Z)
    with AsyncProximalSVI(resumed, X, y, **options) as svi2:
        svi2.load_state_dict(state)
        assert svi2.version == 4
        svi2.run(2, progress_bar=False)
        assert svi2.version == 6
    assert_params_equal(resumed, expected[5], rtol=1e-10)


def test_server_stands_in_for_starting_and_restarted_workers_with_their_numbers(stand_in_through_a_restart):
    X, y, Z = data()
    model = new_model(Z)
    with AsyncProximalSVI(model, X, y, num_workers=2, max_delay=0, optim=OPTIM, shards=SHARDS, **MINIBATCHES) as svi:
        num_steps = stand_in_through_a_restart(svi, victim=0)
    # the same minibatch draws whoever computes the gradient: exactly the in-process run
    assert_params_equal(model, proximal_gd(Z, X, y, num_steps, **MINIBATCHES)[-1], rtol=1e-10)


def test_predict_uses_the_moving_average_of_the_iterates_and_leaves_the_model_at_the_last():
    X, y, Z = data()
    expected = proximal_gd(Z, X, y, 5)
    initial = {n: p.detach().clone() for n, p in new_model(Z).named_parameters()}
    averages = {n: moving_average([initial[n].numpy()] + [h[n].numpy() for h in expected], 0.5) for n in initial}
    model = new_model(Z)
    Xt = X[:7] + 0.1
    with AsyncProximalSVI(model, X, y, num_workers=1, optim=OPTIM, stand_in=True, average_decay=0.5) as svi:
        for t in range(5):
            svi.step()
            for name, value in svi.averaged_params().items():
                np.testing.assert_allclose(value.numpy(), averages[name][t], rtol=1e-12, atol=1e-14, err_msg=name)
        assert_params_equal(model, expected[4], rtol=1e-12)  # the model holds the last iterate
        pred, last = svi.predict(Xt), svi.predict(Xt, averaged=False)
        with svi.averaged() as averaged:
            assert averaged is model
            inside = model.predict(Xt)
        assert_params_equal(model, expected[4], rtol=1e-12)  # and again after the block
        at_last = model.predict(Xt)
    reference_model = new_model(Z)
    with torch.no_grad():
        for name, p in reference_model.named_parameters():
            p.copy_(torch.as_tensor(averages[name][-1]))
    at_average = reference_model.predict(Xt)
    for got in (pred, inside):
        np.testing.assert_allclose(got.mean.detach().numpy(), at_average.mean.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(got.variance.detach().numpy(), at_average.variance.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(last.mean.numpy(), at_last.mean.detach().numpy(), rtol=1e-12)
    assert np.abs(pred.mean.numpy() - last.mean.numpy()).max() > 1e-6  # the average is not the last iterate
    # by default whole-shard runs predict at the last iterate (decay 0), minibatch runs at an average
    with AsyncProximalSVI(new_model(Z), X, y, num_workers=1, optim=OPTIM, stand_in=True) as svi:
        svi.run(3, progress_bar=False)
        assert svi.average_decay == 0.0
        np.testing.assert_array_equal(svi.predict(Xt).mean.numpy(), svi.predict(Xt, averaged=False).mean.numpy())
    with AsyncProximalSVI(new_model(Z), X, y, optim=OPTIM, **MINIBATCHES) as svi:
        assert svi.average_decay == 0.99


def test_bounded_delay_with_a_straggler_and_stall_report():
    X, y, Z = data()
    model = new_model(Z)
    start = model.loss(X, y).item()
    with pytest.warns(StalledWorkerWarning, match="worker 1"):
        with AsyncProximalSVI(model, X, y, num_workers=2, max_delay=3, optim=OPTIM,
                              worker_sleep=[0.0, 1.5], stall_timeout=1.0, stand_in=False) as svi:
            svi.run(12, progress_bar=False)
            assert max(svi.staleness) <= 3
            assert max(svi.staleness) >= 1  # the fast worker really ran ahead
            assert any(k == 1 for k, _, _ in svi.stalls)
    end = model.loss(X, y).item()
    assert np.isfinite(end) and end < start
    assert (model.guide.scale_tril.diagonal() > 0).all()


def test_bad_arguments_raise_before_spawning():
    X, y, Z = data()
    model = new_model(Z)
    with pytest.raises(ValueError, match="num_workers"):
        AsyncProximalSVI(model, X, y, num_workers=0)
    with pytest.raises(ValueError, match="max_delay"):
        AsyncProximalSVI(model, X, y, max_delay=-1)
    with pytest.raises(ValueError, match="shards"):
        AsyncProximalSVI(model, X, y, num_workers=2, shards=[np.arange(10), np.arange(10, 30)])
    with pytest.raises(ValueError, match="shards"):
        AsyncProximalSVI(model, X, y, num_workers=3, shards=[np.arange(20), np.arange(20, 40)])
    with pytest.raises(ValueError, match="optim"):
        AsyncProximalSVI(model, X, y, optim={"momentum": 0.9})
    with pytest.raises(ValueError, match="y"):
        AsyncProximalSVI(model, X, y[:-1])
    with pytest.raises(ValueError, match="worker_sleep"):
        AsyncProximalSVI(model, X, y, worker_sleep=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        AsyncProximalSVI(model, X, y, batch_size=0)
    with pytest.raises(ValueError, match="stand_in"):
        AsyncProximalSVI(model, X, y, stand_in="yes")
    with pytest.raises(ValueError, match="num_threads"):
        AsyncProximalSVI(model, X, y, num_threads=0)
    with pytest.raises(ValueError, match="average_decay"):
        AsyncProximalSVI(model, X, y, average_decay=1.5)


SCRIPT = """
import sys
import numpy as np, torch, pyro.contrib.gp as gp
from pyro_scalegp import ADVGP, AsyncProximalSVI
torch.set_default_dtype(torch.float64)
torch.set_num_threads(2)
torch.exp(torch.randn(1_000_000)).sum()  # OpenMP's thread pool is in use before the workers start


class MyRBF(gp.kernels.RBF):  # defined in __main__: a forked worker has it, a spawned one re-imports it
    pass


def main():
    rng = np.random.default_rng(0)
    X, y = torch.tensor(rng.normal(size=(20_000, 2))), torch.tensor(rng.normal(size=20_000))
    model = ADVGP(MyRBF(2), X[:5].clone(), 0.2)
    threads, steps = int(sys.argv[1]), int(sys.argv[2])
    with AsyncProximalSVI(model, X, y, num_workers=2, batch_size=64, num_threads=threads) as svi:
        # the server stands in for starting workers: goes on until their exit is seen
        svi.run(steps, progress_bar=False)
        # some gradients came from the workers; how they were started
        print("served", len(svi.stood_in) < 2 * steps, type(svi.workers[0]._popen).__module__)


if sys.argv[3] == "guarded":
    if __name__ == "__main__":
        main()
else:
    main()
"""


def _run_script(tmp_path, threads: int, steps: int, guarded: bool = False):
    import subprocess

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(threads), str(steps), "guarded" if guarded else "-"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)


def test_script_without_main_guard_fails_naming_the_worker_instead_of_hanging(tmp_path):
    # two threads per worker: forked from a fork server (pyro_scalegp.async_svi.worker_context), or
    # spawned. Each shard (10,000 rows) is larger than a pipe buffer: passed with the start
    # arguments, the parent would wait forever to write it to a worker that died re-importing the script
    run = _run_script(tmp_path, threads=2, steps=10**6)
    assert run.returncode != 0
    assert "PeerFailedError: worker" in run.stderr and "exited while starting" in run.stderr, run.stderr[-3000:]
    assert 'if __name__ == "__main__":' in run.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_forked_workers_need_no_main_guard_and_have_the_scripts_classes(tmp_path):
    # one thread per worker (the default): forked; they unpickle the model with its __main__.MyRBF
    # kernel and send gradients (the server stops standing in for them)
    run = _run_script(tmp_path, threads=1, steps=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "served True multiprocessing.popen_fork" in run.stdout, run.stdout


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here")
def test_workers_of_two_threads_fork_from_a_fork_server_and_serve(tmp_path):
    # OpenMP's pool is in use in the script before the workers start: they cannot be forked from
    # it, but the fork server has not run a torch operation (it only imported torch)
    run = _run_script(tmp_path, threads=2, steps=300, guarded=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "served True multiprocessing.popen_forkserver" in run.stdout, run.stdout


SCRIPT_KILLED_SERVER = """
import os, signal
import numpy as np, torch, pyro.contrib.gp as gp
from pyro_scalegp import ADVGP, AsyncProximalSVI
torch.set_default_dtype(torch.float64)
rng = np.random.default_rng(0)
X, y = torch.tensor(rng.normal(size=(3000, 2))), torch.tensor(rng.normal(size=3000))
svi = AsyncProximalSVI(ADVGP(gp.kernels.RBF(2), X[:5].clone(), 0.2), X, y, num_workers=3, batch_size=64)
svi.run(20, progress_bar=False)
print(*[p.pid for p in svi.workers], type(svi.workers[0]._popen).__module__, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the server dies without closing anything
"""


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_forked_workers_exit_when_their_server_is_killed(tmp_path):
    # each forked worker closes its copies of the server's pipe ends, its own included: else it never
    # reads EOF and stays, an orphan, for ever
    import signal
    import subprocess
    import time

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    script = tmp_path / "killed_server.py"
    script.write_text(SCRIPT_KILLED_SERVER)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: orphans would hold a pipe open
        subprocess.run([sys.executable, str(script)], stdout=stdout, stderr=stderr, timeout=120)
    *pids, popen = out.read_text().split()
    assert popen == "multiprocessing.popen_fork", out.read_text() + err.read_text()[-3000:]
    pids = [int(p) for p in pids]
    try:
        deadline = time.monotonic() + 20.0
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, pids)), "workers outlived their server"
    finally:
        for pid in filter(running, pids):
            os.kill(pid, signal.SIGKILL)


def test_workers_are_forked_with_one_thread_on_linux_and_otherwise_from_a_fork_server_or_spawned(monkeypatch):
    import multiprocessing.forkserver

    from pyro_scalegp.async_svi import worker_context

    bridge = types.ModuleType("jax._src.xla_bridge")  # how JAX tells whether its runtime runs
    bridge.backends_are_initialized = lambda: False
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", bridge)
    monkeypatch.setattr(sys, "platform", "linux")
    preload = multiprocessing.forkserver._forkserver._preload_modules
    monkeypatch.setattr(multiprocessing.forkserver._forkserver, "_preload_modules", preload)  # restored after
    assert worker_context(1).get_start_method() == "fork"
    assert worker_context(2).get_start_method() == "forkserver"  # GNU OpenMP's pool does not survive fork
    assert multiprocessing.forkserver._forkserver._preload_modules == ["pyro_scalegp.async_svi"]
    bridge.backends_are_initialized = lambda: True
    assert worker_context(1).get_start_method() == "forkserver"  # JAX's threads: it warns of deadlocks
    bridge.backends_are_initialized = lambda: False
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert worker_context(1).get_start_method() == "forkserver"
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # as on Windows
    assert worker_context(1).get_start_method() == "spawn"
    monkeypatch.undo()
    jax = pytest.importorskip("jax")
    jax.numpy.zeros(1).block_until_ready()  # JAX's runtime now runs here
    assert worker_context(1).get_start_method() == "forkserver"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert worker_context(1).get_start_method() == "forkserver"


def test_torch_threads_sets_the_count_for_the_block_and_restores_it_also_on_error():
    from pyro_scalegp.threads import torch_threads

    threads = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == threads
