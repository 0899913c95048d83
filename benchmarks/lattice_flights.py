"""Simplex-GP on the 2013 NYC flights, trained on all training rows, beside HGP and the baselines of the HGP benchmark.

In one run, on the same split (``scalegp.load_flights()``: 243,853 standardized training rows, 8
features) and the same ``--test`` test rows (a seeded random subset), each method in a fresh subprocess (for its peak
memory):

* Simplex-GP (:class:`numpyro_scalegp.lattice.SimplexGPMarginal`): an exact-GP marginal likelihood
  whose kernel matrix is the permutohedral-lattice operator, on all training rows; Matern 5/2 with
  ARD lengthscales (the kernel of the HGP runs), ``--steps`` Adam steps of NumPyro ``SVI`` under
  ``jit`` (the lattice is rebuilt inside every step), each ``log_prob`` by preconditioned CG and
  stochastic Lanczos quadrature with ``--probes`` fresh probes per step; predictive means by CG (to
  ``--predict-cg-tol``: the training tolerance of 0.01 with 100 iterations left the solve unconverged
  and the test RMSE at 74 minutes instead of 34) and
  variances from each test point's ``--neighbors`` nearest training points under the exact kernel
  (:mod:`scalegp.neighbors`; conservative, and close to the CG variances), or with ``--neighbors 0``
  by ``--variance-rank`` Lanczos steps (LOVE; also conservative, but on these data far above the CG
  variances: mean 2.29 against 0.58 on 256 test rows, where 256 neighbours give 0.59);
* HGP (:func:`benchmarks.hgp_flights.hgp_job`): local experts of ``--expert-size`` points, L-BFGS,
  predictions by PoE, gPoE, BCM, rBCM and GRBCM;
* GPyTorch SVGP (600 Adam steps), Pyro ``SparseGPRegression`` (VFE, on a subset) and a GPyTorch
  exact GP (on a subset), with short settings that fit a few minutes each.

All start from the same hyperparameters (:data:`benchmarks.baselines.INIT`). Metrics: test RMSE in
minutes, NLPD per test point of the standardized noisy targets (add ``log(y_std) = 3.81`` for
minutes), wall time (train and predict).

Run: ``python -m benchmarks.lattice_flights`` (12-19 minutes on 2 idle cores); ``--quick``
(or ``CI`` set) for a smoke test on 2,000 rows.
"""
from __future__ import annotations

import os

import numpy as np

from .common import parser, quick_mode, run_isolated, write_results

NAME = "lattice_flights"


