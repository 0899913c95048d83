"""Shared helpers of the benchmarks: sizes, timing, peak memory, metrics, result files.

* :func:`quick_mode` -- tiny sizes when ``--quick`` is given or the environment variable ``CI`` is set.
* :func:`timeit` -- median wall time of repeated calls after warm-up calls.
* :func:`run_isolated` -- run a function in a fresh (spawned) process and return its result with
  the process's peak resident memory (:func:`peak_rss_mib`); tracemalloc does not see torch's
  allocations, the RSS of a fresh process does.
* :func:`gaussian_metrics` -- RMSE and NLPD of Gaussian predictions.
* :func:`write_results` -- ``benchmarks/results/<name>.json`` and a markdown table ``<name>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import types
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = [
    "RESULTS_DIR", "quick_mode", "parser", "timeit", "Timer", "run_isolated", "peak_rss_mib", "gaussian_metrics",
    "write_results", "markdown_table", "progress", "machine_info", "set_threads", "spawning_as_from_a_notebook",
    "stop_fork_server",
]


@contextlib.contextmanager
def spawning_as_from_a_notebook():
    """Processes spawned (or forked from a fork server) inside the block re-run no main module, as
    when started from a notebook (whose ``__main__`` has neither a file nor a module name).

    ``multiprocessing``'s spawn and forkserver methods re-run the parent's main module in each child. A
    benchmark's main module imports every method it compares (torch, Pyro and GPyTorch beside JAX),
    which a user's script of one method does not: a spawned NumPyro ADVGP worker then imported
    for 3.3 s of CPU instead of 1.7 (``import benchmarks.advgp_flights, numpyro_scalegp`` against
    ``import numpyro_scalegp``, on the 2-core machine). The children still import what they use
    (unpickling their work imports its library).

    .. note:: Cost: none; ``sys.modules["__main__"]`` is swapped for an empty module inside the
       block (nothing pickled by reference to ``__main__`` can be sent to a child then).
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def stop_fork_server() -> None:
    """Stop this process's ``multiprocessing`` fork server, if it runs, so that the next workers
    start as in a fresh script. The fork server (:func:`scalegp.processes.preloading_context`)
    imports the workers' framework once and stays for later runs, whose workers then start with
    nothing to import (as a notebook's second fit does); each benchmark run pays for the import.

    .. note:: Cost: the fork server's exit (milliseconds); uses the private ``_stop`` of
       ``multiprocessing.forkserver`` (what its own tests use): benchmarks only.
    """
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


def quick_mode(args: argparse.Namespace | None = None) -> bool:
    """True when ``--quick`` was passed or the environment variable ``CI`` is set (non-empty, not 0/false)."""
    env = os.environ.get("CI", "").strip().lower()
    return bool(getattr(args, "quick", False)) or env not in ("", "0", "false", "no")


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (also when the env var CI is set)")
    p.add_argument("--out", default=RESULTS_DIR, help="directory of the JSON / markdown results")
    p.add_argument("--threads", type=int, default=None, help="torch / BLAS threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (when torch is loaded) and return the number in use."""
    n = (os.cpu_count() or 1) if n is None else int(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm progress bar on stderr (``disable=True`` gives a silent one); redrawn at most every
    10 s where stderr is not a terminal (a log file), instead of ten times a second."""
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    if not kwargs["file"].isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(iterable, **kwargs)


class Timer:
    """Context manager measuring wall time: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def timeit(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls.

    :returns: ``{"median_s", "min_s", "max_s", "times_s", "repeats", "warmup"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times, "repeats": repeats, "warmup": warmup}


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: it starts afresh at ``exec``, whereas
    ``getrusage``'s ``ru_maxrss`` carries over the peak of the forked parent (so a process spawned
    from a large parent would report at least the parent's size). Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _child(conn, fn, args, kwargs):
    try:
        out = fn(*args, **kwargs)
        conn.send(("ok", out, peak_rss_mib()))
    except BaseException as exc:  # report any failure to the parent instead of hanging
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", float("nan")))
    finally:
        conn.close()


def run_isolated(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process.

    ``fn`` must be importable (a module-level function) and its result picklable.

    :returns: ``(result, peak_rss_mib)``, the peak resident set size of the whole child process
        (interpreter and imports included).
    :raises RuntimeError: when the child raised or died.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        status, out, peak = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: child process died (exit code {proc.exitcode})")
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its subprocess:\n{out}")
    return out, peak


def gaussian_metrics(y, mean, var, *, y_std: float = 1.0) -> dict:
    """Test metrics of Gaussian predictions ``N(mean, var)`` of standardized targets ``y``.

    :returns: ``rmse`` (original unit: ``y_std`` times the standardized RMSE, minutes for the
        flights), ``rmse_std`` (standardized), ``nlpd`` (mean negative log predictive density per
        test point, in the standardized unit; add ``log(y_std)`` for the original unit).
    """
    y, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (y, mean, var))
    if not (y.shape == mean.shape == var.shape):
        raise ValueError(f"y, mean, var: shapes differ: {y.shape}, {mean.shape}, {var.shape}")
    rmse_std = float(np.sqrt(np.mean((y - mean) ** 2)))
    nlpd = float(np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * (y - mean) ** 2 / var))
    return {"rmse": rmse_std * y_std, "rmse_std": rmse_std, "nlpd": nlpd}


def machine_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "CI": os.environ.get("CI", "")}
    for mod in ("torch", "jax", "gpytorch", "pyro", "numpyro"):
        if mod in sys.modules:
            info[mod] = getattr(sys.modules[mod], "__version__", "?")
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` defaults to the keys of the first row."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(name: str, rows: Sequence[dict], *, out: str = RESULTS_DIR, meta: dict | None = None,
                  columns: Sequence[str] | None = None, notes: str = "") -> tuple[str, str]:
    """Write ``<out>/<name>.json`` (rows, meta, machine) and ``<out>/<name>.md`` (a table and notes).

    :returns: the two paths.
    """
    os.makedirs(out, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("command", " ".join([os.path.basename(sys.executable), "-m", f"benchmarks.{name}"] + sys.argv[1:]))
    payload = {"name": name, "meta": meta, "machine": machine_info(), "rows": list(rows)}
    jpath, mpath = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
    table = markdown_table(rows, columns)
    with open(mpath, "w") as f:
        f.write(f"# {name}\n\n`{meta['command']}`\n\n{table}")
        if notes:
            f.write("\n" + notes.strip() + "\n")
    return jpath, mpath
