"""Parallel HGP evaluation: in-process against worker processes and torch.distributed ranks.

One value + gradient of the HGP objective (``E`` experts of ``n`` points in ``d`` dimensions,
float64, RBF kernel with ARD lengthscales, gradient with respect to every kernel hyperparameter
and the noise) evaluated four ways on the same problem:

* ``in-process``: :class:`pyro_scalegp.HGPMarginal` with ``workers=0`` and every core's threads
  (``--threads``), and with one thread;
* ``workers=1``, ``workers=2``: the experts sharded over worker processes
  (:func:`pyro_scalegp.parallel.pool_log_prob`, threads divided among the processes); the pool
  is started once (``start_s``) and reused by every timed call;
* ``distributed x2``: two ``torch.distributed`` (gloo) ranks on 127.0.0.1, each holding half of
  the experts and only their data, value and gradient all-reduced
  (:func:`pyro_scalegp.parallel.distributed_log_prob`); a call is timed from a barrier to the
  slower rank's end.

Times are medians of ``--repeats`` calls after one warm-up; every case runs in a fresh process.
``rel_diff`` is the largest relative difference of the value and gradient from in-process.

Run: ``python -m benchmarks.hgp_parallel`` (the issue's 200 x 512 x 8 case; a few minutes on
2 cores), ``--quick`` for a smoke test.
"""
from __future__ import annotations

import math
import os
import socket
import time

import numpy as np

from .common import markdown_table, parser, quick_mode, run_isolated, timeit, write_results

NAME = "hgp_parallel"
LENGTHSCALE, VARIANCE, NOISE, JITTER = 1.5, 1.0, 0.1, 1e-6


def _problem(E: int, n: int, d: int, seed: int):
    from scalegp import partition

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((E * n, d))
    y = np.sin(X.sum(1)) + 0.3 * rng.standard_normal(E * n)
    experts = partition(X, expert_size=n, method="random", seed=seed)
    return X, y, experts


def _model(d: int):
    import pyro
    import pyro.contrib.gp as gp
    import torch

    pyro.clear_param_store()
    kernel = gp.kernels.RBF(input_dim=d, variance=torch.tensor(VARIANCE), lengthscale=torch.full((d,), LENGTHSCALE))
    log_noise = torch.tensor(math.log(NOISE), requires_grad=True)
    return kernel, log_noise, list(kernel.parameters()) + [log_noise]


def local_case(workers: int, E: int, n: int, d: int, repeats: int, seed: int = 0, threads: int | None = None) -> dict:
    """In-process (``workers=0``, ``threads`` torch threads) or worker-pool evaluation (threads
    divided among the workers), timed in this (fresh) process."""
    import torch

    from pyro_scalegp import HGPMarginal, parallel

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    X_np, y_np, experts = _problem(E, n, d, seed)
    X, y = torch.as_tensor(X_np), torch.as_tensor(y_np)
    kernel, log_noise, params = _model(d)
    out: dict = {"start_s": 0.0}
    if workers:
        t0 = time.perf_counter()
        pool = parallel.ExpertPool(X, experts, workers)
        out["start_s"] = time.perf_counter() - t0
        out["threads"] = pool.threads

    def call():
        for p in params:
            p.grad = None
        # workers=pool: HGPMarginal(workers=n) would build (and cache) the same pool itself
        value = HGPMarginal(kernel, X, log_noise.exp(), experts=experts, jitter=JITTER,
                            workers=pool if workers else 0).log_prob(y)
        value.backward()
        return value

    value = call()
    out["value"] = float(value.detach())
    out["grad"] = torch.cat([p.grad.reshape(-1) for p in params]).tolist()
    out.update(timeit(call, repeats=repeats, warmup=1))
    if workers:
        pool.close()
    else:
        out["threads"] = torch.get_num_threads()
    return out


