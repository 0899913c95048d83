"""HGPMarginal evaluated by worker processes and by torch.distributed ranks (pyro_scalegp.parallel).

Worker processes start from a fork server (which imports torch and Pyro once) or are spawned, so
the pools are shared between tests: one for the flat experts, one for the tree.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pyro.distributions as pdist
import pytest
import torch
import torch.multiprocessing as mp
from pyro.nn import PyroSample

from pyro_scalegp import parallel
from pyro_scalegp.hgp import HGPMarginal, JitterWarning
from scalegp import Experts, partition
from tests import reference

N, D, EXPERT_SIZE = 240, 3, 20  # 12 experts
TOL = 1e-10


@pytest.fixture(autouse=True)
def float64_and_clean_param_store():
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny problems: one thread avoids oversubscribing the workers' cores
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def _data():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (N, D))
    y = np.sin(X @ np.array([1.0, -0.5, 0.7])) + 0.1 * rng.standard_normal(N)
    experts = partition(X, expert_size=EXPERT_SIZE, method="random", seed=1)
    return torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64), experts


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module", autouse=True)
def close_pools_at_end():
    yield
    parallel.close_pools()


def _rbf(kind="rbf"):
    cls = {"rbf": gp.kernels.RBF, "matern52": gp.kernels.Matern52, "exponential": gp.kernels.Exponential}[kind]
    return cls(D, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.8, 1.1, 0.6]))


def _value_and_grads(make, y, wrt, retain_graph=False):
    value = make().log_prob(y)
    # allow_unused: a PyroSample's guide parameter is not used by the model
    grads = torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=retain_graph)
    return value.detach(), [None if g is None else g.detach() for g in grads]


def _assert_rel(actual, expected, tol=TOL):
    if expected is None:
        assert actual is None
        return
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = expected.abs().max().clamp_min(1e-300)
    err = float((actual - expected).abs().max() / scale)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}: {actual} vs {expected}"


def _compare(kernel, X, y, experts, workers):
    """The same distribution evaluated in-process and by ``workers``: equal values and gradients."""
    noise = torch.tensor(0.05, requires_grad=True)
    mean = torch.tensor(0.1, requires_grad=True)
    params = [p for _, p in kernel.named_parameters()] + [noise, mean]
    d = HGPMarginal(kernel, X, noise, experts=experts, mean=mean)
    v0, g0 = _value_and_grads(lambda: d, y, params, retain_graph=True)  # d's hyperparameters are reused
    d.workers = workers
    v1, g1 = _value_and_grads(lambda: d, y, params)
    _assert_rel(v1, v0)
    for a, b in zip(g1, g0):
        _assert_rel(a, b)
    return v0, g0


def test_tree_shards():
    index = np.arange(24).reshape(12, 2)
    flat = parallel.tree_shards(Experts(index), 5)
    assert [s.tolist() for s in flat] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11]]
    tree = ((0, 2, 4, 6, 8, 10), (1, 3, 5, 7, 9, 11))
    shards = parallel.tree_shards(Experts(index, None, tree), 2)
    assert [s.tolist() for s in shards] == [list(tree[0]), list(tree[1])]
    # root children dealt as contiguous groups balanced by leaf count
    tree = ((0, 1, 2, 3), (4,), (5, 6, 7), (8,), (9, 10, 11))
    assert [s.tolist() for s in parallel.tree_shards(Experts(index, None, tree), 2)] == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    # fewer root children than workers: the largest child (the first of equals) is opened
    tree = (((0, 1), (2, 3), (4, 5)), (6, 7, 8, 9, 10, 11))
    assert [s.tolist() for s in parallel.tree_shards(Experts(index, None, tree), 3)] == [
        [0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    with pytest.raises(ValueError, match="workers"):
        parallel.tree_shards(Experts(index), 13)
    with pytest.raises(ValueError, match="workers"):
        parallel.tree_shards(Experts(index), 0)


def test_kernel_hyperparameters_reads_pyro_params_and_samples():
    kernel = gp.kernels.Sum(_rbf(), gp.kernels.Matern32(D))
    kernel.kern1.lengthscale = PyroSample(pdist.LogNormal(0.0, 1.0))
    values = parallel.kernel_hyperparameters(kernel)
    assert list(values) == ["kern0.variance", "kern0.lengthscale", "kern1.variance", "kern1.lengthscale"]
    _assert_rel(values["kern0.lengthscale"], torch.tensor([0.8, 1.1, 0.6]))
    assert values["kern1.lengthscale"] > 0
    # the stripped copy holds no parameters, so it touches neither the module nor the param store
    stripped = parallel._strip(kernel)
    assert list(stripped.parameters()) == [] and len(list(kernel.parameters())) == 4
    assert set(pyro.get_param_store().keys()) >= {"kern0.variance", "kern0.lengthscale"}


@pytest.mark.parametrize("kind", ["rbf", "matern52"])
def test_workers_equal_in_process(data, kind):
    X, y, experts = data
    kernel = _rbf(kind)
    v0, _ = _compare(kernel, X, y, experts, 2)
    if kind == "rbf":  # and both equal the dense reference
        ref = reference.hgp_log_marginal("rbf", X.numpy(), y.numpy(), experts.index, 1.3,
                                         np.array([0.8, 1.1, 0.6]), 0.05, 0.1)
        assert abs(float(v0) - ref) <= 1e-8 * abs(ref)


def test_workers_generic_kernel_with_prior(data):
    """A sum kernel goes through the generic path; its PyroSample draw is replayed, not redrawn."""
    X, y, experts = data
    pyro.set_rng_seed(0)
    kernel = gp.kernels.Sum(_rbf(), gp.kernels.Matern32(D, lengthscale=torch.tensor(1.5)))
    kernel.kern1.variance = PyroSample(pdist.LogNormal(0.0, 0.3))
    _compare(kernel, X, y, experts, 2)


def test_pool_is_reused_across_steps(data):
    X, y, experts = data
    kernel = _rbf()
    log_noise = torch.tensor(math.log(0.05), requires_grad=True)
    opt = torch.optim.Adam(list(kernel.parameters()) + [log_noise], lr=0.05)
    pools = []
    for step in range(4):
        noise = log_noise.exp()
        d = HGPMarginal(kernel, X, noise, experts=experts, workers=2)
        pools.append(parallel.get_pool(d))
        loss = -d.log_prob(y + 0.01 * step)  # a new y each step goes through shared memory
        with torch.no_grad():
            expected = -HGPMarginal(kernel, X, noise, experts=experts).log_prob(y + 0.01 * step)
        _assert_rel(loss.detach(), expected)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p is pools[0] for p in pools)
    assert pools[0].alive and pools[0].pids == [p.pid for p in pools[0]._procs]
    assert len(set(pools[0].pids)) == 2 and os.getpid() not in pools[0].pids
    # value-only evaluations (no gradient requested) go through the same pool
    with torch.no_grad():
        HGPMarginal(kernel, X, noise, experts=experts, workers=2).log_prob(y)
    assert parallel.get_pool(d) is pools[0]

    # and so do SVI steps of a Pyro model (MAP of the hyperparameters: an empty guide)
    def model(workers):
        noise = pyro.param("noise", torch.tensor(0.05), constraint=pdist.constraints.positive)
        pyro.sample("y", HGPMarginal(kernel, X, noise, experts=experts, workers=workers), obs=y)

    svi = pyro.infer.SVI(model, lambda workers: None, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(2):
        with torch.no_grad():
            expected = svi.evaluate_loss(0)
        before = kernel.lengthscale.detach().clone()
        _assert_rel(torch.tensor(svi.step(2)), torch.tensor(expected))
        assert not torch.equal(kernel.lengthscale.detach(), before)
    assert parallel.get_pool(d) is pools[0] and pools[0].pids == [p.pid for p in pools[0]._procs]


def test_worker_warnings_reach_the_caller_with_their_class(data):
    """A worker's jitter escalation (duplicated inputs, a negligible noise) is warned here as the
    same JitterWarning the in-process evaluation gives, naming the worker."""
    X, y, experts = data
    Xd = X.clone()
    Xd[experts.index[0][1]] = Xd[experts.index[0][0]]  # a duplicated input in the first expert
    with pytest.warns(JitterWarning, match=r"\[HGP worker \d\] HGPMarginal: K \+ noise I of experts \[0\]"):
        value = HGPMarginal(_rbf(), Xd, 1e-300, experts=experts, workers=2).log_prob(y)
    with pytest.warns(JitterWarning, match=r"^HGPMarginal: K \+ noise I of experts \[0\]"):
        expected = HGPMarginal(_rbf(), Xd, 1e-300, experts=experts).log_prob(y)
    _assert_rel(value.detach(), expected.detach())


class FailingRBF(gp.kernels.RBF):
    """An RBF that fails when evaluated, naming the process it failed in."""

    def forward(self, X, Z=None, diag=False):
        raise ValueError(f"kernel failed in process {os.getpid()}")


def test_worker_exception_is_reraised(data):
    X, y, experts = data
    d = HGPMarginal(FailingRBF(D), X, torch.tensor(0.05), experts=experts, workers=2)
    pool = parallel.get_pool(d)
    with pytest.raises(ValueError, match="kernel failed in process") as info:
        d.log_prob(y)
    assert int(str(info.value).split()[-1]) in pool.pids  # raised in a worker, not here
    cause = str(info.value.__cause__)
    assert "Traceback in HGP worker" in cause and "in forward" in cause
    assert any("raised in HGP worker" in note for note in info.value.__notes__)
    assert pool.alive  # an exception leaves the pool usable
    pyro.clear_param_store()
    _compare(_rbf(), X, y, experts, 2)
    assert parallel.get_pool(d) is pool
    # a kernel that cannot be pickled is refused in the parent, naming the argument
    kernel = gp.kernels.VerticalScaling(_rbf(), vscaling_fn=lambda x: x.sum(-1))
    with pytest.raises(ValueError, match="kernel: cannot be sent to the worker processes"):
        HGPMarginal(kernel, X, torch.tensor(0.05), experts=experts, workers=2).log_prob(y)
    assert pool.alive


def test_tree_lays_out_the_shards(data):
    X, y, experts = data
    tree = (tuple(range(0, 12, 2)), tuple(range(1, 12, 2)))
    tree_experts = Experts(experts.index, None, tree)
    kernel = _rbf()
    noise = torch.tensor(0.05)
    with parallel.ExpertPool(X, tree_experts, 2) as pool:
        assert [s.tolist() for s in pool.shards] == [list(tree[0]), list(tree[1])]
        if "forkserver" in mp.get_all_start_methods():  # forked from the fork server, not spawned
            assert {type(p._popen).__module__ for p in pool._procs} == {"multiprocessing.popen_forkserver"}
        d = HGPMarginal(kernel, X, noise, experts=tree_experts, workers=pool)
        value = d.log_prob(y)
        for shard, got in zip(tree, pool.last_shard_values):
            part = HGPMarginal(kernel, X, noise, experts=experts.index[list(shard)]).log_prob(y)
            _assert_rel(got, part)
        _assert_rel(value, HGPMarginal(kernel, X, noise, experts=tree_experts).log_prob(y))
        other = HGPMarginal(kernel, X, noise, experts=experts, workers=pool)
        with pytest.raises(ValueError, match="workers"):  # a pool built for other experts
            other.log_prob(y)
    # leaving the block stops the workers cleanly and reaps them
    assert pool.closed and [p.exitcode for p in pool._procs] == [0, 0]
    with pytest.raises(parallel.WorkerError, match="closed"):
        d.log_prob(y)


class SlowRBF(gp.kernels.RBF):
    """An RBF whose evaluation takes a while (generic path: one call per expert)."""

    def forward(self, X, Z=None, diag=False):
        time.sleep(0.15)
        return super().forward(X, Z, diag)


@pytest.mark.timeout(60)
def test_worker_killed_while_computing(data):
    X, y, experts = data
    kernel = SlowRBF(D, lengthscale=torch.tensor([0.8, 1.1, 0.6]))
    d = HGPMarginal(kernel, X, torch.tensor(0.05), experts=experts, workers=2)
    pool = parallel.get_pool(d)
    victim = pool._procs[0]
    killer = threading.Timer(0.5, os.kill, (victim.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=rf"HGP worker 0 \(pid {victim.pid}\) died: killed by signal SIGKILL"):
            d.log_prob(y)  # one evaluation takes 6 x 0.15 s per worker
    finally:
        killer.join()
    assert time.monotonic() - start < 5
    # the pool is closed, its other worker stopped, and every process reaped (no zombies)
    assert pool.closed and not pool.alive and all(p.exitcode is not None for p in pool._procs)
    for pid in pool.pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" not in open(f"/proc/{pid}/status").read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, queue):
    """One torch.distributed rank: half of the experts and only the data they use."""
    try:
        import torch.distributed as tdist

        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                 world_size=world)
        X, y, experts = _data()
        mine = experts.index[rank::world]
        rows, local = np.unique(mine, return_inverse=True)
        kernel = _rbf()
        noise = torch.tensor(0.05, requires_grad=True)
        mean = torch.tensor(0.1, requires_grad=True)
        d = HGPMarginal(kernel, X[rows], noise, experts=local.reshape(mine.shape), mean=mean, distributed=True)
        value = d.log_prob(y[rows])
        params = [p for _, p in kernel.named_parameters()] + [noise, mean]
        grads = torch.autograd.grad(value, params)
        tdist.destroy_process_group()
        queue.put((rank, "ok", float(value), [g.numpy() for g in grads]))
    except BaseException as exc:  # report instead of leaving the parent waiting
        import traceback

        queue.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}", None))


@pytest.mark.timeout(120)
def test_distributed_two_ranks_equal_in_process(data):
    X, y, experts = data
    kernel = _rbf()
    noise = torch.tensor(0.05, requires_grad=True)
    mean = torch.tensor(0.1, requires_grad=True)
    params = [p for _, p in kernel.named_parameters()] + [noise, mean]
    v0, g0 = _value_and_grads(lambda: HGPMarginal(kernel, X, noise, experts=experts, mean=mean), y, params)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + 100
        while len(results) < 2:
            assert time.monotonic() < deadline, "distributed ranks did not answer"
            try:
                rank, status, value, grads = queue.get(timeout=1.0)
            except Exception:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a rank died with exit code {dead}"
                continue
            assert status == "ok", value
            results[rank] = (value, grads)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    for rank in range(2):
        value, grads = results[rank]
        _assert_rel(value, v0)
        for a, b in zip(grads, g0):
            _assert_rel(torch.as_tensor(a), b)


def test_distributed_needs_a_process_group(data):
    X, y, experts = data
    d = HGPMarginal(_rbf(), X, 0.05, experts=experts, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        d.log_prob(y)


def test_bad_input(data):
    X, y, experts = data
    d = HGPMarginal(_rbf(), X, 0.05, experts=experts, workers=2)
    with pytest.raises(ValueError, match="y"):
        d.log_prob(y.expand(2, N))
    with pytest.raises(ValueError, match="y"):
        d.log_prob(y.clone().requires_grad_())
    with pytest.raises(ValueError, match="workers"):
        parallel.ExpertPool(X, experts, 0)
    with pytest.raises(ValueError, match="X"):
        parallel.ExpertPool(X[0], experts, 1)


def test_script_without_main_guard_names_the_worker_that_died_starting(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "import numpy as np, torch, pyro.contrib.gp as gp\n"
        "from pyro_scalegp import HGPMarginal, partition\n"
        "X = np.random.default_rng(0).normal(size=(400, 2))\n"
        "m = HGPMarginal(gp.kernels.RBF(2), torch.tensor(X), torch.tensor(0.2), experts=partition(X, expert_size=50),\n"
        "                workers=2)  # the workers re-import this script\n"
        "print(m.log_prob(torch.zeros(400, dtype=torch.float64)))\n")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    assert "WorkerError: HGP worker" in run.stderr and "died while starting" in run.stderr, run.stderr[-3000:]
    assert 'if __name__ == "__main__":' in run.stderr
