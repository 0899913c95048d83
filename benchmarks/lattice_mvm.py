"""Lattice kernel products against the exact chunked kernel product and the authors' implementation,
in one process on the same data.

Per (data set, N, order), RBF kernel, float64:

* ours (:class:`pyro_scalegp.lattice.LatticeKernelOperator`): wall time of the whole build (validation,
  lattice, diagonal calibration) plus one product with 1 column and with 8 columns
  (``ratio_8_over_1``: one build serves all columns), of the calibration alone, of a product alone, and
  the build + 8-column product with 1 and with 2 OpenMP threads (``threads_speedup``);
* the exact product ``K v``, float64, in row blocks: on all rows when ``N <= --exact-rows``, else on a
  random subset of ``--exact-rows`` rows, its time scaled by ``N / rows`` (``exact_scaled`` says so);
  cosine similarities are taken over the rows computed, for each of 8 random columns: ``cosine`` is
  their mean and ``cosine_min`` the worst (one column's varies widely: 0.966-0.995 on 100,000 flights
  rows);
* the authors' ``gpytorch-lattice-kernel`` 0.0.dev1 (``pip install "scalegp[bench]"``): its filter
  ``LatticeFilterGeneral.apply(v, Z, kernel.dkernel_fn)`` of ``RBFLattice(order=r)``, which rebuilds
  its lattice on every call, in float32 (its C++ reads float32 only) and with its kernel
  ``exp(-|z - z'|^2)``, so ``Z = X / (lengthscale sqrt 2)`` gives the same RBF kernel. Its import needs
  ``gpytorch.lazy.LazyTensor``, which current GPyTorch lacks: ``linear_operator.LinearOperator`` is put
  there first. Its products are uncalibrated, so only its cosine similarity is comparable
  (``peer_scale`` is the ratio of norms to the exact product).

Data: the flights inputs (``scalegp.load_flights()``, d = 8, standardized) with the RBF lengthscales and
variance an exact GP learns on a random subset (:func:`learn_flights_lengthscales`, or given with
``--lengthscales``/``--variance``), and synthetic standard-normal inputs with d = 2..20 (lengthscale
sqrt(d)). Timings are medians of ``--repeats`` runs.

Small validation run (minutes)::

    .venv/bin/python -m benchmarks.lattice_mvm --sizes 2000 10000 --dims 2 8 --out /tmp/lattice_mvm_small.json

Full run (results in benchmarks/results/lattice_mvm.{json,md})::

    nice -n 5 .venv/bin/python -m benchmarks.lattice_mvm --sizes 10000 30000 100000 243853 \\
        --synthetic-sizes 10000 --dims 2 4 8 12 16 20 --out benchmarks/results/lattice_mvm.json

On a GPU (``--device cuda``: CuPy and a CUDA torch; ours runs the CUDA build, the exact product and the
peer run on the GPU too, and every time waits for the GPU's work to finish, after one untimed call)::

    python -m benchmarks.lattice_mvm --device cuda --exact-rows 250000 --sizes 10000 30000 100000 243853 \
        --synthetic-sizes 10000 --dims 2 4 8 12 16 20 --lengthscales ... --variance ... --out ...

Writes JSON, a markdown table and, with flights rows, a figure (time and cosine similarity against N
per order, ``.png``) next to it; ``--replot results.json`` only redraws the figure of a stored run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pyro.contrib.gp import kernels as gpk

from pyro_scalegp.lattice import LatticeKernelOperator
from scalegp import load_flights


def exact_rows_matmul(Z: torch.Tensor, rows: torch.Tensor, variance: float, V: torch.Tensor, block: int = 1024):
    """``(K V)[rows]`` for the RBF kernel of the scaled inputs ``Z = X / lengthscale`` by row blocks
    (``O(R N d)`` time for ``R`` rows, ``O(block N)`` memory)."""
    sq = (Z**2).sum(1)
    out = torch.empty(rows.numel(), V.shape[1], dtype=V.dtype, device=V.device)
    for s in range(0, rows.numel(), block):
        r = rows[s : s + block]
        r2 = (sq[r, None] - 2 * Z[r] @ Z.T + sq[None, :]).clamp_min_(0)
        out[s : s + block] = torch.exp(-0.5 * r2) @ V
    return variance * out


def _sync():
    """Wait for the GPU's queued work (nothing on a CPU run)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn, repeats):
    """Median wall time of ``repeats`` calls of ``fn`` and its last result; on a GPU after one untimed
    call (compilation, library set-up) and waiting for each call's work to finish."""
    times, out = [], None
    if torch.cuda.is_initialized():
        fn()
        _sync()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def learn_flights_lengthscales(X: torch.Tensor, y: torch.Tensor, n_sub: int = 2000, steps: int = 150, seed: int = 0):
    """RBF lengthscales / variance of an exact GP (pyro.contrib.gp GPRegression, Adam, ``steps`` steps)
    fit on ``n_sub`` random rows."""
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