def _rank(rank: int, world: int, port: int, E: int, n: int, d: int, repeats: int, seed: int, queue) -> None:
    try:
        import torch
        import torch.distributed as tdist

        from pyro_scalegp import HGPMarginal

        torch.set_default_dtype(torch.float64)
        threads = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        start = time.perf_counter() - t0
        X_np, y_np, experts = _problem(E, n, d, seed)
        mine = experts.index[rank::world]
        rows, local = np.unique(mine, return_inverse=True)
        X, y = torch.as_tensor(X_np[rows]), torch.as_tensor(y_np[rows])
        index = local.reshape(mine.shape)
        kernel, log_noise, params = _model(d)

        def call():
            for p in params:
                p.grad = None
            value = HGPMarginal(kernel, X, log_noise.exp(), experts=index, jitter=JITTER,
                                distributed=True).log_prob(y)
            value.backward()
            return value

        value = call()
        grad = torch.cat([p.grad.reshape(-1) for p in params]).tolist()
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            tdist.barrier()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times[1:])
        tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
        tdist.destroy_process_group()
        queue.put((rank, "ok", {"value": float(value.detach()), "grad": grad, "times_s": slowest.tolist(),
                                "start_s": start, "threads": threads}))
    except BaseException as exc:  # report instead of leaving the parent waiting
        import traceback

        queue.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}"))


def distributed_case(world: int, E: int, n: int, d: int, repeats: int, seed: int = 0, timeout: float = 1800) -> dict:
    """``world`` gloo ranks on 127.0.0.1 (spawned processes); times of the slowest rank."""
    import multiprocessing as mp
    import queue as queue_mod
    import statistics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, E, n, d, repeats, seed, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise RuntimeError("distributed ranks did not finish in time")
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"distributed ranks died: (rank, exit code) {dead}")
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    out = dict(results[0])
    times = out.pop("times_s")
    out.update({"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
                "start_s": max(r["start_s"] for r in results.values())})
    return out


def _rel_diff(out: dict, ref: dict) -> float:
    a = np.array([out["value"]] + out["grad"])
    b = np.array([ref["value"]] + ref["grad"])
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=200)
    p.add_argument("--expert-size", type=int, default=512)
    p.add_argument("--dims", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if quick_mode(args):
        args.experts, args.expert_size, args.repeats = 8, 64, 2
    E, n, d, reps = args.experts, args.expert_size, args.dims, args.repeats
    print(f"HGP value+gradient, {E} experts x {n} points x {d} dims, float64, {os.cpu_count()} cores")
    threads = args.threads or os.cpu_count() or 1
    cases = [("in-process", 0, 1, threads), ("in-process 1 thread", 0, 1, 1), ("workers=1", 1, 1, None),
             ("workers=2", 2, 2, None)]
    results = {}
    for name, workers, procs, nthreads in cases:
        out, peak = run_isolated(local_case, workers, E, n, d, reps, args.seed, nthreads)
        results[name] = (out, peak, procs)
        print(f"{name:20s} median {out['median_s']:.3f} s  (start {out['start_s']:.1f} s)", flush=True)
    out = distributed_case(2, E, n, d, reps, args.seed)
    results["distributed x2"] = (out, float("nan"), 2)
    print(f"{'distributed x2':20s} median {out['median_s']:.3f} s  (start {out['start_s']:.1f} s)", flush=True)

    ref = results["in-process"][0]
    rows = []
    for name, (out, peak, procs) in results.items():
        rows.append({
            "mode": name, "processes": procs, "threads_each": out["threads"], "median_s": out["median_s"],
            "min_s": out["min_s"], "speedup": ref["median_s"] / out["median_s"], "start_s": out["start_s"],
            "rel_diff": _rel_diff(out, ref), "value": out["value"], "peak_rss_mib": peak,
        })
    columns = ["mode", "processes", "threads_each", "median_s", "min_s", "speedup", "start_s", "rel_diff"]
    print(markdown_table(rows, columns))
    notes = ("`speedup` is in-process median / this median; `start_s` the one-off start of the pool or of the "
             "process group (not in the timed calls); `rel_diff` the largest relative difference of value and "
             "gradient from in-process. `peak_rss_mib` is the parent process only (workers not included).")
    write_results(NAME, rows, out=args.out, columns=columns, notes=notes,
                  meta={"experts": E, "expert_size": n, "dims": d, "repeats": reps, "quick": quick_mode(args)})
    return rows


if __name__ == "__main__":
    main()
