"""ADVGP with stragglers (Peng et al. 2017, section 6.1): test RMSE against time for several delay bounds.

What is measured: ADVGP (:class:`pyro_scalegp.AsyncProximalSVI`, or NumPyro's with
``--frontend numpyro``) on a random subset of the
flights training rows, 4 worker processes, each assigned at start a random sleep drawn from
``--sleeps`` (seconds) that it waits before every gradient, as in the paper. For
``max_delay`` 0 (synchronous), 4, 16 and 64, the same model (same k-means inducing inputs,
initial hyperparameters, sleeps) trains for the same time budget (updates that use stale
gradients take steps divided by one plus their mean delay, ``AsyncProximalSVI``'s default
``shrink_stale_steps``; ``--full-stale-steps`` for the paper's full steps); test RMSE (minutes) and
NLPD are recorded at checkpoints (evaluation excluded from the clock). The summary gives
each bound's final RMSE, number of updates, largest staleness used, and the first time its
RMSE is at or below the synchronous run's final RMSE, counted from the first update so that
the workers' start-up (reported as ``startup_s``) does not enter; the issue's target is that a
bounded delay gets there in at most half the synchronous run's time (``ratio`` <= 0.5).
``advgp_stragglers.png`` plots RMSE against time. Run::

    .venv/bin/python -m benchmarks.advgp_stragglers          # 40,000 rows, M = 50, 90 s per run
    .venv/bin/python -m benchmarks.advgp_stragglers --quick  # 2,000 rows, M = 10, seconds
    .venv/bin/python -m benchmarks.advgp_stragglers --median-lengthscale  # lengthscales start at the
                                                  # median distance between inputs (not INIT's 1.0)
    .venv/bin/python -m benchmarks.advgp_stragglers --full-stale-steps  # the paper's full steps for
                                                  # stale gradients (shrink_stale_steps=False)
    .venv/bin/python -m benchmarks.advgp_stragglers --frontend numpyro  # the NumPyro AsyncProximalSVI
"""
from __future__ import annotations

import os

import numpy as np
import torch
from scipy.spatial.distance import pdist

from benchmarks.advgp_flights import ADVGP_OPTIM, constant_rmse, plot_curves, run_advgp
from benchmarks.baselines import INIT, kmeans_inducing
from benchmarks.common import parser, quick_mode, set_threads, write_results
from scalegp.datasets import load_flights


