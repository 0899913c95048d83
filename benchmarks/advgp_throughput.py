"""ADVGP throughput: training points processed per second per worker, 1 and 2 worker processes
(Pyro and NumPyro) and 3 local ``torch.distributed`` processes.

What is measured, on the flights training rows with M inducing inputs, synchronous updates
(``max_delay=0``: every update takes exactly one gradient of its data term from every worker):
after ``--warmup`` updates (start-up, first gradients), the wall time of ``--steps`` further
updates. Reported: updates per second, rows per second, rows per second per worker, and the
scaling efficiency against one worker (rows/s per worker relative to the 1-worker run of the
same frontend and batching; 1.0 is linear scaling). Configurations:

* ``in-process``: the data term's value and gradient in this process, one thread, no
  server/worker machinery: the floor one worker could reach;
* ``processes``: ``AsyncProximalSVI`` of each frontend with 1 and 2 local workers
  (``num_threads=1``: one torch thread, or one BLAS thread beside XLA's own), whole shards:
  an update processes all ``N`` rows;
* ``processes, minibatches``: the same with ``--batch-size`` rows an update split between the
  workers (the flights benchmark's setting; ``--minibatch-steps`` timed updates, the workers
  started before the clock: ``stand_in=False``), where the cost per update is mostly the
  messages and each process's threads;
* ``torch.distributed``: :func:`pyro_scalegp.async_svi.distributed_proximal_svi` over gloo with 3
  processes on 127.0.0.1 (rank 0 the server, ranks 1 and 2 the workers), one thread each.

Run::

    .venv/bin/python -m benchmarks.advgp_throughput          # all 243,853 rows, M = 50
    .venv/bin/python -m benchmarks.advgp_throughput --quick  # 4,000 rows, M = 10
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.advgp_flights import ADVGP_MINIBATCH_OPTIM, ADVGP_OPTIM, advgp_frontend, new_advgp
from benchmarks.baselines import kmeans_inducing
from benchmarks.common import parser, quick_mode, write_results
from pyro_scalegp.async_svi import distributed_proximal_svi
from scalegp.datasets import load_flights


def _data(num_train, M, seed):
    data = load_flights(seed=seed)
    if num_train is not None:
        data = data.subset(num_train, seed=seed)
    return data, kmeans_inducing(data.X_train, M, seed=seed)


def in_process(data, Z, *, warmup, steps) -> float:
    """Seconds per evaluation of the full data term's value and gradient, one thread."""
    model = new_advgp(data, Z)
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)

    def once():
        model.zero_grad()
        model.data_term(X, y).backward()

    for _ in range(warmup):
        once()
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    return (time.perf_counter() - t0) / steps


