"""What a user would pick instead of HGP, trained and tested on the same data.

* :func:`exact_gpytorch` -- an exact GP in GPyTorch (Cholesky: ``max_cholesky_size`` set above
  the data size), trained by Adam on the marginal likelihood; on a subset of the training rows,
  the largest that trains in a given time (:func:`exact_size_for_budget`).
* :func:`svgp_gpytorch` -- GPyTorch's SVGP (Hensman et al. 2013): ``M`` inducing points
  initialized by k-means, minibatch Adam on the ELBO.
* :func:`sgpr_pyro` -- Pyro's ``pyro.contrib.gp.models.SparseGPRegression`` with
  ``approx="VFE"`` (Titsias's bound), full-batch Adam, k-means inducing points.

Every function takes a :class:`scalegp.RegressionData` (standardized targets) and returns a dict
with ``rmse`` (test RMSE in the original unit: the standardized RMSE times ``data.y_std``,
minutes for the flights), ``rmse_std``, ``nlpd`` (mean negative log predictive density of the
noisy test targets per test point, in the *standardized* unit), ``train_s``, ``predict_s``,
``wall_s`` and the settings used. All run in float64 on the CPU, with the same kernel family
(ARD lengthscales) and the same initial hyperparameters as HGP.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .common import Timer, gaussian_metrics, progress

__all__ = ["INIT", "exact_gpytorch", "svgp_gpytorch", "sgpr_pyro", "exact_size_for_budget",
           "kmeans_inducing"]

#: initial hyperparameters shared by every method (standardized data)
INIT = {"variance": 0.5, "lengthscale": 1.0, "noise": 0.5}


def kmeans_inducing(X: np.ndarray, M: int, *, seed: int = 0, max_points: int = 20_000) -> np.ndarray:
    """``M`` inducing inputs: k-means centres of a random subset of at most ``max_points`` rows."""
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    sub = X[rng.choice(len(X), min(len(X), max_points), replace=False)]
    if M >= len(sub):
        return sub[:M].copy()
    km = MiniBatchKMeans(n_clusters=M, random_state=seed, n_init=1, batch_size=4096, max_iter=50)
    return km.fit(sub).cluster_centers_


def _gpytorch_kernel(kernel: str, d: int):
    import gpytorch

    if kernel == "rbf":
        base = gpytorch.kernels.RBFKernel(ard_num_dims=d)
    elif kernel in ("matern32", "matern52"):
        base = gpytorch.kernels.MaternKernel(nu=1.5 if kernel == "matern32" else 2.5, ard_num_dims=d)
    else:
        raise ValueError(f"kernel: unknown kernel {kernel!r}; use 'rbf', 'matern32' or 'matern52'")
    base.lengthscale = torch.full((1, d), INIT["lengthscale"])
    out = gpytorch.kernels.ScaleKernel(base)
    out.outputscale = torch.tensor(INIT["variance"])
    return out


def _tensor(a, dtype=torch.float64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _finish(name, data, mean, var, train_s, predict_s, **settings) -> dict:
    out = {"method": name}
    out.update(gaussian_metrics(data.y_test, mean, var, y_std=data.y_std))
    out.update({"train_s": train_s, "predict_s": predict_s, "wall_s": train_s + predict_s})
    out.update(settings)
    return out


# ----------------------------------------------------------------------------------------------
# exact GP
# ----------------------------------------------------------------------------------------------

def _exact_model(X, y, kernel, covariance=None):
    """GPyTorch's exact GP on ``(X, y)``, in their dtype, with the noise of :data:`INIT`, a constant mean
    and ``kernel``: a name for :func:`_gpytorch_kernel`, or a module whose covariance of inputs ``x`` is
    ``covariance(kernel, x)`` (default ``kernel(x)``)."""
    import gpytorch

    module = _gpytorch_kernel(kernel, X.shape[1]) if isinstance(kernel, str) else kernel
    covariance = covariance or (lambda k, x: k(x))

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self):
            lik = gpytorch.likelihoods.GaussianLikelihood()
            lik.noise = torch.tensor(INIT["noise"])
            super().__init__(X, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = module

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covariance(self.covar_module, x))

    return ExactGP().to(X.dtype)


def _exact_settings(n: int):
    import contextlib

    import gpytorch

    stack = contextlib.ExitStack()
    stack.enter_context(gpytorch.settings.max_cholesky_size(max(10**6, 2 * n)))
    stack.enter_context(gpytorch.settings.fast_computations(False, False, False))
    return stack


def exact_size_for_budget(data, budget_s: float, *, iters: int = 50, kernel: str = "rbf",
                          probe: int = 2000, seed: int = 0, max_n: int = 20_000) -> int:
    """The largest training subset whose exact-GP training (``iters`` Adam steps) fits ``budget_s``.

    Times a few steps at ``probe`` points and extrapolates with the Cholesky's ``n^3``; the
    overhead at the probe size makes the estimate err on the small side.
    """
    n0 = min(probe, len(data.y_train))
    sub = data.subset(n0, seed=seed)
    X, y = _tensor(sub.X_train), _tensor(sub.y_train)
    model = _exact_model(X, y, kernel)
    import gpytorch

    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    with _exact_settings(n0):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            opt.zero_grad()
            (-mll(model(X), y)).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    t_step = float(np.median(times[1:]))
    n = int(n0 * (budget_s / (iters * t_step)) ** (1.0 / 3.0))
    return int(min(max(n, 500), max_n, len(data.y_train)))


def exact_gpytorch(data, *, num_train: int | None = None, kernel: str = "rbf", iters: int = 50,
                   lr: float = 0.1, seed: int = 0, predict_batch: int = 2000,
                   show_progress: bool = True) -> dict:
    """Exact GP (GPyTorch, Cholesky) on ``num_train`` random training rows; ``iters`` Adam steps."""
    import gpytorch

    torch.manual_seed(seed)
    sub = data.subset(num_train, seed=seed) if num_train is not None else data
    n = len(sub.y_train)
    X, y = _tensor(sub.X_train), _tensor(sub.y_train)
    model = _exact_model(X, y, kernel)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with Timer() as t_train, _exact_settings(n):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in progress(range(iters), desc=f"exact GP n={n}", disable=not show_progress):
            opt.zero_grad()
            loss = -mll(model(X), y)
            loss.backward()
            opt.step()
    with Timer() as t_pred, _exact_settings(n), torch.no_grad():
        model.eval()
        means, variances = [], []
        Xt = _tensor(data.X_test)
        for s in range(0, len(Xt), predict_batch):
            pred = model.likelihood(model(Xt[s:s + predict_batch]))
            means.append(pred.mean)
            variances.append(pred.variance)
    mean, var = torch.cat(means).numpy(), torch.cat(variances).numpy()
    return _finish("exact GP (GPyTorch)", data, mean, var, t_train.seconds, t_pred.seconds,
                   n_train=n, kernel=kernel, iters=iters, optimizer=f"Adam lr={lr}",
                   final_loss=float(loss.detach()), noise=float(model.likelihood.noise.detach()))


# ----------------------------------------------------------------------------------------------
# SVGP
# ----------------------------------------------------------------------------------------------

def svgp_gpytorch(data, *, num_inducing: int = 500, kernel: str = "rbf", steps: int = 3000,
                  batch_size: int = 1024, lr: float = 0.01, seed: int = 0, predict_batch: int = 5000,
                  show_progress: bool = True, keep_mean: bool = False, time_s: float | None = None) -> dict:
    """GPyTorch SVGP with ``num_inducing`` learned inducing inputs (k-means init), minibatch Adam:
    ``steps`` steps, or fewer if ``time_s`` seconds of training (k-means included) run out first
    (the steps done are reported).

    ``keep_mean`` adds the test predictive means as ``test_mean``."""
    import gpytorch
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

    torch.manual_seed(seed)
    d = data.X_train.shape[1]

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, Z):
            dist = CholeskyVariationalDistribution(Z.size(0))
            strategy = VariationalStrategy(self, Z, dist, learn_inducing_locations=True)
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = _gpytorch_kernel(kernel, d)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    X, y = _tensor(data.X_train), _tensor(data.y_train)
    N = len(y)
    with Timer() as t_train:
        Z = _tensor(kmeans_inducing(data.X_train, num_inducing, seed=seed))
        model = SVGP(Z).double()
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        lik.noise = torch.tensor(INIT["noise"])
        mll = gpytorch.mlls.VariationalELBO(lik, model, num_data=N)
        opt = torch.optim.Adam(list(model.parameters()) + list(lik.parameters()), lr=lr)
        model.train(); lik.train()
        gen = torch.Generator().manual_seed(seed)
        perm, pos = torch.randperm(N, generator=gen), 0
        done = 0
        # a run bounded in time counts its steps without a total (no estimate of the time to `steps`)
        budget = "" if time_s is None else f", up to {time_s:.0f} s"
        steps_left = range(steps) if time_s is None else iter(range(steps))  # an iterator has no length
        for _ in progress(steps_left, desc=f"SVGP M={num_inducing}{budget}", disable=not show_progress):
            if time_s is not None and time.perf_counter() - t_train.start >= time_s:
                break
            done += 1
            if pos + batch_size > N:
                perm, pos = torch.randperm(N, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            opt.zero_grad()
            loss = -mll(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
    with Timer() as t_pred, torch.no_grad():
        model.eval(); lik.eval()
        means, variances = [], []
        Xt = _tensor(data.X_test)
        for s in range(0, len(Xt), predict_batch):
            pred = lik(model(Xt[s:s + predict_batch]))
            means.append(pred.mean)
            variances.append(pred.variance)
    mean, var = torch.cat(means).numpy(), torch.cat(variances).numpy()
    out = _finish("SVGP (GPyTorch)", data, mean, var, t_train.seconds, t_pred.seconds,
                  n_train=N, num_inducing=num_inducing, kernel=kernel, steps=done,
                  epochs=round(done * batch_size / N, 2), optimizer=f"Adam lr={lr} batch={batch_size}",
                  noise=float(lik.noise.detach()))
    if keep_mean:
        out["test_mean"] = mean
    return out


# ----------------------------------------------------------------------------------------------
# Pyro SparseGPRegression (VFE)
# ----------------------------------------------------------------------------------------------

def _pyro_kernel(kernel: str, d: int):
    import pyro.contrib.gp as gp

    cls = {"rbf": gp.kernels.RBF, "matern32": gp.kernels.Matern32, "matern52": gp.kernels.Matern52}
    if kernel not in cls:
        raise ValueError(f"kernel: unknown kernel {kernel!r}; use one of {sorted(cls)}")
    return cls[kernel](input_dim=d, variance=torch.tensor(INIT["variance"]),
                       lengthscale=torch.full((d,), INIT["lengthscale"]))


def sgpr_pyro(data, *, num_inducing: int = 500, num_train: int | None = None, kernel: str = "rbf",
              steps: int = 300, lr: float = 0.05, seed: int = 0, predict_batch: int = 5000,
              show_progress: bool = True) -> dict:
    """Pyro ``SparseGPRegression(approx="VFE")`` on ``num_train`` rows (all by default), full-batch Adam.

    Pyro builds the ``M x N`` cross-covariance whole, so memory grows as ``8 M N`` bytes times a few.
    """
    import pyro
    import pyro.contrib.gp as gp

    pyro.clear_param_store()
    torch.manual_seed(seed)
    sub = data.subset(num_train, seed=seed) if num_train is not None else data
    X, y = _tensor(sub.X_train), _tensor(sub.y_train)
    with Timer() as t_train:
        Xu = _tensor(kmeans_inducing(sub.X_train, num_inducing, seed=seed))
        model = gp.models.SparseGPRegression(X, y, _pyro_kernel(kernel, X.shape[1]), Xu,
                                             noise=torch.tensor(INIT["noise"]), approx="VFE")
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
        for _ in progress(range(steps), desc=f"SGPR-VFE M={num_inducing}", disable=not show_progress):
            opt.zero_grad()
            loss = loss_fn(model.model, model.guide)
            loss.backward()
            opt.step()
    with Timer() as t_pred, torch.no_grad():
        means, variances = [], []
        Xt = _tensor(data.X_test)
        for s in range(0, len(Xt), predict_batch):
            m, v = model(Xt[s:s + predict_batch], full_cov=False, noiseless=False)
            means.append(m)
            variances.append(v)
    mean, var = torch.cat(means).numpy(), torch.cat(variances).numpy()
    pyro.clear_param_store()
    return _finish("SGPR-VFE (Pyro)", data, mean, var, t_train.seconds, t_pred.seconds,
                   n_train=len(y), num_inducing=num_inducing, kernel=kernel, steps=steps,
                   optimizer=f"Adam lr={lr} full batch", noise=float(model.noise.detach()))
