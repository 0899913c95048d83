"""Full HGP training time against the number of training points (synthetic GP data, 8 dimensions).

For each ``N`` in ``--sizes`` (default 10k, 30k, 100k, 300k, 1M), in a fresh subprocess: draw
``N + --test`` points from a known RBF GP in 8 dimensions (``scalegp.gp_draws(method="rff")``,
lengthscale 1.5, variance 1, noise variance 0.1), partition into KD-tree experts of
``--expert-size`` points, and train the hyperparameters with L-BFGS from the common initial
values (variance 0.5, lengthscales 1, noise 0.5) until convergence, the criterion of
:func:`benchmarks.hgp_fit.fit_hgp`: at most ``--max-iter`` iterations, stopping earlier when the
per-point loss or every parameter changes by less than ``1e-6`` in an iteration. Training time
includes the partition, not the data generation. The learned hyperparameters are compared
with the truth, and rBCM predictions of the held-out points give a test RMSE (its floor is the
noise standard deviation, 0.316).

Target (issue 2): 1M points trained in under 10 minutes on the 2-core machine.
Writes ``results/hgp_scale.json``, ``.md`` and a log-log plot ``results/hgp_scale.png``.

Run: ``python -m benchmarks.hgp_scale`` (the full sweep took 4 minutes on 2 cores on 2026-12-04,
most of it the 1M case); ``--quick`` for a smoke test.
"""
from __future__ import annotations

import os

import numpy as np

from .common import parser, quick_mode, run_isolated, write_results

NAME = "hgp_scale"
TRUTH = {"lengthscale": 1.5, "variance": 1.0, "noise": 0.1}


def scale_case(N: int, d: int, expert_size: int, max_iter: int, n_test: int, threads: int, seed: int,
               show_progress: bool) -> dict:
    """Train HGP on ``N`` synthetic points (in this process) and report times and accuracy."""
    import torch

    from scalegp import gp_draws

    from .common import Timer, gaussian_metrics
    from .hgp_fit import fit_hgp, predict_rules

    torch.set_num_threads(threads)
    with Timer() as t_data:
        X, y, _ = gp_draws(N + n_test, d, lengthscale=TRUTH["lengthscale"], variance=TRUTH["variance"],
                           noise=TRUTH["noise"], method="rff", seed=seed)
    Xtr, ytr, Xte, yte = X[:N], y[:N], X[N:], y[N:]
    fit = fit_hgp(Xtr, ytr, expert_size=expert_size, max_iter=max_iter, seed=seed,
                  show_progress=show_progress, desc=f"HGP N={N}")
    hyp = fit.hyperparameters()
    out = {"N": N, "train_s": fit.train_s, "partition_s": fit.partition_s, "data_s": t_data.seconds,
           "iterations": fit.iterations, "evaluations": fit.evaluations,
           "s_per_eval": (fit.train_s - fit.partition_s) / max(1, fit.evaluations),
           "experts": fit.experts.num_experts, "final_loss": fit.losses[-1],
           "lengthscale_mean": float(np.mean(hyp["lengthscale"])),
           "lengthscale_max_rel_err": float(np.max(np.abs(np.array(hyp["lengthscale"]) / TRUTH["lengthscale"] - 1))),
           "variance": hyp["variance"], "noise": hyp["noise"]}
    if n_test:
        pred = predict_rules(fit, Xte, rules=("rbcm",), show_progress=False)
        mean, var, secs = pred["rbcm"]
        out.update({"test_rmse": gaussian_metrics(yte, mean, var)["rmse_std"],
                    "test_nlpd": gaussian_metrics(yte, mean, var)["nlpd"], "predict_s": secs})
    return out


def plot(rows: list[dict], path: str, target_s: float = 600.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = np.array([r["N"] for r in rows], dtype=float)
    t = np.array([r["train_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(N, t, "o-", label="HGP training (L-BFGS to convergence)")
    ax.loglog(N, t[0] * N / N[0], "k--", lw=0.8, label="linear in N")
    ax.axhline(target_s, color="r", lw=0.8, ls=":", label=f"target at 1M: {target_s / 60:.0f} min")
    for n_, t_, r in zip(N, t, rows):
        ax.annotate(f"{r['iterations']} it", (n_, t_), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("training points N")
    ax.set_ylabel("wall time [s]")
    ax.set_title(f"HGP, d=8, experts of {rows[0].get('expert_size', '?')} points")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    p.add_argument("--dims", type=int, default=8)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--test", type=int, default=5000, help="held-out points for the test RMSE (0: none)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if quick_mode(args):
        sizes, args.expert_size, args.max_iter, args.test = [2000, 4000], 128, 5, 500
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for N in sizes:
        out, peak = run_isolated(scale_case, N, args.dims, args.expert_size, args.max_iter, args.test,
                                 threads, args.seed, True)
        out["peak_rss_mib"] = peak
        out["expert_size"] = args.expert_size
        rows.append(out)
        print(f"N={N:>8d}: train {out['train_s']:7.1f} s, {out['iterations']} iterations, "
              f"{out['evaluations']} evaluations ({out['s_per_eval']:.2f} s each), peak RSS {peak:.0f} MiB, "
              f"lengthscale {out['lengthscale_mean']:.3f} (truth {TRUTH['lengthscale']}), "
              f"noise {out['noise']:.4f} (truth {TRUTH['noise']}), test RMSE {out.get('test_rmse', float('nan')):.4f}",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"{NAME}.png")
    plot(rows, png)
    notes = (f"Synthetic RBF GP draws (random Fourier features), d={args.dims}, truth {TRUTH}; KD-tree experts of "
             f"{args.expert_size} points, no duplication; L-BFGS (strong Wolfe) from variance 0.5, lengthscales 1, "
             f"noise 0.5, at most {args.max_iter} iterations, stop when the per-point loss changes < 1e-6; "
             f"{threads} threads. train_s includes the partition. test_rmse: rBCM on {args.test} held-out points "
             f"(noise floor 0.316). Plot: {png}.")
    write_results(NAME, rows, out=args.out, notes=notes,
                  meta={"sizes": sizes, "expert_size": args.expert_size, "max_iter": args.max_iter,
                        "quick": quick_mode(args), "plot": png},
                  columns=["N", "experts", "train_s", "iterations", "evaluations", "s_per_eval", "peak_rss_mib",
                           "lengthscale_mean", "lengthscale_max_rel_err", "noise", "test_rmse", "predict_s"])
    return rows


if __name__ == "__main__":
    main()
