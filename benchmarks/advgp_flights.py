"""ADVGP on the flights data beside GPyTorch SVGP and Pyro VariationalSparseGP: RMSE/NLPD against wall time.

What is measured: for M = 50 and 100 inducing inputs (the same k-means centres for every
method) and the same initial hyperparameters (``baselines.INIT``), the test RMSE (minutes) and
NLPD (per test point, standardized unit) of each method at checkpoints taken every
``--interval`` seconds of training time, for a fixed training-time budget per run. The
evaluation itself is excluded from the clock. ADVGP's clock includes its workers' start-up
(reported on its own as ``startup_s``), and its budget counts from its first update.

* ADVGP: :class:`pyro_scalegp.AsyncProximalSVI` (and with ``--frontends pyro numpyro`` also
  :class:`numpyro_scalegp.AsyncProximalSVI`, rows "ADVGP (NumPyro) ...", whose clock includes
  compiling its jitted gradient and step; once JAX has run in this process, the Pyro workers
  fork from a fork server, not from this process: ``pyro_scalegp.async_svi.worker_context``)
  with 1, 2 and 4 worker processes, proximal
  ADADELTA on the server, ``max_delay`` 0 (synchronous) unless ``--max-delay`` says otherwise.
  Each update uses ``--batch-size`` rows (default 1024, as the baselines' steps), split
  evenly between the workers, each sending the minibatch estimate of its data term's
  gradient, and the server stands in for the workers while they start (``stand_in``);
  ``--batch-size 0``: each worker computes the exact data term ``g_k`` of its whole shard
  (full-data updates, no stand-in). The checkpoints predict at the server's averaged
  parameters (``svi.predict``; ``average_decay``'s default: 0.99 with minibatches, the last
  iterate with whole shards); ``--no-average``: at the last iterate.
* SVGP (GPyTorch) and ``pyro.contrib.gp.models.VariationalSparseGP``: minibatch Adam
  (batch 1024, lr 0.01), predicting at their last iterate as their users do; with
  ``--average-baselines`` at the same moving average of their parameters as ADVGP's
  (rows "..., averaged"), to see how much of a difference is the averaging.

Every run gets the same cores: torch's threads in the process for the baselines, split
between the worker processes for ADVGP. The summary table gives each method's final RMSE and
NLPD and, for ADVGP, the share of the checkpoint times (over the span where every method has
a checkpoint) at which its RMSE is at most the better baseline's, the issue's target being
all of them. ``advgp_flights.png`` plots RMSE against time. Run::

    .venv/bin/python -m benchmarks.advgp_flights            # all training rows, M = 50 and 100
    .venv/bin/python -m benchmarks.advgp_flights --quick    # 2,000 rows, M = 20, seconds
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import numpy as np
import pyro
import pyro.contrib.gp as gp
import torch

from benchmarks.baselines import INIT, _gpytorch_kernel, kmeans_inducing
from benchmarks.common import (gaussian_metrics, parser, quick_mode, set_threads, spawning_as_from_a_notebook,
                               stop_fork_server, write_results)
from pyro_scalegp import ADVGP, AsyncProximalSVI
from scalegp.async_server import DEFAULT_AVERAGE_DECAY, average_weight, averaging
from scalegp.datasets import load_flights

#: ADADELTA settings of ADVGP's server: eps sets the size of the first steps (1e-4 beat 1e-6, 1e-3 and
#: lr=10 on 20,000 flights rows, M = 50, over the first 200 full-batch steps)
ADVGP_OPTIM = {"lr": 1.0, "rho": 0.9, "eps": 1e-4}
#: the same for minibatch updates: smaller first steps for noisier gradients (in-process runs of
#: batch 1024 on all flights rows, M = 50: test RMSE 36.46 after 60 s with eps 1e-5, 37.05 with
#: 1e-4, 38.07 with 1e-3, 38.86 with 1e-4 and rho 0.99)
ADVGP_MINIBATCH_OPTIM = {"lr": 1.0, "rho": 0.9, "eps": 1e-5}


class Clock:
    """Training time with evaluation pauses taken out, and a checkpoint every ``interval_s`` of it."""

    def __init__(self, interval_s: float):
        self.start, self.paused = time.perf_counter(), 0.0
        self.interval_s, self._next = float(interval_s), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def checkpoint(self, curve: list, step: int, evaluate, *, force: bool = False) -> None:
        """Append ``{"time_s", "step", **evaluate()}`` to ``curve`` when one is due (or ``force``);
        the time spent in ``evaluate`` does not count."""
        t = self.elapsed()
        if not (force or t >= self._next):
            return
        t0 = time.perf_counter()
        curve.append({"time_s": t, "step": step, **evaluate()})
        self.paused += time.perf_counter() - t0
        self._next = t + self.interval_s


def metrics(data, mean, var) -> dict:
    m = gaussian_metrics(data.y_test, mean, var, y_std=data.y_std)
    return {"rmse": m["rmse"], "nlpd": m["nlpd"]}


def constant_rmse(data) -> float:
    """Test RMSE (minutes) of the constant predictor, the training mean."""
    return float(data.y_std * np.sqrt(np.mean(data.y_test**2)))


def new_advgp(data, Z, lengthscale: float | None = None) -> ADVGP:
    """An RBF ADVGP at the shared initial hyperparameters (or the given initial
    ``lengthscale``) with inducing inputs ``Z``."""
    pyro.clear_param_store()
    d = data.X_train.shape[1]
    kernel = gp.kernels.RBF(d, variance=torch.tensor(INIT["variance"]),
                            lengthscale=torch.full((d,), INIT["lengthscale"] if lengthscale is None else lengthscale))
    return ADVGP(kernel, torch.as_tensor(Z), INIT["noise"])


def new_numpyro_advgp(data, Z, lengthscale: float | None = None):
    """The NumPyro twin of :func:`new_advgp` (float64: turns on JAX's 64-bit mode)."""
    import jax
    import jax.numpy as jnp

    from numpyro_scalegp import ADVGP as NumPyroADVGP
    from numpyro_scalegp import kernels

    jax.config.update("jax_enable_x64", True)
    d = data.X_train.shape[1]
    ell = INIT["lengthscale"] if lengthscale is None else lengthscale
    return NumPyroADVGP(kernels.RBF(d, INIT["variance"], jnp.full((d,), ell)), jnp.asarray(Z), INIT["noise"])


def advgp_frontend(name: str, data, Z, lengthscale, optim: dict):
    """``(AsyncProximalSVI class, model, X, y, optim, predict)`` of frontend ``name`` ("pyro" or
    "numpyro"); ``predict(svi)`` returns the test rows' predictive means and variances (numpy) at
    ``svi``'s averaged parameters (``svi.predict``), or at the initial ones for ``svi=None``."""
    if name == "pyro":
        model, Xt = new_advgp(data, Z, lengthscale), torch.as_tensor(data.X_test)

        def predict(svi):
            with torch.no_grad():
                pred = model.predict(Xt) if svi is None else svi.predict(Xt)
            return pred.mean.numpy(), pred.variance.numpy()

        return (AsyncProximalSVI, model, torch.as_tensor(data.X_train), torch.as_tensor(data.y_train), dict(optim),
                predict)
    import jax

    from numpyro_scalegp import AsyncProximalSVI as NumPyroAsyncProximalSVI

    model = new_numpyro_advgp(data, Z, lengthscale)
    @jax.jit
    def moments(params):
        pred = model.predict(data.X_test, params=params)
        return pred.mean, pred.variance

    def predict(svi):
        mean, var = moments(model.init_params() if svi is None else svi.averaged_params())
        return np.asarray(mean), np.asarray(var)

    optim = {("learning_rate" if k == "lr" else k): v for k, v in optim.items()}
    return NumPyroAsyncProximalSVI, model, data.X_train, data.y_train, optim, predict


def run_advgp(data, Z, *, workers: int, max_delay: int, budget_s: float, interval_s: float,
              optim: dict | None = None, worker_sleep=0.0, threads: int | None = None,
              lengthscale: float | None = None, batch_size: int | None = None,
              frontend: str = "pyro", shrink_stale_steps: bool = True,
              average_decay: float | None = None) -> tuple[list[dict], float]:
    """Train ADVGP with ``AsyncProximalSVI`` of ``frontend`` ("pyro" or "numpyro") for ``budget_s``
    seconds after its first update.

    The clock starts before the workers are started, so the curve's times include their start-up
    (those not forked from this process import only what they use, as from a notebook:
    :func:`spawning_as_from_a_notebook`; a fork server an earlier run started is stopped first, so
    that each run pays for its imports: :func:`stop_fork_server`).
    ``threads`` (default: all cores) are split between the workers; ``worker_sleep`` is passed
    on (simulated stragglers). Returns the RMSE/NLPD curve (each checkpoint also records the
    largest staleness so far) and the start-up time: the clock when the first update was applied
    (spawning the workers and their first gradients, or with minibatches the server's stand-ins
    for them; each checkpoint records how many gradients the server has computed so far,
    ``stood_in``). ``lengthscale``: see :func:`new_advgp`; ``shrink_stale_steps`` and
    ``average_decay`` (the checkpoints predict at the averaged parameters, ``svi.predict``; 0: at
    the last iterate): see :class:`pyro_scalegp.AsyncProximalSVI`.
    """
    svi_class, model, X, y, optim, predict = advgp_frontend(frontend, data, Z, lengthscale,
                                                            ADVGP_OPTIM if optim is None else optim)
    threads = (os.cpu_count() or 1) if threads is None else threads
    staleness: list[int] = []
    stood_in: list = []
    svi = None
    # the first torch optimizer of a process imports torch._dynamo (about 2 s); the baselines build
    # theirs before their clocks start, so this one is built before ADVGP's
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    stop_fork_server()

    def evaluate():
        return {**metrics(data, *predict(svi)), "max_staleness": max(staleness, default=0), "stood_in": len(stood_in)}

    curve = []
    clock = Clock(interval_s)
    clock.checkpoint(curve, 0, evaluate)
    with warnings.catch_warnings(), spawning_as_from_a_notebook():  # spawned workers: only their own imports
        warnings.simplefilter("ignore")  # stall warnings of deliberately slow workers
        with svi_class(model, X, y, num_workers=workers, max_delay=max_delay, optim=optim, worker_sleep=worker_sleep,
                       num_threads=max(1, threads // workers), batch_size=batch_size, seed=0,
                       shrink_stale_steps=shrink_stale_steps, average_decay=average_decay) as svi:
            staleness, stood_in = svi.staleness, svi.stood_in
            svi.step()
            startup = clock.elapsed()
            clock.checkpoint(curve, svi.version, evaluate)
            while clock.elapsed() < startup + budget_s:
                svi.step()
                clock.checkpoint(curve, svi.version, evaluate)
            if curve[-1]["step"] != svi.version:
                clock.checkpoint(curve, svi.version, evaluate, force=True)
    return curve, startup


def advgp_batching(batch_size: int, workers: int) -> dict:
    """``run_advgp``'s ``batch_size`` (per worker: ``batch_size // workers``; ``None`` for
    ``batch_size=0``, whole shards) and its ADADELTA settings."""
    if batch_size == 0:
        return {"batch_size": None, "optim": ADVGP_OPTIM}
    return {"batch_size": max(1, batch_size // workers), "optim": ADVGP_MINIBATCH_OPTIM}


class ParameterAverage:
    """The moving average of torch parameters ``params`` that ADVGP's server keeps of its own
    (:func:`scalegp.async_server.average_weight`), for the baselines with ``--average-baselines``:
    :meth:`update` after each optimizer step, predict inside ``with average.applied():``."""

    def __init__(self, params, decay: float):
        self.params, self.decay, self.t = list(params), float(decay), 0
        self.average = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        self.t += 1
        b = average_weight(self.decay, self.t)
        with torch.no_grad():
            for a, p in zip(self.average, self.params):
                a.mul_(b).add_(p.detach(), alpha=1 - b)

    @contextlib.contextmanager
    def applied(self):
        current = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, a in zip(self.params, self.average):
                    p.copy_(a)
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.params, current):
                    p.copy_(c)


def _minibatch_loop(step_fn, evaluate, *, budget_s, interval_s):
    curve, step = [], 0
    clock = Clock(interval_s)
    clock.checkpoint(curve, 0, evaluate)
    while clock.elapsed() < budget_s:
        step_fn()
        step += 1
        clock.checkpoint(curve, step, evaluate)
    if curve[-1]["step"] != step:
        clock.checkpoint(curve, step, evaluate, force=True)
    return curve


def run_svgp(data, Z, *, budget_s, interval_s, lr, batch_size, seed, average_decay=None):
    """GPyTorch SVGP (zero mean, ARD RBF, learned inducing inputs), minibatch Adam. Its variational
    mean starts at zero (``mean_init_std=0``; GPyTorch's default adds N(0, 1e-3^2) noise), so that at
    t = 0 it predicts what ADVGP and ``VariationalSparseGP`` predict before training. With
    ``average_decay`` it predicts at its parameters' moving average (:class:`ParameterAverage`)."""
    import gpytorch
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

    torch.manual_seed(seed)
    d = data.X_train.shape[1]

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, Z):
            strategy = VariationalStrategy(self, Z, CholeskyVariationalDistribution(Z.size(0), mean_init_std=0.0),
                                           learn_inducing_locations=True)
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = _gpytorch_kernel("rbf", d)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    Xt = torch.as_tensor(data.X_test)
    model = SVGP(torch.as_tensor(Z)).double()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(INIT["noise"])
    mll = gpytorch.mlls.VariationalELBO(lik, model, num_data=len(y))
    params = list(model.parameters()) + list(lik.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    average = None if average_decay is None else ParameterAverage(params, average_decay)

    def evaluate():
        model.eval(); lik.eval()
        with torch.no_grad(), (contextlib.nullcontext() if average is None else average.applied()):
            pred = lik(model(Xt))
        model.train(); lik.train()
        return metrics(data, pred.mean.numpy(), pred.variance.numpy())

    def step():
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        opt.zero_grad()
        (-mll(model(X[idx]), y[idx])).backward()
        opt.step()
        if average is not None:
            average.update()

    model.train(); lik.train()
    return _minibatch_loop(step, evaluate, budget_s=budget_s, interval_s=interval_s)


def run_pyro_vsgp(data, Z, *, budget_s, interval_s, lr, batch_size, seed, average_decay=None):
    """``pyro.contrib.gp.models.VariationalSparseGP`` (whitened), minibatch Adam; ``average_decay``:
    as in :func:`run_svgp`."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    d = data.X_train.shape[1]
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    Xt = torch.as_tensor(data.X_test)
    kernel = gp.kernels.RBF(d, variance=torch.tensor(INIT["variance"]),
                            lengthscale=torch.full((d,), INIT["lengthscale"]))
    lik = gp.likelihoods.Gaussian(variance=torch.tensor(INIT["noise"]))
    model = gp.models.VariationalSparseGP(X[:batch_size], y[:batch_size], kernel, torch.as_tensor(Z), lik,
                                          num_data=len(y), whiten=True)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
    gen = torch.Generator().manual_seed(seed)
    average = None if average_decay is None else ParameterAverage(params, average_decay)

    def evaluate():
        with torch.no_grad(), (contextlib.nullcontext() if average is None else average.applied()):
            mean, var = model(Xt, full_cov=False)
            return metrics(data, mean.numpy(), (var + lik.variance).detach().numpy())

    def step():
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        model.set_data(X[idx], y[idx])
        opt.zero_grad()
        loss_fn(model.model, model.guide).backward()
        opt.step()
        if average is not None:
            average.update()

    return _minibatch_loop(step, evaluate, budget_s=budget_s, interval_s=interval_s)


def value_at(curve: list[dict], t: float, key: str = "rmse"):
    """``key`` of the last checkpoint at or before time ``t`` (``None`` before the first)."""
    before = [p[key] for p in curve if p["time_s"] <= t]
    return before[-1] if before else None


def share_ahead(ours: list[dict], others: list[list[dict]]) -> tuple[float, float | None]:
    """Over the checkpoint times of every curve within the span all of them cover, the share at
    which ``ours`` has an RMSE at most the best of ``others``, and the earliest time from which
    it stays so (``None`` if it is behind at the last one)."""
    start = max(c[0]["time_s"] for c in [ours, *others])
    end = min(c[-1]["time_s"] for c in [ours, *others])
    grid = sorted({p["time_s"] for c in [ours, *others] for p in c if start <= p["time_s"] <= end})
    ahead = [value_at(ours, t) <= min(value_at(c, t) for c in others) for t in grid]
    since = None
    for t, a in zip(reversed(grid), reversed(ahead)):
        if not a:
            break
        since = t
    return float(np.mean(ahead)), since


def share_ahead_by_checkpoint(ours: list[dict], others: list[list[dict]]) -> tuple[float, float | None]:
    """As :func:`share_ahead`, but checkpoint by checkpoint: over the indices ``k`` every curve has, the
    share at which ``ours``'s ``k``-th RMSE is at most the best of the others' ``k``-th, and the time of
    ``ours``'s checkpoint from which it stays so. Every run's :class:`Clock` takes its ``k``-th
    checkpoint once its training time passes the previous one's plus the interval, so the ``k``-th
    checkpoints of two runs lie within a few of their steps of each other, whereas :func:`share_ahead`
    compares at every checkpoint time of any run and so counts a run whose checkpoint came a few
    milliseconds later at its previous checkpoint's value for that instant."""
    k = min(len(c) for c in [ours, *others])
    ahead = [ours[i]["rmse"] <= min(c[i]["rmse"] for c in others) for i in range(k)]
    since = None
    for i in reversed(range(k)):
        if not ahead[i]:
            break
        since = ours[i]["time_s"]
    return float(np.mean(ahead)), since


def plot_curves(curves: dict, path: str, *, title: str, key: str = "rmse", ylabel: str = "test RMSE (minutes)",
                xlabel: str = "training time (s)", hline: tuple[float, str] | None = None) -> None:
    """One line per curve of ``{label: curve}``: ``key`` against training time, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves.items():
        ax.plot([p["time_s"] for p in curve], [p[key] for p in curve], label=label, marker=".", ms=3)
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls="--", lw=1, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=None, help="training rows (default: all)")
    p.add_argument("--inducing", type=int, nargs="+", default=None, help="M values (default 50 100)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--frontends", nargs="+", choices=["pyro", "numpyro"], default=["pyro"],
                   help="ADVGP's frontends (default: pyro; NumPyro's rows are named 'ADVGP (NumPyro) ...')")
    p.add_argument("--max-delay", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1024,
                   help="rows per ADVGP update, split between the workers (0: every worker's whole shard)")
    p.add_argument("--no-average", action="store_true",
                   help="ADVGP predicts at its last iterate, not at its averaged parameters")
    p.add_argument("--average-baselines", action="store_true",
                   help="the baselines also predict at their parameters' moving average (as ADVGP's server keeps it)")
    p.add_argument("--budget", type=float, default=None, help="training seconds per run")
    p.add_argument("--interval", type=float, default=None, help="seconds of training between checkpoints")
    args = p.parse_args(argv)
    quick = quick_mode(args)
    torch.set_default_dtype(torch.float64)
    threads = set_threads(args.threads)
    num_train = args.num_train if args.num_train is not None else (2000 if quick else None)
    inducing = args.inducing or ([20] if quick else [50, 100])
    budget = args.budget if args.budget is not None else (6.0 if quick else 120.0)
    interval = args.interval if args.interval is not None else budget / 30
    data = load_flights(seed=args.seed, test_size=2000 if quick else 30_000)
    if num_train is not None:
        data = data.subset(num_train, seed=args.seed)
    n = len(data.y_train)
    rows, curves = [], {}
    advgp_average = 0.0 if args.no_average else None  # the library's default, or the last iterate
    decay = averaging(advgp_average, advgp_batching(args.batch_size, 1)["batch_size"])
    for M in inducing:
        Z = kmeans_inducing(data.X_train, M, seed=args.seed)
        runs = {f"ADVGP {'(NumPyro) ' if f == 'numpyro' else ''}{w} worker{'s' if w > 1 else ''}":
                lambda w=w, f=f: run_advgp(data, Z, workers=w, max_delay=args.max_delay, budget_s=budget,
                                           interval_s=interval, threads=threads, frontend=f,
                                           average_decay=advgp_average,
                                           **advgp_batching(args.batch_size, w))
                for f in args.frontends for w in args.workers}
        sgd = dict(budget_s=budget, interval_s=interval, lr=0.01, batch_size=1024, seed=args.seed,
                   average_decay=DEFAULT_AVERAGE_DECAY if args.average_baselines else None)
        averaged = ", averaged" if args.average_baselines else ""
        runs[f"SVGP (GPyTorch){averaged}"] = lambda: (run_svgp(data, Z, **sgd), None)
        runs[f"VariationalSparseGP (Pyro){averaged}"] = lambda: (run_pyro_vsgp(data, Z, **sgd), None)
        curves[M], startups = {}, {}
        for name, fn in runs.items():
            curves[M][name], startups[name] = fn()
            print(f"M={M} {name}: {curves[M][name][-1]}", flush=True)
        baselines = [c for name, c in curves[M].items() if not name.startswith("ADVGP")]
        for name, curve in curves[M].items():
            row = {"M": M, "method": name, "n_train": n, "steps": curve[-1]["step"], "time_s": curve[-1]["time_s"],
                   "rmse": curve[-1]["rmse"], "nlpd": curve[-1]["nlpd"], "startup_s": startups[name],
                   "stood_in": curve[-1].get("stood_in")}
            if name.startswith("ADVGP"):
                row["share_ahead"], row["ahead_since_s"] = share_ahead(curve, baselines)
                row["share_ahead_by_checkpoint"], row["ahead_by_checkpoint_since_s"] = share_ahead_by_checkpoint(
                    curve, baselines)
            rows.append(row)
        os.makedirs(args.out, exist_ok=True)
        plot_curves(curves[M], os.path.join(args.out, f"advgp_flights_M{M}.png"),
                    title=f"flights, N={n:,}, M={M}", hline=(constant_rmse(data), "constant predictor"))
    write_results("advgp_flights", rows, out=args.out,
                  meta={"budget_s": budget, "interval_s": interval, "inducing": inducing, "workers": args.workers,
                        "max_delay": args.max_delay, "threads": threads, "batch_size": args.batch_size,
                        "frontends": args.frontends, "average_decay": decay,
                        "average_baselines": args.average_baselines,
                        "advgp_optim": advgp_batching(args.batch_size, 1)["optim"],
                        "quick": quick, "curves": {str(M): c for M, c in curves.items()}},
                  columns=["M", "method", "n_train", "steps", "time_s", "rmse", "nlpd", "startup_s", "stood_in",
                           "share_ahead", "ahead_since_s", "share_ahead_by_checkpoint", "ahead_by_checkpoint_since_s"],
                  notes=(f"RMSE in minutes (the constant predictor's is {constant_rmse(data):.2f}), NLPD per "
                         f"test point in the standardized unit, after {budget:.0f} s of training per run (ADVGP: "
                         f"after its first update; {threads} threads each, split between ADVGP's worker "
                         "processes). ADVGP's updates use "
                         + (f"{args.batch_size} rows split between its workers (minibatch estimates)"
                            if args.batch_size else "every worker's whole shard (exact data terms)")
                         + "; it predicts at "
                         + (f"its averaged parameters (average_decay {decay})" if decay else "its last iterate")
                         + ". startup_s: ADVGP's wall time to its first update (starting the workers, first "
                         "gradients), included in its clock. stood_in: worker gradients the server computed itself "
                         "while the workers started (minibatch runs). share_ahead: share of the checkpoint times at "
                         "which ADVGP's RMSE is at most the better baseline's (target: 1); ahead_since_s: from when on "
                         "it stays so; share_ahead_by_checkpoint and ahead_by_checkpoint_since_s: the same comparing each run's k-th "
                         "checkpoint with the others' k-th (a run whose checkpoint came milliseconds after another's "
                         "is not counted at its previous value). Curves in the JSON (meta.curves) and advgp_flights_M*.png."))
    return rows, curves


if __name__ == "__main__":
    main()