def time_to_reach(curve: list[dict], target: float, key: str = "rmse") -> float | None:
    """The first checkpoint time at which ``key`` is at most ``target`` (``None`` if never)."""
    for p in curve:
        if p[key] <= target:
            return p["time_s"]
    return None


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=None, help="training rows (default 40,000)")
    p.add_argument("--inducing", type=int, default=None, help="M (default 50)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--delays", type=int, nargs="+", default=[0, 4, 16, 64])
    p.add_argument("--sleeps", type=float, nargs="+", default=None,
                   help="the sleeps (s) workers draw from (default 0.1 0.5 1.0)")
    p.add_argument("--budget", type=float, default=None, help="training seconds per run")
    p.add_argument("--eps", type=float, default=ADVGP_OPTIM["eps"],
                   help=f"ADADELTA's eps, the size of its first steps (default {ADVGP_OPTIM['eps']:g})")
    p.add_argument("--median-lengthscale", action="store_true",
                   help="start the lengthscales at the median distance between training inputs "
                        "(default: the shared initial values of benchmarks.baselines.INIT)")
    p.add_argument("--frontend", choices=["pyro", "numpyro"], default="pyro")
    p.add_argument("--full-stale-steps", action="store_true",
                   help="do not shrink the steps of updates that use stale gradients (shrink_stale_steps=False)")
    args = p.parse_args(argv)
    quick = quick_mode(args)
    torch.set_default_dtype(torch.float64)
    threads = set_threads(args.threads)
    num_train = args.num_train or (2000 if quick else 40_000)
    M = args.inducing or (10 if quick else 50)
    budget = args.budget or (5.0 if quick else 90.0)
    choices = args.sleeps or ([0.0, 0.05, 0.1] if quick else [0.1, 0.5, 1.0])
    sleeps = np.random.default_rng(args.seed).choice(choices, size=args.workers).tolist()
    data = load_flights(seed=args.seed, test_size=2000 if quick else 10_000).subset(num_train, seed=args.seed)
    Z = kmeans_inducing(data.X_train, M, seed=args.seed)
    lengthscale = float(np.median(pdist(data.X_train[:1000]))) if args.median_lengthscale else INIT["lengthscale"]

    curves, startups = {}, {}
    for tau in args.delays:
        curves[tau], startups[tau] = run_advgp(data, Z, workers=args.workers, max_delay=tau, budget_s=budget,
                                interval_s=budget / 40, worker_sleep=sleeps, threads=threads,
                                lengthscale=lengthscale, optim={**ADVGP_OPTIM, "eps": args.eps},
                                shrink_stale_steps=not args.full_stale_steps, frontend=args.frontend)
        print(f"max_delay={tau}: {curves[tau][-1]}", flush=True)
    sync = curves.get(0)
    rows = []
    for tau, curve in curves.items():
        row = {"max_delay": tau, "updates": curve[-1]["step"], "max_staleness": curve[-1]["max_staleness"],
               "time_s": curve[-1]["time_s"], "rmse": curve[-1]["rmse"], "nlpd": curve[-1]["nlpd"],
               "best_rmse": min(p["rmse"] for p in curve), "startup_s": startups[tau]}
        if sync is not None:
            sync_time = sync[-1]["time_s"] - startups[0]
            reach = time_to_reach(curve, sync[-1]["rmse"])
            row["reaches_sync_final_s"] = None if reach is None else reach - startups[tau]
            row["ratio"] = None if reach is None else row["reaches_sync_final_s"] / sync_time
            reach = time_to_reach(curve, min(p["rmse"] for p in sync))
            row["ratio_to_sync_best"] = None if reach is None else (reach - startups[tau]) / sync_time
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    after_first = {f"max_delay={tau}": [{**p, "time_s": p["time_s"] - startups[tau]} for p in c if p["step"] >= 1]
                   for tau, c in curves.items()}
    plot_curves(after_first, os.path.join(args.out, "advgp_stragglers.png"),
                title=f"stragglers: {args.workers} workers sleeping {sleeps} s",
                xlabel="training time after the first update (s)", hline=(constant_rmse(data), "constant predictor"))
    write_results("advgp_stragglers", rows, out=args.out,
                  meta={"n_train": num_train, "M": M, "workers": args.workers, "sleeps_s": sleeps,
                        "sleep_choices_s": choices, "budget_s": budget, "threads": threads, "quick": quick,
                        "initial_lengthscale": lengthscale, "optim": {**ADVGP_OPTIM, "eps": args.eps},
                        "shrink_stale_steps": not args.full_stale_steps, "frontend": args.frontend,
                        "curves": {str(t): c for t, c in curves.items()}},
                  notes=(f"{args.workers} workers on {num_train:,} flights rows, M={M}; each worker sleeps its own "
                         f"random time ({sleeps} s, drawn from {choices}) before every gradient; steps of updates "
                         + ("at full size whatever their gradients' delay (shrink_stale_steps=False). "
                            if args.full_stale_steps else "divided by 1 + the mean delay of the gradients they sum. ")
                         + "RMSE in minutes. "
                         "startup_s: wall time to the first update (spawning the workers, first gradients). "
                         "reaches_sync_final_s: time after the first update of the first checkpoint with an RMSE at "
                         "or below the synchronous run's final RMSE; ratio: that time over the synchronous run's "
                         "training time after its first update (target <= 0.5); ratio_to_sync_best: the same for the "
                         "synchronous run's best RMSE (which its final can be above)."))
    return rows, curves


if __name__ == "__main__":
    main()
