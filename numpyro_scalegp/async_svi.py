r"""Delayed (bounded-staleness) proximal gradient training of ADVGP over worker processes, JAX side.

The same server/worker protocol as :mod:`pyro_scalegp.async_svi`: a server (this
process) holds the unconstrained parameter dict of a
:class:`~numpyro_scalegp.advgp.ADVGP`; ``num_workers`` processes (``multiprocessing``,
spawn) each own a data shard, pull the latest parameters from a shared-memory buffer,
compute the gradient of their data term :math:`g_k` with a jitted
``jax.value_and_grad`` and push it tagged with the version used. The server applies

.. math::

    \theta_{t+1} = \mathrm{prox}_{\gamma h}\Big(\theta_t - \gamma \sum_k \nabla g_k(\theta_{t_k})\Big),
    \qquad t - \tau \le t_k \le t,

with :func:`~numpyro_scalegp.optim.proximal_adadelta` as soon as it has a new gradient
and every worker's latest gradient is at most ``max_delay`` (:math:`\tau`) versions
old; ``max_delay=0`` is synchronous proximal gradient descent. A dead worker is
restarted on its own shard, a silent one is reported after ``stall_timeout`` seconds
(:class:`StalledWorkerWarning`), ``state_dict``/``load_state_dict`` stop and resume.

.. note:: Cost per update: ``O(M^3 + n_k M^2)`` time on worker ``k`` and ``O(P)`` on the
   server for ``P = O(M^2 + M d)`` parameters; memory ``O(n_k M)`` per worker plus one
   shared ``O(P)`` buffer. Each worker compiles its gradient once (seconds).
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import time
import traceback
import warnings
from multiprocessing.connection import wait as mp_wait
from typing import Sequence

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from .advgp import ADVGP
from .optim import proximal_adadelta

__all__ = ["AsyncProximalSVI", "StalledWorkerWarning"]


class StalledWorkerWarning(RuntimeWarning):
    """A worker sent no gradient for longer than ``stall_timeout`` seconds."""


def _flatten(params: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(params[n], dtype=np.float64).reshape(-1) for n in names])


def _unflatten(flat: np.ndarray, names, shapes, dtype) -> dict:
    out, offset = {}, 0
    for n, shape in zip(names, shapes):
        size = int(np.prod(shape, dtype=np.int64))
        out[n] = np.asarray(flat[offset:offset + size].reshape(shape), dtype=dtype)
        offset += size
    return out


def _pull(buffer: np.ndarray, seq, stop, bell, last: int):
    """Wait for a parameter version newer than ``last`` and copy it (a seqlock: the server
    makes ``seq`` odd while it writes); ``(None, last)`` once stopped. No lock is shared
    with the server, so a worker killed at any point cannot block it."""
    while True:
        if stop.value:
            return None, last
        s = seq.value
        if s != last and s % 2 == 0:
            flat = buffer.copy()
            if seq.value == s:
                return flat, s
            continue
        if bell.poll(0.5):
            while bell.poll(0):
                bell.recv_bytes()


def _worker_main(rank, advgp_bytes, X, y, names, shapes, dtype, x64, shared, seq, stop, bell, conn, sleep):
    """Worker loop: wait for a newer parameter version, compute grad g_k (jitted), push it."""
    try:
        # the precision first, then the model: its arrays must not be rebuilt in float32
        jax.config.update("jax_enable_x64", x64)
        advgp = pickle.loads(advgp_bytes)
        buffer = np.frombuffer(shared, dtype=np.float64)
        value_and_grad = jax.jit(jax.value_and_grad(lambda p: advgp.data_term(X, y, params=p)))
        last = -1
        while True:
            flat, last = _pull(buffer, seq, stop, bell, last)
            if flat is None:
                return
            if sleep > 0:
                time.sleep(sleep)
            value, grads = value_and_grad(_unflatten(flat, names, shapes, dtype))
            conn.send(("grad", rank, last, _flatten(grads, names), float(value)))
    except Exception:  # reported to the server, which raises
        conn.send(("error", rank, -1, traceback.format_exc(), None))


class AsyncProximalSVI:
    """Asynchronous (bounded-delay) proximal SVI for :class:`~numpyro_scalegp.advgp.ADVGP`.

    :param advgp: the model.
    :param X: ``(N, d)`` inputs.
    :param y: ``(N,)`` targets.
    :param num_workers: number of worker processes.
    :param max_delay: the staleness bound :math:`\\tau` (``0``: synchronous).
    :param optim: :func:`~numpyro_scalegp.optim.proximal_adadelta` arguments
        ``learning_rate``, ``rho``, ``eps``.
    :param shards: ``num_workers`` arrays of row indices, together covering every row.
    :param params: initial unconstrained parameters (default ``advgp.init_params()``).
    :param worker_sleep: seconds each worker sleeps before every gradient (stragglers).
    :param stall_timeout: seconds of silence before a :class:`StalledWorkerWarning`.

    ``params`` holds the current parameters (a dict of arrays).

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k``, ``O(M^2 + M d)``
       on the server. Starting the workers (spawned interpreters, jit) takes seconds.
    """

    def __init__(self, advgp: ADVGP, X, y, *, num_workers: int = 1, max_delay: int = 0,
                 optim: dict | None = None, shards: Sequence | None = None, params: dict | None = None,
                 worker_sleep: float | Sequence[float] = 0.0, stall_timeout: float = 60.0):
        if not isinstance(advgp, ADVGP):
            raise ValueError(f"advgp: expected a numpyro_scalegp.ADVGP, got {type(advgp).__name__}")
        X, y = advgp._check_data(X, y)
        if y is None:
            raise ValueError("y: required")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected a positive integer, got {num_workers!r}")
        if not isinstance(max_delay, int) or max_delay < 0:
            raise ValueError(f"max_delay: expected a non-negative integer, got {max_delay!r}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout: expected a positive number, got {stall_timeout!r}")
        N = X.shape[0]
        if shards is None:
            shards = np.array_split(np.arange(N), num_workers)
        shards = [np.asarray(s, dtype=np.int64).reshape(-1) for s in shards]
        if len(shards) != num_workers:
            raise ValueError(f"shards: expected {num_workers} shards (one per worker), got {len(shards)}")
        for k, s in enumerate(shards):
            if s.size == 0 or s.min() < 0 or s.max() >= N:
                raise ValueError(f"shards: shard {k} is empty or indexes outside 0..{N - 1}")
        missing = np.setdiff1d(np.arange(N), np.concatenate(shards))
        if missing.size:
            raise ValueError(f"shards: {missing.size} rows are in no shard (e.g. {missing[:5].tolist()})")
        sleeps = np.broadcast_to(np.asarray(worker_sleep, dtype=np.float64), (num_workers,))
        if not np.all(np.isfinite(sleeps)) or np.any(sleeps < 0):
            raise ValueError(f"worker_sleep: expected non-negative seconds, got {worker_sleep!r}")
        optim = {} if optim is None else dict(optim)
        unknown = set(optim) - {"learning_rate", "rho", "eps"}
        if unknown:
            raise ValueError(f"optim: unknown ADADELTA arguments {sorted(unknown)}")
        params = advgp.init_params() if params is None else dict(params)
        if set(params) != set(advgp.init_params()):
            raise ValueError("params: expected the keys of advgp.init_params()")

        self.advgp = advgp
        self.num_workers = num_workers
        self.max_delay = max_delay
        self.stall_timeout = float(stall_timeout)
        self._X, self._y = np.asarray(X), np.asarray(y)
        self._shards = shards
        self._sleeps = sleeps.tolist()
        self._names = sorted(params)
        self._shapes = [tuple(np.shape(params[n])) for n in self._names]
        self._dtype = np.asarray(params[self._names[0]]).dtype
        self.params = {n: jax.numpy.asarray(params[n]) for n in self._names}
        tx = proximal_adadelta(**optim)
        self.opt_state = tx.init(self.params)

        @jax.jit
        def update(params, grads, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self._update = update
        self._kl = jax.jit(lambda p: advgp.kl(params=p))
        self.version = 0
        self.restarts: list[tuple[int, int]] = []
        self.stalls: list[tuple[int, int, float]] = []
        self.staleness: list[int] = []
        self._latest_grad: list[np.ndarray | None] = [None] * num_workers
        self._latest_value = [0.0] * num_workers
        self._latest_version = [-1] * num_workers
        self._last_heard = [time.monotonic()] * num_workers
        self._stall_reported = [False] * num_workers
        self._seq_version: dict[int, int] = {}
        self._wait_start = time.monotonic()

        self._ctx = mp.get_context("spawn")
        size = sum(int(np.prod(s, dtype=np.int64)) for s in self._shapes)
        self._shared = self._ctx.RawArray("d", size)
        self._buffer = np.frombuffer(self._shared, dtype=np.float64)
        self._seq = self._ctx.RawValue("q", 0)
        self._stop = self._ctx.RawValue("b", 0)
        self._procs: list = [None] * num_workers
        self._conns: list = [None] * num_workers
        self._bells: list = [None] * num_workers
        self._closed = False
        self._publish()
        for k in range(num_workers):
            self._start(k)

    # ---- process management -------------------------------------------------------------
    def _start(self, k: int) -> None:
        recv, send = self._ctx.Pipe(duplex=False)
        bell_recv, bell_send = self._ctx.Pipe(duplex=False)
        idx = self._shards[k]
        proc = self._ctx.Process(
            target=_worker_main, daemon=True,
            args=(k, pickle.dumps(self.advgp), self._X[idx], self._y[idx], self._names, self._shapes, self._dtype,
                  bool(jax.config.jax_enable_x64), self._shared, self._seq, self._stop, bell_recv, send,
                  self._sleeps[k]))
        proc.start()
        send.close()
        bell_recv.close()
        self._procs[k], self._conns[k], self._bells[k] = proc, recv, bell_send
        self._last_heard[k] = time.monotonic()
        self._stall_reported[k] = False

    def _restart(self, k: int) -> None:
        old = self._procs[k]
        old.join(timeout=5.0)
        self._conns[k].close()
        self._bells[k].close()
        self.restarts.append((k, self.version))
        warnings.warn(f"worker {k} (pid {old.pid}) died with exit code {old.exitcode}; "
                      f"restarted on its shard at version {self.version}", RuntimeWarning)
        self._start(k)

    @property
    def workers(self) -> list:
        """The worker processes (``multiprocessing.Process``), one per shard."""
        return list(self._procs)

    def _publish(self) -> None:
        self._seq.value += 1  # odd: writing
        self._buffer[:] = _flatten(self.params, self._names)
        self._seq.value += 1
        self._seq_version[self._seq.value] = self.version
        self._ring()

    def _ring(self) -> None:
        for bell in self._bells:
            if bell is not None:
                try:
                    bell.send_bytes(b"")
                except OSError:
                    pass  # a dead worker: restarted when the server next waits

    # ---- the server ----------------------------------------------------------------------
    def _ready(self) -> bool:
        return all(g is not None and v >= self.version - self.max_delay
                   for g, v in zip(self._latest_grad, self._latest_version))

    def _receive(self) -> None:
        """Block until one gradient arrives; restart dead workers, report stalled ones."""
        while True:
            ready = mp_wait(self._conns + [p.sentinel for p in self._procs], timeout=0.05)
            for k, conn in enumerate(self._conns):
                if conn not in ready:
                    continue
                try:
                    kind, rank, seq, payload, value = conn.recv()
                except (EOFError, OSError):
                    continue  # the writer died; its sentinel restarts it below
                if kind == "error":
                    self.close()
                    raise RuntimeError(f"worker {rank} failed:\n{payload}")
                self._last_heard[k] = time.monotonic()
                self._stall_reported[k] = False
                if seq not in self._seq_version:
                    continue  # computed on parameters replaced by load_state_dict
                self._latest_grad[k] = payload
                self._latest_value[k] = value
                self._latest_version[k] = self._seq_version[seq]
                return
            for k, proc in enumerate(self._procs):
                if proc.sentinel in ready or not proc.is_alive():
                    self._restart(k)
            now = time.monotonic()
            for k in range(self.num_workers):
                waiting = self._latest_version[k] < self.version - self.max_delay or self._latest_grad[k] is None
                silent = now - max(self._last_heard[k], self._wait_start)
                if waiting and silent > self.stall_timeout and not self._stall_reported[k]:
                    self._stall_reported[k] = True
                    self.stalls.append((k, self.version, silent))
                    warnings.warn(f"worker {k} (pid {self._procs[k].pid}) has sent no gradient for "
                                  f"{silent:.1f} s (server at version {self.version})", StalledWorkerWarning)

    def step(self) -> float:
        """One server update; returns the loss estimate ``sum_k g_k(theta_{t_k}) + h(theta_t)``
        (the exact negative ELBO at ``theta_t`` when ``max_delay=0``)."""
        if self._closed:
            raise RuntimeError("step: this AsyncProximalSVI is closed")
        got_new = False
        self._wait_start = time.monotonic()
        while not (got_new and self._ready()):
            self._receive()
            got_new = True
        grads = _unflatten(np.sum(self._latest_grad, axis=0), self._names, self._shapes, self._dtype)
        loss = float(sum(self._latest_value)) + float(self._kl(self.params))
        self.staleness.append(self.version - min(self._latest_version))
        self.params, self.opt_state = self._update(self.params, grads, self.opt_state)
        self.version += 1
        self._publish()
        return loss

    def run(self, num_steps: int, *, progress_bar: bool = True) -> list[float]:
        """``num_steps`` updates with a progress bar; returns the loss estimates."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps: expected a non-negative integer, got {num_steps!r}")
        losses = []
        with tqdm(total=num_steps, disable=not progress_bar, desc="ADVGP") as bar:
            for _ in range(num_steps):
                losses.append(self.step())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                bar.update()
        return losses

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameters, optimizer state and version (numpy): enough to resume a synchronous run."""
        to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
        return {"version": self.version, "params": to_np(self.params), "optim": to_np(self.opt_state)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; gradients in flight on older parameters are dropped."""
        if set(state.get("params", {})) != set(self._names):
            raise ValueError("state: parameter names do not match this model")
        self.params = {n: jax.numpy.asarray(state["params"][n]) for n in self._names}
        self.opt_state = jax.tree_util.tree_map(jax.numpy.asarray, state["optim"])
        self.version = int(state["version"])
        self._latest_grad = [None] * self.num_workers
        self._latest_version = [-1] * self.num_workers
        self._seq_version.clear()
        self._publish()

    def close(self) -> None:
        """Stop and join the workers."""
        if self._closed:
            return
        self._closed = True
        self._stop.value = 1
        self._ring()
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns + self._bells:
            if conn is not None:
                conn.close()

    def __enter__(self) -> "AsyncProximalSVI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