def with_processes(data, Z, *, frontend, workers, warmup, steps, batch_size=None) -> float:
    """Seconds per synchronous update of ``frontend``'s ``AsyncProximalSVI`` with ``workers``
    processes (whole shards, or ``batch_size`` rows per update split between them)."""
    batching = {} if batch_size is None else {"batch_size": batch_size // workers, "stand_in": False}
    svi_class, model, X, y, optim, _ = advgp_frontend(frontend.lower(), data, Z, None,
                                                      ADVGP_OPTIM if batch_size is None else ADVGP_MINIBATCH_OPTIM)
    with svi_class(model, X, y, num_workers=workers, max_delay=0, optim=optim, num_threads=1, **batching) as svi:
        svi.run(warmup, progress_bar=False)
        t0 = time.perf_counter()
        svi.run(steps, progress_bar=False)
        return (time.perf_counter() - t0) / steps


def _rank(rank, world, port, out, num_train, M, seed, warmup, steps):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    data, Z = _data(num_train, M, seed)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = new_advgp(data, Z)
        X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
        distributed_proximal_svi(model, X, y, warmup, optim=dict(ADVGP_OPTIM))
        dist.barrier()
        t0 = time.perf_counter()
        distributed_proximal_svi(model, X, y, steps, optim=dict(ADVGP_OPTIM))
        seconds = time.perf_counter() - t0
        if rank == 0:
            torch.save(seconds / steps, out)
    finally:
        dist.destroy_process_group()


def with_distributed(num_train, M, seed, *, world, warmup, steps) -> float:
    """Seconds per synchronous update of ``distributed_proximal_svi`` over ``world`` local processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.pt")
        mp.spawn(_rank, args=(world, port, out, num_train, M, seed, warmup, steps), nprocs=world, join=True)
        return float(torch.load(out))


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=None, help="training rows (default: all)")
    p.add_argument("--inducing", type=int, default=None, help="M (default 50)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed updates (default 10)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per minibatch update (all workers)")
    p.add_argument("--minibatch-steps", type=int, default=None, help="timed minibatch updates (default 500)")
    args = p.parse_args(argv)
    quick = quick_mode(args)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    num_train = args.num_train if args.num_train is not None else (4000 if quick else None)
    M = args.inducing or (10 if quick else 50)
    steps = args.steps or (3 if quick else 10)
    data, Z = _data(num_train, M, args.seed)
    n = len(data.y_train)

    batch = min(args.batch_size, n)
    mb_steps = args.minibatch_steps or (10 if quick else 500)
    mb_warmup = max(args.warmup, 20)  # past the jit compile of each NumPyro worker
    # (setup, frontend, workers, rows per update, seconds per update)
    timed = [("in-process", "Pyro", 1, n, in_process(data, Z, warmup=args.warmup, steps=steps))]
    for frontend in ("Pyro", "NumPyro"):
        for w in (1, 2):
            timed.append(("processes", frontend, w, n, with_processes(
                data, Z, frontend=frontend, workers=w, warmup=args.warmup, steps=steps)))
    timed.append(("torch.distributed (3 processes)", "Pyro", 2, n,
                  with_distributed(num_train, M, args.seed, world=3, warmup=args.warmup, steps=steps)))
    for frontend in ("Pyro", "NumPyro"):
        for w in (1, 2):
            timed.append(("processes, minibatches", frontend, w, batch, with_processes(
                data, Z, frontend=frontend, workers=w, warmup=mb_warmup, steps=mb_steps, batch_size=batch)))
    rows = []
    for name, frontend, workers, rows_per_update, seconds in timed:
        rows.append({"setup": name, "frontend": frontend, "workers": workers, "rows_per_update": rows_per_update,
                     "s_per_update": seconds, "updates_per_s": 1 / seconds, "rows_per_s": rows_per_update / seconds,
                     "rows_per_s_per_worker": rows_per_update / seconds / workers})
    for row in rows:
        # against one worker process of the same frontend and batching
        setup = row["setup"] if row["setup"] == "processes, minibatches" else "processes"
        base = next(r for r in rows if (r["setup"], r["frontend"], r["workers"]) == (setup, row["frontend"], 1))
        row["efficiency_vs_1_worker"] = row["rows_per_s_per_worker"] / base["rows_per_s_per_worker"]
        print(row, flush=True)
    write_results("advgp_throughput", rows, out=args.out,
                  meta={"n_train": n, "M": M, "warmup": args.warmup, "steps": steps, "quick": quick,
                        "batch_size": batch, "minibatch_warmup": mb_warmup, "minibatch_steps": mb_steps,
                        "cpus": os.cpu_count()},
                  notes=(f"{n:,} flights rows, M={M}, float64, synchronous updates, one thread per worker "
                         "(NumPyro: one BLAS thread; XLA runs its compiled code on its own threads); "
                         f"{os.cpu_count()} cores on this machine. Whole shards: each update processes all rows "
                         f"once ({steps} timed updates); minibatches: {batch} rows an update, split between the "
                         f"workers ({mb_steps} timed updates after {mb_warmup}). efficiency_vs_1_worker: rows/s "
                         "per worker relative to the 1-process run of the same frontend and batching."))
    return rows


if __name__ == "__main__":
    main()
