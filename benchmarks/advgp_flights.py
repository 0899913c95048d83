"""ADVGP on the flights data beside GPyTorch SVGP and Pyro VariationalSparseGP: RMSE/NLPD against wall time.

Every method starts from the same hyperparameters (``baselines.INIT``) and the same k-means
inducing inputs; test RMSE (minutes) and NLPD (standardized unit) are recorded at checkpoints,
with the evaluation time excluded from the training clock. ADVGP runs
:class:`pyro_scalegp.AsyncProximalSVI` with 1, 2 and 4 worker processes (full-batch data
terms over the shards, proximal ADADELTA); SVGP and VariationalSparseGP take minibatch Adam
steps. Run::

    .venv/bin/python -m benchmarks.advgp_flights            # all training rows, M = 50 and 100
    .venv/bin/python -m benchmarks.advgp_flights --quick    # 2,000 rows, M = 20, seconds
"""
from __future__ import annotations

import time
import warnings

import pyro
import pyro.contrib.gp as gp
import torch

from benchmarks.baselines import INIT, _gpytorch_kernel, kmeans_inducing
from benchmarks.common import gaussian_metrics, parser, quick_mode, set_threads, write_results
from pyro_scalegp import ADVGP, AsyncProximalSVI
from scalegp.datasets import load_flights


class _Clock:
    """Training time with evaluation pauses taken out."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def evaluate(self, fn):
        t = time.perf_counter()
        out = fn()
        self.paused += time.perf_counter() - t
        return out


def _metrics(data, mean, var) -> dict:
    m = gaussian_metrics(data.y_test, mean, var, y_std=data.y_std)
    return {"rmse": m["rmse"], "nlpd": m["nlpd"]}


def run_advgp(data, Z, *, workers, max_delay, budget_s, eval_every, lr):
    pyro.clear_param_store()
    d = data.X_train.shape[1]
    kernel = gp.kernels.RBF(d, variance=torch.tensor(INIT["variance"]), lengthscale=torch.full((d,), INIT["lengthscale"]))
    model = ADVGP(kernel, torch.as_tensor(Z), INIT["noise"])
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    Xt = torch.as_tensor(data.X_test)

    def evaluate():
        with torch.no_grad():
            pred = model.predict(Xt)
        return _metrics(data, pred.mean.numpy(), pred.variance.numpy())

    curve = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AsyncProximalSVI(model, X, y, num_workers=workers, max_delay=max_delay, optim={"lr": lr}) as svi:
            clock = _Clock()  # includes the workers' start-up
            while clock.elapsed() < budget_s:
                svi.step()
                if svi.version % eval_every == 0:
                    curve.append({"time_s": clock.elapsed(), "step": svi.version, **clock.evaluate(evaluate)})
    return curve


def run_svgp(data, Z, *, budget_s, eval_every, lr, batch_size, seed):
    import gpytorch
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

    torch.manual_seed(seed)
    d = data.X_train.shape[1]

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, Z):
            strategy = VariationalStrategy(self, Z, CholeskyVariationalDistribution(Z.size(0)),
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
    opt = torch.optim.Adam(list(model.parameters()) + list(lik.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def evaluate():
        model.eval(); lik.eval()
        with torch.no_grad():
            pred = lik(model(Xt))
        model.train(); lik.train()
        return _metrics(data, pred.mean.numpy(), pred.variance.numpy())

    curve, step = [], 0
    model.train(); lik.train()
    clock = _Clock()
    while clock.elapsed() < budget_s:
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        opt.zero_grad()
        (-mll(model(X[idx]), y[idx])).backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            curve.append({"time_s": clock.elapsed(), "step": step, **clock.evaluate(evaluate)})
    return curve


def run_pyro_vsgp(data, Z, *, budget_s, eval_every, lr, batch_size, seed):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    d = data.X_train.shape[1]
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    Xt = torch.as_tensor(data.X_test)
    kernel = gp.kernels.RBF(d, variance=torch.tensor(INIT["variance"]), lengthscale=torch.full((d,), INIT["lengthscale"]))
    lik = gp.likelihoods.Gaussian(variance=torch.tensor(INIT["noise"]))
    model = gp.models.VariationalSparseGP(X[:batch_size], y[:batch_size], kernel, torch.as_tensor(Z), lik,
                                          num_data=len(y), whiten=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
    gen = torch.Generator().manual_seed(seed)

    def evaluate():
        with torch.no_grad():
            mean, var = model(Xt, full_cov=False)
        return _metrics(data, mean.numpy(), (var + lik.variance).detach().numpy())

    curve, step = [], 0
    clock = _Clock()
    while clock.elapsed() < budget_s:
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        model.set_data(X[idx], y[idx])
        opt.zero_grad()
        loss_fn(model.model, model.guide).backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            curve.append({"time_s": clock.elapsed(), "step": step, **clock.evaluate(evaluate)})
    return curve


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=None, help="training rows (default: all)")
    p.add_argument("--inducing", type=int, nargs="+", default=None, help="M values (default 50 100)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-delay", type=int, default=0)
    p.add_argument("--budget", type=float, default=None, help="training seconds per run")
    p.add_argument("--advgp-lr", type=float, default=1.0)
    args = p.parse_args(argv)
    quick = quick_mode(args)
    torch.set_default_dtype(torch.float64)
    set_threads(args.threads)
    num_train = args.num_train if args.num_train is not None else (2000 if quick else None)
    inducing = args.inducing or ([20] if quick else [50, 100])
    budget = args.budget if args.budget is not None else (20.0 if quick else 600.0)
    data = load_flights(seed=args.seed, test_size=2000 if quick else 30_000)
    if num_train is not None:
        data = data.subset(num_train, seed=args.seed)
    eval_advgp, eval_sgd = (5, 10) if quick else (20, 500)
    rows = []
    for M in inducing:
        Z = kmeans_inducing(data.X_train, M, seed=args.seed)
        runs = [(f"ADVGP w={w} tau={args.max_delay}",
                 lambda w=w: run_advgp(data, Z, workers=w, max_delay=args.max_delay, budget_s=budget,
                                       eval_every=eval_advgp, lr=args.advgp_lr)) for w in args.workers]
        runs.append(("SVGP (GPyTorch)", lambda: run_svgp(data, Z, budget_s=budget, eval_every=eval_sgd, lr=0.01,
                                                          batch_size=1024, seed=args.seed)))
        runs.append(("VariationalSparseGP (Pyro)", lambda: run_pyro_vsgp(data, Z, budget_s=budget, eval_every=eval_sgd,
                                                                          lr=0.01, batch_size=1024, seed=args.seed)))
        for name, fn in runs:
            curve = fn()
            for point in curve:
                rows.append({"method": name, "M": M, "n_train": len(data.y_train), **point})
            last = curve[-1] if curve else {}
            print(f"M={M} {name}: {len(curve)} checkpoints, final {last}", flush=True)
    write_results("advgp_flights", rows, out=args.out,
                  meta={"budget_s": budget, "inducing": inducing, "workers": args.workers,
                        "max_delay": args.max_delay, "quick": quick},
                  notes="RMSE in minutes, NLPD per test point in the standardized unit; time_s excludes evaluation.")


if __name__ == "__main__":
    main()