def simplex_job(data, *, steps: int, lr: float, order: int, num_probes: int, cg_tol: float, max_cg_iter: int,
                precond_rank: int, variance_rank: int, neighbors: int, threads: int, predict_cg_tol: float,
                predict_max_cg_iter: int, seed: int = 0) -> dict:
    """Train the NumPyro :class:`SimplexGPMarginal` by SVI (Adam, jit) on ``data`` and predict its test rows
    (CG to ``predict_cg_tol`` / ``predict_max_cg_iter``, tighter than the training solves)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the lattice kernels' OpenMP loops (a fresh process)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp.lattice import SimplexGPMarginal

    from .baselines import INIT
    from .common import Timer, gaussian_metrics
    from .hgp_fit import NOISE_FLOOR

    X, y = jnp.asarray(data.X_train), jnp.asarray(data.y_train)
    d = X.shape[1]
    positive = numpyro.distributions.constraints.positive
    settings = dict(order=order, num_probes=num_probes, cg_tol=cg_tol, max_cg_iter=max_cg_iter,
                    precond_rank=precond_rank)

    def model(X, y):
        ell = numpyro.param("lengthscale", jnp.full(d, INIT["lengthscale"]), constraint=positive)
        var = numpyro.param("variance", INIT["variance"], constraint=positive)
        noise = numpyro.param("noise", INIT["noise"], constraint=numpyro.distributions.constraints.greater_than(
            NOISE_FLOOR))
        numpyro.sample("y", SimplexGPMarginal(nk.Matern52(d, variance=var, lengthscale=ell), X, noise,
                                              key=numpyro.prng_key(), **settings), obs=y)

    svi = SVI(model, lambda X, y: None, numpyro.optim.Adam(lr), Trace_ELBO())
    losses = []
    with Timer() as t_train:
        state = svi.init(jax.random.PRNGKey(seed), X, y)
        update = jax.jit(svi.update)
        for step in range(steps):
            state, loss = update(state, X, y)
            losses.append(float(loss) / len(y))
            print(f"  Simplex-GP step {step + 1}/{steps}: loss/N {losses[-1]:.4f}", flush=True)
    params = {k: np.asarray(v).tolist() for k, v in svi.get_params(state).items()}
    kernel = nk.Matern52(d, variance=jnp.asarray(params["variance"]), lengthscale=jnp.asarray(params["lengthscale"]))
    with Timer() as t_pred:
        predict_settings = settings | dict(cg_tol=predict_cg_tol, max_cg_iter=predict_max_cg_iter)
        pred = SimplexGPMarginal(kernel, X, jnp.asarray(params["noise"]), **predict_settings).predict(
            y, jnp.asarray(data.X_test), variance_rank=None if neighbors else variance_rank,
            neighbors=neighbors or None)
        mean, var = np.asarray(pred.mean), np.asarray(pred.variance)
    row = {"method": "Simplex-GP (NumPyro)", "n_train": len(y), "platform": jax.default_backend()}
    row.update(gaussian_metrics(data.y_test, mean, var, y_std=data.y_std))
    row.update({"train_s": t_train.seconds, "predict_s": t_pred.seconds, "wall_s": t_train.seconds + t_pred.seconds,
                "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
                "variance_rank": None if neighbors else variance_rank, "neighbors": neighbors,
                "hyperparameters": params, "predict_cg_tol": predict_cg_tol,
                "predict_max_cg_iter": predict_max_cg_iter} | settings)
    return row


def main(argv=None) -> list[dict]:
    from scalegp import load_flights

    from .hgp_flights import _job, hgp_job

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--test", type=int, default=2000, help="test rows used (of 30,000)")
    p.add_argument("--steps", type=int, default=30, help="Simplex-GP Adam steps")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--cg-tol", type=float, default=0.01)
    p.add_argument("--max-cg-iter", type=int, default=300,
                   help="training CG iterations (100 stopped at a relative residual of 0.55 on all rows)")
    p.add_argument("--precond-rank", type=int, default=15)
    p.add_argument("--predict-cg-tol", type=float, default=1e-3,
                   help="CG tolerance of the predictions (SimplexGPMarginal's default; 0.01 gave 74 min RMSE)")
    p.add_argument("--predict-max-cg-iter", type=int, default=1000)
    p.add_argument("--neighbors", type=int, default=256, help="nearest training points per test variance (0: LOVE)")
    p.add_argument("--variance-rank", type=int, default=100, help="Lanczos steps of the LOVE variances")
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=40,
                   help="HGP L-BFGS iterations at most (20 stopped in mid-descent, as in the demo)")
    p.add_argument("--skip", default="", help="comma-separated methods to skip: hgp,svgp,sgpr,exact")
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    data = load_flights()
    inducing, svgp_steps, sgpr_train, sgpr_steps, exact_train, exact_iters = 500, 600, 20_000, 100, 3000, 30
    if quick_mode(args):
        data = data.subset(2000, seed=args.seed)
        args.test, args.steps, args.expert_size, args.max_iter, args.variance_rank = 300, 3, 128, 4, 20
        inducing, svgp_steps, sgpr_train, sgpr_steps, exact_train, exact_iters = 16, 5, 1000, 3, 300, 3
    data = data.subset(num_test=args.test, seed=args.seed)
    skip = set(filter(None, args.skip.split(",")))
    print(f"flights: {len(data.y_train)} training rows, {len(data.y_test)} test rows; {threads} threads", flush=True)

    rows = []
    row, peak = run_isolated(simplex_job, data, steps=args.steps, lr=args.lr, order=args.order,
                             num_probes=args.probes, cg_tol=args.cg_tol, max_cg_iter=args.max_cg_iter,
                             precond_rank=args.precond_rank, variance_rank=args.variance_rank,
                             neighbors=args.neighbors, threads=threads,
                             predict_cg_tol=args.predict_cg_tol, predict_max_cg_iter=args.predict_max_cg_iter,
                             seed=args.seed)
    rows.append(row | {"peak_rss_mib": peak})
    if "hgp" not in skip:
        hgp_rows, peak = run_isolated(hgp_job, data, kernel="matern52", expert_size=args.expert_size, duplication=1,
                                      max_iter=args.max_iter, threads=threads, seed=args.seed, calibration_rows=0,
                                      show_progress=False)
        rows += [r | {"peak_rss_mib": peak} for r in hgp_rows]
    jobs = [("svgp", "svgp_gpytorch", {"num_inducing": inducing, "steps": svgp_steps}),
            ("sgpr", "sgpr_pyro", {"num_inducing": min(inducing, 200), "num_train": sgpr_train, "steps": sgpr_steps}),
            ("exact", "exact_gpytorch", {"num_train": exact_train, "iters": exact_iters})]
    for key, fn_name, kwargs in jobs:
        if key in skip:
            continue
        r, peak = run_isolated(_job, fn_name, data, threads, kwargs | {"kernel": "matern52", "seed": args.seed})
        rows.append(r | {"peak_rss_mib": peak})
    for r in rows:
        print(f"{r['method']:24s} RMSE {r['rmse']:.3f} min  NLPD {r['nlpd']:.4f}  train {r['train_s']:.1f} s  "
              f"predict {r['predict_s']:.1f} s  (n_train {r['n_train']})", flush=True)
    notes = ("RMSE in minutes; NLPD per test point of the standardized noisy targets (add log(y_std) = "
             f"{np.log(data.y_std):.3f} for minutes); wall_s = train_s + predict_s. Simplex-GP: {args.steps} Adam "
             f"steps (lr {args.lr}) on all training rows, order {args.order}, {args.probes} probes, CG tolerance "
             f"{args.cg_tol} (max {args.max_cg_iter} iterations) in training and {args.predict_cg_tol} (max "
             f"{args.predict_max_cg_iter}) in prediction, preconditioner rank {args.precond_rank}; variances "
             + (f"from each test row's {args.neighbors} nearest training rows (exact kernel, conservative)"
                if args.neighbors else f"by {args.variance_rank} Lanczos steps (LOVE, conservative)")
             + ". HGP: local experts, Matern 5/2, L-BFGS; the "
             f"baselines shortened (SVGP {svgp_steps} Adam steps). Each method in its own process with {threads} "
             "threads; peak RSS of that process.")
    write_results(NAME, rows, out=args.out, notes=notes,
                  meta={k: v for k, v in vars(args).items() if k != "out"} | {"quick": quick_mode(args)},
                  columns=["method", "rmse", "nlpd", "train_s", "predict_s", "wall_s", "n_train", "peak_rss_mib"])
    return rows


if __name__ == "__main__":
    main()
