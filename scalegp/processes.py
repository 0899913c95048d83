"""How the frontends start their local worker processes (HGP's expert pools, ADVGP's workers).

.. note:: Cost: nothing at import.
"""
from __future__ import annotations

import multiprocessing

__all__ = ["preloading_context", "start_fork_server"]


def preloading_context(module: str):
    """The ``multiprocessing`` context for local worker processes that run ``module``: a fork
    server (``"forkserver"``, where the platform has one: Linux, macOS) told to import ``module``
    once, from which every worker forks; ``"spawn"`` elsewhere.

    A spawned worker is a fresh interpreter that imports its framework itself: JAX and NumPyro
    took 1.2-1.7 s of CPU here (1.0 s since ``ml_dtypes`` is held below 0.7, ``pyproject.toml``).
    On the flights (M = 50, 1,024 rows an update, two NumPyro workers and the server on two
    cores; ``/work/notes/adhoc/np_startup_ab.py``) spawned workers
    took over from the server's stand-ins after 5.2-5.5 s, and the server had made 168-204
    updates by 4 s and 1,269-1,287 by 8 s; forked from a fork server that imported NumPyro once,
    after 5.0-5.1 s, with 284-317 and 1,437-1,502 updates. The fork server is a fresh process
    too, so forking from it is safe where forking the user's process is not (JAX's threads, CUDA,
    OpenMP's pool). Its children still import the main module as spawned ones do (so a script
    needs ``if __name__ == "__main__":``). The fork server is the process's own
    (``multiprocessing``'s): it starts with the first worker (or at :func:`start_fork_server`) and
    stays for later runs, whose workers then start with nothing to import, with the environment
    variables it started with; if it already runs with other modules, workers import ``module``
    themselves.

    .. note:: Cost: one ``multiprocessing.get_context`` call; the fork server's start (an
       interpreter importing ``module``) happens with the first worker's, off the server's thread
       (:class:`ProcessWorkers`), or earlier with :func:`start_fork_server`.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])
    return context


def start_fork_server(context) -> None:
    """Start ``context``'s fork server now if it is one (:func:`preloading_context`) and not
    already running, so that its imports run while this process does other work: a process
    that compiles before it starts its workers (NumPyro's ADVGP server) leaves the other core
    to them. Workers started later connect to it and wait only for what is left of the imports.

    .. note:: Cost: starting an interpreter (milliseconds here; its imports run in the background).
    """
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
