"""Lattice kernel products against the exact chunked kernel product, in one process on the same data.

Per (data set, N, order): wall time of the lattice build + one product with 1 column and with 8
columns, of a product alone, of the exact chunked product (float64, row blocks), and the cosine
similarity of the lattice product with the exact one (mean and worst of the columns). Data: the
flights inputs (``scalegp.load_flights()``, d = 8, standardized, lengthscales learned by an exact GP
on a random subset) and synthetic standard-normal inputs with d = 2..20 (lengthscale sqrt(d)).
Also the speedup of 2 CPU threads over 1 for the lattice product.

Small validation run (minutes)::

    .venv/bin/python -m benchmarks.lattice_mvm --sizes 2000 10000 --dims 2 8 20 --out /tmp/lattice_mvm_small.json

Full run (all 243,853 flights rows; the exact product alone takes a long time on 2 cores)::

    .venv/bin/python -m benchmarks.lattice_mvm --sizes 10000 100000 243853 --dims 2 4 8 12 16 20 \\
        --out benchmarks/results/lattice_mvm.json

Writes JSON and prints a markdown table. Timings are medians of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pyro.contrib.gp import kernels as gpk

from pyro_scalegp.lattice import LatticeKernelOperator
from scalegp import load_flights


def exact_matmul(X: torch.Tensor, ell: torch.Tensor, variance: float, V: torch.Tensor, block: int = 2048):
    """``K V`` for the RBF kernel by row blocks (O(N^2 d) time, O(block N) memory)."""
    Z = X / ell
    sq = (Z**2).sum(1)
    out = torch.empty(X.shape[0], V.shape[1], dtype=V.dtype)
    for s in range(0, X.shape[0], block):
        zb = Z[s : s + block]
        r2 = (sq[s : s + block, None] - 2 * zb @ Z.T + sq[None, :]).clamp_min_(0)
        out[s : s + block] = torch.exp(-0.5 * r2) @ V
    return variance * out


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def learn_flights_lengthscales(X: torch.Tensor, y: torch.Tensor, n_sub: int = 1500, steps: int = 150, seed: int = 0):
    """RBF lengthscales / variance of an exact GP (pyro.contrib.gp GPRegression) fit on a subset."""
    import pyro
    from pyro.contrib.gp.models import GPRegression

    pyro.clear_param_store()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=g)[:n_sub]
    kern = gpk.RBF(X.shape[1], lengthscale=torch.ones(X.shape[1], dtype=X.dtype))
    gpr = GPRegression(X[idx], y[idx], kern, noise=torch.tensor(0.5, dtype=X.dtype))
    opt = torch.optim.Adam(gpr.parameters(), lr=0.05)
    loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(gpr.model, gpr.guide).backward()
        opt.step()
    return kern.lengthscale.detach().clone(), float(kern.variance.detach())


def run_case(label, X, ell, variance, orders, repeats, exact_max):
    n, d = X.shape
    rows = []
    g = torch.Generator().manual_seed(1)
    V8 = torch.randn(n, 8, dtype=X.dtype, generator=g)
    t_exact, exact = (None, None)
    if n <= exact_max:
        t_exact, exact = _median_time(lambda: exact_matmul(X, ell, variance, V8[:, :1]), 1)
    kern = gpk.RBF(d, variance=torch.tensor(variance, dtype=X.dtype), lengthscale=ell)
    for order in orders:
        with torch.no_grad():
            t_b1, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V8[:, :1], repeats)
            t_b8, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V8, repeats)
            op = LatticeKernelOperator(X, kern, order=order)
            t_p1, out = _median_time(lambda: op @ V8[:, :1], repeats)
            torch.set_num_threads(1)
            t_p1_1thr, _ = _median_time(lambda: op @ V8, repeats)
            torch.set_num_threads(2)
            t_p1_2thr, _ = _median_time(lambda: op @ V8, repeats)
        row = dict(data=label, n=n, d=d, order=order, vertices=op.lattice.impl.m, build_plus_1col_s=t_b1,
                   build_plus_8col_s=t_b8, ratio_8_over_1=t_b8 / t_b1, product_1col_s=t_p1,
                   threads_speedup_8col=t_p1_1thr / t_p1_2thr)
        if exact is not None:
            cos = torch.nn.functional.cosine_similarity(out, exact, dim=0)
            row.update(exact_1col_s=t_exact, speedup_vs_exact=t_exact / t_b1, cosine=float(cos.min()))
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 20])
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exact-max", type=int, default=300000, help="skip the exact product above this N")
    p.add_argument("--no-flights", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    if not args.no_flights:
        data = load_flights()
        Xf = torch.as_tensor(data.X_train, dtype=torch.float64)
        Xf = (Xf - Xf.mean(0)) / Xf.std(0)
        yf = torch.as_tensor(data.y_train, dtype=torch.float64)
        ell, var = learn_flights_lengthscales(Xf, yf)
        print("flights lengthscales", ell.numpy().round(3).tolist(), "variance", round(var, 4), flush=True)
        for n in args.sizes:
            idx = torch.randperm(Xf.shape[0], generator=torch.Generator().manual_seed(2))[: min(n, Xf.shape[0])]
            rows += run_case("flights", Xf[idx], ell, var, args.orders, args.repeats, args.exact_max)
    for d in args.dims:
        for n in args.sizes:
            X = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
            rows += run_case("normal", X, torch.full((d,), float(np.sqrt(d)), dtype=torch.float64), 1.0,
                             args.orders, args.repeats, args.exact_max)
    cols = ["data", "n", "d", "order", "vertices", "cosine", "build_plus_1col_s", "build_plus_8col_s",
            "ratio_8_over_1", "exact_1col_s", "speedup_vs_exact", "threads_speedup_8col"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
