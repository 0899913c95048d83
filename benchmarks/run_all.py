"""``make bench``: run every benchmark script of this folder in turn (each as ``python -m benchmarks.<name>``).

A benchmark is a module here with a ``main(argv)`` function (helpers such as ``common``,
``baselines`` and ``hgp_fit`` have none; ``demo`` is ``make demo``). ``--only a,b`` picks some,
``--quick`` (or ``CI`` set) is passed on. Each runs in its own process so that one failure does not
stop the others; the exit status is non-zero when any failed. Results land in ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = {"__init__", "common", "baselines", "hgp_fit", "demo", "run_all"}


def discover() -> list[str]:
    """Names of the modules here that define a top-level ``main`` function."""
    names = []
    for fname in sorted(os.listdir(HERE)):
        name, ext = os.path.splitext(fname)
        if ext != ".py" or name in SKIP:
            continue
        with open(os.path.join(HERE, fname)) as f:
            tree = ast.parse(f.read())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(name)
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"only: unknown benchmarks {unknown}; available: {names}")
        names = [n for n in names if n in wanted]
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