def load_peer():
    """The authors' ``(RBFLattice, LatticeFilterGeneral)``, or the reason it cannot be used."""
    try:
        import gpytorch
        import gpytorch.lazy
        import linear_operator

        gpytorch.lazy.LazyTensor = linear_operator.LinearOperator  # what its import expects
        from gpytorch_lattice_kernel import RBFLattice
        from gpytorch_lattice_kernel.bilateral_kernel import LatticeFilterGeneral
    except Exception as err:  # reported in the results, not hidden
        return None, f"{type(err).__name__}: {err}"
    return (RBFLattice, LatticeFilterGeneral), None


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and smallest cosine similarity of the columns of ``a`` and ``b``."""
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)
    return float(c.mean()), float(c.min())


def run_case(label, X, ell, variance, orders, repeats, exact_rows, peer, device="cpu"):
    n, d = X.shape
    g = torch.Generator().manual_seed(1)
    V8 = torch.randn(n, 8, dtype=X.dtype, generator=g).to(device)
    V1 = V8[:, :1].contiguous()
    X, ell = X.to(device), ell.to(device)
    Z = X / ell
    rows = torch.arange(n) if n <= exact_rows else torch.randperm(n, generator=g)[:exact_rows].sort().values
    rows = rows.to(device)
    t_rows, _ = _median_time(lambda: exact_rows_matmul(Z, rows, variance, V1), 1)
    t_exact = t_rows * n / rows.numel()
    exact = exact_rows_matmul(Z, rows, variance, V8)  # for the accuracy of all 8 columns
    kern = gpk.RBF(d, variance=torch.tensor(variance, dtype=X.dtype), lengthscale=ell).to(device)
    out_rows = []
    for order in orders:
        with torch.no_grad():
            t_b1, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V1, repeats)
            t_b8, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V8, repeats)
            op = LatticeKernelOperator(X, kern, order=order)
            lat = op.lattice
            t_cal, _ = _median_time(lambda: lat.impl.calibrate(lat.coef), repeats)
            t_p1, _ = _median_time(lambda: op @ V1, repeats)
            t_p8, out = _median_time(lambda: op @ V8, repeats)
            speedup = None
            if device == "cpu":
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                t_thr1, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V8, repeats)
                torch.set_num_threads(2)
                t_thr2, _ = _median_time(lambda: LatticeKernelOperator(X, kern, order=order) @ V8, repeats)
                torch.set_num_threads(threads)
                speedup = t_thr1 / t_thr2
        row = dict(data=label, n=n, d=d, order=order, vertices=lat.impl.m,
                   calibration="exact" if lat.calibration.exact else "probes",
                   build_plus_1col_s=t_b1, build_plus_8col_s=t_b8, ratio_8_over_1=t_b8 / t_b1, calibration_s=t_cal,
                   product_1col_s=t_p1, product_8col_s=t_p8, threads_speedup=speedup,
                   exact_rows=rows.numel(), exact_scaled=rows.numel() < n, exact_1col_s=t_exact,
                   speedup_vs_exact=t_exact / t_b1, scale=float(out[rows].norm() / exact.norm()))
        row["cosine"], row["cosine_min"] = _cos(out[rows].cpu(), exact.cpu())
        if peer is not None:
            RBFLattice, LatticeFilterGeneral = peer
            pk = RBFLattice(ard_num_dims=d, order=order)
            Zp = (Z / math.sqrt(2)).float().contiguous()
            t_peer, _ = _median_time(lambda: LatticeFilterGeneral.apply(V1.float(), Zp, pk.dkernel_fn), repeats)
            # its filter takes one column at a time
            pout = torch.cat([LatticeFilterGeneral.apply(V8[:, j:j + 1].float(), Zp, pk.dkernel_fn) for j in range(8)], 1)
            row.update(peer_1col_s=t_peer, peer_scale=float(pout[rows].double().norm() / exact.norm()),
                       ours_speedup_vs_peer=t_peer / t_b1)
            row["peer_cosine"], row["peer_cosine_min"] = _cos(pout[rows].cpu(), exact.cpu())
        out_rows.append(row)
        print(json.dumps(row), flush=True)
    return out_rows


COLUMNS = ["data", "n", "d", "order", "vertices", "calibration", "cosine", "cosine_min", "peer_cosine",
           "peer_cosine_min", "build_plus_1col_s",
           "peer_1col_s", "ours_speedup_vs_peer", "exact_1col_s", "exact_scaled", "speedup_vs_exact",
           "calibration_s", "product_1col_s", "ratio_8_over_1", "threads_speedup"]


def markdown(rows, header: str) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Time and cosine similarity against N on the flights rows, one colour per order: ours (build +
    1 column, solid), the authors' call (dashed) and the exact product (black). False, and no file,
    without flights rows."""
    rows = [r for r in rows if r["data"] == "flights"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for i, order in enumerate(sorted({r["order"] for r in rows})):
        own = sorted((r for r in rows if r["order"] == order), key=lambda r: r["n"])
        n = [r["n"] for r in own]
        color = f"C{i}"
        ax_t.loglog(n, [r["build_plus_1col_s"] for r in own], "o-", color=color, label=f"ours, order {order}")
        ax_c.semilogx(n, [r["cosine"] for r in own], "o-", color=color, label=f"ours, order {order}")
        if own[0].get("peer_1col_s") is not None:
            ax_t.loglog(n, [r["peer_1col_s"] for r in own], "s--", color=color, label=f"authors, order {order}")
            ax_c.semilogx(n, [r["peer_cosine"] for r in own], "s--", color=color, label=f"authors, order {order}")
    exact = sorted({r["n"]: r["exact_1col_s"] for r in rows}.items())
    scaled = " (timed on a subset, scaled by N)" if any(r["exact_scaled"] for r in rows) else ""
    ax_t.loglog([n for n, _ in exact], [t for _, t in exact], "k^-", label="exact product" + scaled)
    ax_c.axhline(0.99, color="r", lw=0.8, ls=":", label="target 0.99")
    ax_t.set(xlabel="flights rows N", ylabel="seconds (ours: build + 1 column)", title="time of one product")
    ax_c.set(xlabel="flights rows N", ylabel="mean cosine with the exact product", title="accuracy")
    for ax in (ax_t, ax_c):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_title(meta: dict) -> str:
    where = f"{meta['threads']} CPU threads" if meta.get("device", "cpu") == "cpu" else meta.get("gpu", "GPU")
    return f"Lattice MVM on the flights (RBF, d = 8), {where}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000], help="flights sizes")
    p.add_argument("--synthetic-sizes", type=int, nargs="+", default=[2000])
    p.add_argument("--dims", type=int, nargs="*", default=[2, 8, 20], help="synthetic d (none: no synthetic data)")
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exact-rows", type=int, default=4096, help="exact product on at most this many rows")
    p.add_argument("--lengthscales", type=float, nargs=8, default=None,
                   help="flights RBF lengthscales (default: learned by an exact GP on 2000 rows)")
    p.add_argument("--variance", type=float, default=None)
    p.add_argument("--no-flights", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (also when CI is set)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the data live: 'cuda' runs our CUDA build, the exact product and the peer on the GPU")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--replot", type=Path, default=None,
                   help="only draw the figure of a results JSON of this script (next to it, .png)")
    args = p.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        if not plot(results["rows"], args.replot.with_suffix(".png"), _plot_title(results["meta"])):
            raise SystemExit(f"--replot: {args.replot} has no flights rows to plot")
        return
    if args.quick or os.environ.get("CI"):
        args.sizes, args.synthetic_sizes, args.dims, args.repeats = [2000], [1000], [2, 8], 1
    torch.set_num_threads(2)
    peer, why = (None, "skipped (--no-peer)") if args.no_peer else load_peer()
    if peer is None:
        print("gpytorch-lattice-kernel not run:", why, flush=True)
    rows, meta = [], {"threads": 2, "peer": why or "gpytorch-lattice-kernel 0.0.dev1", "device": args.device}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    if not args.no_flights:
        data = load_flights()
        Xf = torch.as_tensor(data.X_train, dtype=torch.float64)
        Xf = (Xf - Xf.mean(0)) / Xf.std(0)
        if args.lengthscales is None:
            t = time.perf_counter()
            ell, var = learn_flights_lengthscales(Xf, torch.as_tensor(data.y_train, dtype=torch.float64))
            meta["lengthscales_from"] = f"exact GP on 2000 rows, 150 Adam steps ({time.perf_counter() - t:.0f} s)"
        else:
            ell, var = torch.tensor(args.lengthscales, dtype=torch.float64), float(args.variance)
            meta["lengthscales_from"] = "given (--lengthscales / --variance)"
        meta.update(flights_lengthscales=ell.tolist(), flights_variance=var)
        print("flights lengthscales", ell.numpy().round(3).tolist(), "variance", round(var, 4), flush=True)
        perm = torch.randperm(Xf.shape[0], generator=torch.Generator().manual_seed(2))
        for n in args.sizes:
            rows += run_case("flights", Xf[perm[: min(n, Xf.shape[0])]], ell, var, args.orders, args.repeats,
                             args.exact_rows, peer, args.device)
    for d in args.dims:
        for n in args.synthetic_sizes:
            X = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
            rows += run_case("normal", X, torch.full((d,), float(np.sqrt(d)), dtype=torch.float64), 1.0,
                             args.orders, args.repeats, args.exact_rows, peer, args.device)
    where = f"{meta['threads']} threads" if args.device == "cpu" else f"GPU: {meta['gpu']}"
    header = (f"Lattice MVM (RBF, float64 ours / float32 peer, {where}; peer: {meta['peer']}; "
              f"flights lengthscales: {meta.get('lengthscales_from', 'n/a')}). Exact products on at most "
              f"{args.exact_rows} rows, time scaled by N / rows where exact_scaled.")
    table = markdown(rows, header)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(table)
        plot(rows, args.out.with_suffix(".png"), _plot_title(meta))


if __name__ == "__main__":
    main()
