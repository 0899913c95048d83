"""The lattice operator inside GPyTorch: an ``ExactGP`` whose covariance is the Pyro
:class:`~pyro_scalegp.lattice.LatticeKernelOperator`, beside the same ``ExactGP`` with GPyTorch's own
kernel (the exact kernel matrix, what a GPyTorch user has without us) and with the Simplex-GP authors'
GPyTorch kernel (``gpytorch-lattice-kernel`` 0.0.dev1, ``make bench`` installs it), on flights training
subsets.

The models are GPyTorch's, with GPyTorch's default solvers: past 800 rows the marginal likelihood by
preconditioned CG and stochastic Lanczos quadrature (BBMM), the predictive variances by LOVE
(``fast_pred_var``). Only the kernel matrix differs: a Matern 5/2 with ARD lengthscales from
:data:`benchmarks.baselines.INIT`, as a lazily evaluated dense matrix (GPyTorch), our order-1 lattice (a
Pyro kernel module inside the GPyTorch model) or the authors' order-1 ``MaternLattice`` in a
``ScaleKernel``. The authors' kernel runs in float32 (its filter's dtype; the others in float64), with
its operator's ``diag`` under the name ``_diagonal`` that current linear_operator calls, and without the
preconditioner, whose pivots need entries its operator cannot give current linear_operator
(``max_preconditioner_size(0)``). Each (method, N) runs ``--steps`` Adam steps in a fresh process (for
its peak memory) and predicts the ``--test`` test rows; the GPyTorch kernel is skipped where its matrices
would not fit in the memory available (``8 N^2`` bytes times :data:`DENSE_COPIES`, the peak measured at
10,000 rows), the authors' kernel where its package is not installed.

Reported: seconds a training step (median), training and prediction time, test RMSE (minutes) and NLPD,
peak memory, and the ratios of the other kernels' step times to ours at the same N.

Run: ``python -m benchmarks.lattice_gpytorch`` (about 10 minutes on 2 idle cores); ``--quick`` (or ``CI``
set) for a smoke test on 1,000 rows.
"""
from __future__ import annotations

import statistics
import time

from scalegp.lattice import _available_bytes

from .common import gaussian_metrics, parser, quick_mode, run_isolated, set_threads, write_results
from .lattice_mvm import load_peer

NAME = "lattice_gpytorch"
#: peak resident memory of the GPyTorch-kernel model in units of one N x N float64 matrix (measured: 12 at
#: 10,000 rows; at 20,000 rows it exhausted this machine's 24 GB)
DENSE_COPIES = 12


#: the methods and their names in the results
METHODS = {"lattice": "lattice operator", "gpytorch": "GPyTorch kernel", "authors": "authors' lattice kernel"}


def fit_job(n: int, method: str, *, steps: int, lr: float, num_test: int, threads: int, seed: int) -> dict:
    """Train one GPyTorch ``ExactGP`` (``method``: a key of :data:`METHODS`) on ``n`` flights rows."""
    import contextlib

    import gpytorch
    import pyro.contrib.gp as gp
    import torch

    from pyro_scalegp import LatticeKernelOperator
    from scalegp import load_flights

    from .baselines import INIT, _exact_model

    set_threads(threads)
    dtype = torch.float32 if method == "authors" else torch.float64
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    data = load_flights(num_train=n).subset(num_test=num_test, seed=seed)
    X, y = torch.tensor(data.X_train, dtype=dtype), torch.tensor(data.y_train, dtype=dtype)
    d = X.shape[1]
    solver = contextlib.nullcontext()
    if method == "lattice":
        kernel = gp.kernels.Matern52(d, variance=torch.tensor(INIT["variance"]),
                                     lengthscale=torch.full((d,), INIT["lengthscale"]))
        model = _exact_model(X, y, kernel, lambda k, x: LatticeKernelOperator(x, k))
    elif method == "gpytorch":
        model = _exact_model(X, y, "matern52")
    else:
        peer, reason = load_peer()
        if peer is None:
            raise RuntimeError(reason)
        from gpytorch_lattice_kernel.bilateral_kernel import MaternLattice, SquareLazyLattice

        SquareLazyLattice._diagonal = SquareLazyLattice.diag  # the name current linear_operator calls
        solver = gpytorch.settings.max_preconditioner_size(0)
        kernel = gpytorch.kernels.ScaleKernel(MaternLattice(ard_num_dims=d, nu=2.5, order=1))
        kernel.base_kernel.lengthscale = torch.full((1, d), INIT["lengthscale"])
        kernel.outputscale = torch.tensor(INIT["variance"])
        model = _exact_model(X, y, kernel)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    times = []
    with solver:
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = -mll(model(X), y)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), gpytorch.settings.fast_pred_var():
            pred = model.likelihood(model(torch.tensor(data.X_test, dtype=dtype)))
            mean, var = pred.mean.double().numpy(), pred.variance.double().numpy()
        predict_s = time.perf_counter() - t0
    out = {"method": METHODS[method], "n_train": n, "dtype": str(dtype).removeprefix("torch."),
           "step_s": statistics.median(times), "train_s": sum(times), "predict_s": predict_s,
           "loss_last": float(loss.detach())}
    out.update(gaussian_metrics(data.y_test, mean, var, y_std=data.y_std))
    return out


def main(argv=None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 50000])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--test", type=int, default=2000, help="test rows")
    args = p.parse_args(argv)
    quick = quick_mode(args)
    sizes, steps, num_test = ([1000], 2, 200) if quick else (args.sizes, args.steps, args.test)
    threads = set_threads(args.threads)
    _, peer_missing = load_peer()
    rows = []
    for n in sizes:
        by_method = {}
        for method in METHODS:
            need = DENSE_COPIES * 8 * n * n
            if method == "gpytorch" and need > _available_bytes():
                rows.append({"method": METHODS[method], "n_train": n, "skipped": f"needs about {need / 2**30:.0f} GiB"})
                continue
            if method == "authors" and peer_missing:
                rows.append({"method": METHODS[method], "n_train": n, "skipped": peer_missing})
                continue
            row, peak = run_isolated(fit_job, n, method, steps=steps, lr=args.lr, num_test=num_test,
                                     threads=threads, seed=args.seed)
            row["peak_rss_mib"] = peak
            by_method[method] = row
            rows.append(row)
            print(row, flush=True)
        for method in ("gpytorch", "authors"):
            if method in by_method:
                by_method["lattice"][f"{method}_step_over_ours"] = by_method[method]["step_s"] / by_method["lattice"]["step_s"]
    write_results(NAME, rows, out=args.out, meta={"quick": quick, "steps": steps, "threads": threads,
                                                  "num_test": num_test, "seed": args.seed},
                  columns=["method", "n_train", "dtype", "step_s", "gpytorch_step_over_ours", "authors_step_over_ours",
                           "train_s", "predict_s", "rmse", "nlpd", "peak_rss_mib", "skipped"])
    return rows


if __name__ == "__main__":
    main()
