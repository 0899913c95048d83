r"""The server/worker protocol of delayed proximal gradient training (ADVGP), framework-free.

Both frontends (:mod:`pyro_scalegp.async_svi`, :mod:`numpyro_scalegp.async_svi`) run
this protocol; they only supply how a worker computes the gradient of its data term
:math:`g_k`, how the server applies the proximal optimizer step and how parameters
and optimizer state are serialized (the hooks of :class:`ProximalServer`). Written with
numpy and the standard library only.

**Protocol.** The server holds the parameters :math:`\theta_t` (``version`` :math:`t`)
and ``K`` workers each own a data shard. Every published parameter vector carries a
*tag* (a counter that is never reused, not even across :meth:`~ProximalServer.load_state_dict`,
so gradients computed on replaced parameters are recognised and dropped). A worker that
is idle is sent the newest parameters it has not used yet; it computes
:math:`(g_k(\theta), \nabla g_k(\theta))` and sends them back with the tag. The server
keeps each worker's latest gradient and the version it was computed at, :math:`t_k`, and
applies

.. math::

    \theta_{t+1} = \mathrm{prox}_{\gamma h}\Big(\theta_t - \gamma \sum_k \nabla g_k(\theta_{t_k})\Big)

as soon as it has received a new gradient and every worker's latest gradient satisfies
:math:`t - \tau \le t_k` (``max_delay`` :math:`= \tau`; :math:`\tau = 0` is synchronous
proximal gradient descent, step for step). It then publishes :math:`\theta_{t+1}`
(sending it to every idle worker).

**Stale steps shrink.** With ``shrink_stale_steps`` (the default) the update's step sizes
:math:`\gamma` are divided by :math:`1 + \bar s_t`, :math:`\bar s_t = t - \frac1K\sum_k t_k`
the mean delay of the ``K`` gradients it sums (staleness-aware steps [2]; the convergence
guarantee of delayed proximal gradients [1] asks for a learning rate that decreases as the
delay grows). A slow worker's gradient is summed into every update until its next one
arrives, up to :math:`\tau + 1` times; at full size those repeated steps overshoot: with
:math:`\tau` 16 or 64 and 4 workers at different paces, training stayed near the constant
predictor (``benchmarks/advgp_stragglers.py``). The sum's error against the current gradient,
:math:`\sum_k \nabla g_k(\theta_{t_k}) - \nabla g_k(\theta_t)`, grows with each shard's own
delay, so the mean is the measure (the largest delay, one straggler among fast workers,
shrank every step as much; in a virtual-time replay of that benchmark it reached the
synchronous run's final RMSE 10-25% later). Synchronous runs (:math:`\bar s_t = 0`) are
unchanged. The loss it reports for the update is
:math:`\sum_k g_k(\theta_{t_k}) + h(\theta_t)`: the exact negative ELBO when :math:`\tau = 0`.

**Minibatches.** With ``batch_size`` :math:`b`, a worker differentiates the data term of
:math:`b` rows of its shard drawn afresh for each gradient and scales it by :math:`n_k / b`
(:func:`serve_gradients`, :func:`batch_rows`): an unbiased estimate of :math:`\nabla g_k`
at :math:`O(b)` rows a gradient instead of :math:`O(n_k)`, so the updates are stochastic
delayed proximal gradient steps and the reported loss an estimate.

**Averaged parameters.** The server also keeps an exponential moving average of the
parameters it publishes, with ``average_decay`` :math:`\beta` (:func:`averaging`: 0.99 with
minibatches, 0 with whole shards unless set),

.. math::

    \bar\theta_0 = \theta_0, \qquad
    \bar\theta_t = \beta_t\bar\theta_{t-1} + (1 - \beta_t)\theta_t, \qquad
    \beta_t = \min\Big(\beta, \frac{1 + t}{10 + t}\Big)

(Polyak averaging [3] over a window of about :math:`1/(1-\beta)` updates; the short
windows of the first updates, as in TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``, keep it from lagging while the parameters move fast). Minibatch updates
leave the parameters fluctuating around their optimum; the average sits nearer it (on the
flights: ``benchmarks/advgp_flights.py`` and the README). Whole-shard gradients carry no such
noise and there the average would only lag, so it defaults to :math:`\beta = 0`, the last
iterate itself. Workers always receive the last iterate; the frontends predict at the
average. The unconstrained parameters are averaged (so :math:`U`'s diagonal stays positive).

**Faults.** A worker whose gradient the update waits for and that has been silent for
``stall_timeout`` seconds is reported once (:class:`StalledWorkerWarning`, recorded in
``stalls``). A worker that dies is restarted on its own shard where the transport can
(local processes: :class:`ProcessWorkers`; recorded in ``restarts``; its lost gradient
is recomputed on the newest parameters, so a synchronous run is unchanged; a worker that
dies more than ``MAX_RESTARTS`` times without sending a gradient in between, or whose
process exits before reading its shard, stops the run with :class:`PeerFailedError`); elsewhere
(workers in other processes or machines) the server stops and raises
:class:`PeerFailedError` naming it. A worker whose server dies raises
:class:`PeerFailedError` naming the server. A NaN or infinite loss or gradient is
refused before it reaches the parameters: ``step`` raises ``FloatingPointError`` naming
the workers that sent it.

**Starting workers.** Where the transport can compute a worker's gradient in the server's
process (``can_compute_here``: local processes given a ``stand_in``), the server stands in for
a worker from its start (or restart) until its first gradient arrives: when an update waits
for that worker, the server computes the gradient itself at the current version (the same
numbers, minibatch draw included: :func:`shard_gradient`; recorded in ``stood_in``) instead
of waiting for it to start (seconds where it imports its framework or compiles). A synchronous run is unchanged;
the worker's first gradient, older by then, is dropped and the worker takes over.

**Transports** carry the messages; a transport has ``num_workers``, ``restartable``,
``can_compute_here``, ``send(k, tag, version, flat)`` (parameters to worker ``k``, which is
idle), ``poll(timeout)`` (the events that arrived: ``("grad", k, tag, value, grad)``,
``("error", k, text)``, ``("dead", k, reason)``), ``describe(k)`` (a name for messages),
``restart(k)`` (if ``restartable``), ``compute_here(k, version, flat)`` (if
``can_compute_here``: worker ``k``'s ``(value, grad)``) and ``close(abort=None)`` (stop the
workers; with a reason, they raise :class:`PeerFailedError` carrying it). The worker side is a
*channel* with ``recv()`` (``(tag, version, flat)``, ``None`` once told to stop; raises on an
abort or a dead server),
``send(tag, value, grad)`` and ``fail(text)``, driven by :func:`serve_gradients`.
Here: :class:`ConnectionWorkers` / :class:`ConnectionChannel` over
``multiprocessing.connection`` objects (pipes, or TCP sockets between separately
launched processes: :func:`accept_workers`, :func:`connect_to_server`) and
:class:`ProcessWorkers` (local processes: forked, forked from a fork server, or spawned:
:func:`scalegp.processes.preloading_context`); the Pyro frontend adds one over
``torch.distributed``.

.. note:: Cost per update on the server: ``O(K P)`` for ``P`` parameters (summing the
   gradients, one message of ``P`` numbers to each idle worker) plus the optimizer step;
   on worker ``k``: one gradient of :math:`g_k` plus two messages of ``P`` numbers.
   Waiting polls every 50 ms at most.

References: [1] M. Li, D. G. Andersen, A. J. Smola, *Distributed delayed proximal gradient
methods*, NIPS Workshop on Optimization for Machine Learning, 2013. [2] W. Zhang, S. Gupta,
X. Lian, J. Liu, *Staleness-aware async-SGD for distributed deep learning*, IJCAI 2016.
[3] B. T. Polyak, A. B. Juditsky, *Acceleration of stochastic approximation by averaging*,
SIAM J. Control Optim. 30(4), 1992.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import socket
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from multiprocessing.util import register_after_fork
from multiprocessing.connection import wait as mp_wait
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "MAX_RESTARTS", "ConnectionChannel", "ConnectionWorkers", "PeerFailedError", "ProcessWorkers", "ProximalServer",
    "DEFAULT_AVERAGE_DECAY", "StalledWorkerWarning", "accept_workers", "average_weight", "averaging", "batch_rows",
    "check_options", "connect_to_server", "keep_freed_memory", "serve_gradients", "shard_gradient", "standing_in",
    "unflatten",
]

_POLL_SECONDS = 0.05
#: a worker that dies more often than this without sending a gradient in between stops the run
MAX_RESTARTS = 3


class StalledWorkerWarning(RuntimeWarning):
    """A worker sent no gradient for longer than ``stall_timeout`` seconds."""


class PeerFailedError(RuntimeError):
    """A process of a distributed run (a worker, or the server) died or failed."""


def check_options(N: int, *, num_workers: int, max_delay: int, stall_timeout: float,
                  shards: Sequence | None = None, worker_sleep=0.0, batch_size: int | None = None,
                  seed: int = 0, num_threads: int = 1, shrink_stale_steps: bool = True,
                  average_decay: float | None = None) -> tuple[list[np.ndarray], list[float]]:
    """Check the options shared by every frontend; returns ``(shards, sleeps)``: ``num_workers``
    arrays of row indices (default ``numpy.array_split`` of the ``N`` rows in order) that
    together cover every row, and one straggler sleep (seconds) per worker. ``batch_size``
    (``None`` or a positive integer, see :func:`batch_rows`), ``seed`` (a non-negative integer),
    ``num_threads`` (a positive integer), ``shrink_stale_steps`` (a bool) and ``average_decay``
    (``None`` or a number in [0, 1)) are checked too. Raises ``ValueError`` naming the bad argument."""
    averaging(average_decay, batch_size)
    if not isinstance(shrink_stale_steps, (bool, np.bool_)):
        raise ValueError(f"shrink_stale_steps: expected True or False, got {shrink_stale_steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected None or a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads: expected a positive integer, got {num_threads!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: expected a positive integer, got {num_workers!r}")
    if not isinstance(max_delay, int) or max_delay < 0:
        raise ValueError(f"max_delay: expected a non-negative integer, got {max_delay!r}")
    if not stall_timeout > 0:
        raise ValueError(f"stall_timeout: expected a positive number, got {stall_timeout!r}")
    if shards is None:
        if num_workers > N:
            raise ValueError(f"num_workers: {num_workers} workers for {N} rows; each worker's shard needs a row")
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
    sleeps = np.asarray(worker_sleep, dtype=np.float64)
    if sleeps.shape not in ((), (num_workers,)) or not np.all(np.isfinite(sleeps)) or np.any(sleeps < 0):
        raise ValueError(f"worker_sleep: expected non-negative seconds, one number or {num_workers}, "
                         f"got {worker_sleep!r}")
    return shards, np.broadcast_to(sleeps, (num_workers,)).tolist()


def average_weight(decay: float, t: int) -> float:
    """:math:`\\beta_t = \\min(\\beta, (1 + t) / (10 + t))`, the weight of the previous average in the
    ``t``-th update of the averaged parameters (module docstring) for ``average_decay`` ``decay``."""
    return min(decay, (1 + t) / (10 + t))


#: the averaged parameters' decay for minibatch runs (:func:`averaging`): a window of about 100 updates
DEFAULT_AVERAGE_DECAY = 0.99


def averaging(average_decay: float | None, batch_size: int | None) -> float:
    """The decay :math:`\\beta` of the averaged parameters (``AsyncProximalSVI(average_decay=...)``):
    ``average_decay`` itself, or for ``None`` :data:`DEFAULT_AVERAGE_DECAY` with minibatches and 0
    (the average is the last iterate) with whole shards (module docstring). Raises ``ValueError``
    unless it is ``None`` or a number in [0, 1)."""
    if average_decay is None:
        return DEFAULT_AVERAGE_DECAY if batch_size is not None else 0.0
    if (isinstance(average_decay, (bool, np.bool_)) or not isinstance(average_decay, (int, float, np.floating))
            or not 0.0 <= average_decay < 1.0):
        raise ValueError(f"average_decay: expected None or a number in [0, 1), got {average_decay!r}")
    return float(average_decay)


def standing_in(stand_in: bool | None, batch_size: int | None) -> bool:
    """Whether the server stands in for starting workers (``AsyncProximalSVI(stand_in=...)``):
    ``stand_in`` itself, or for ``None``, with minibatches only. A minibatch gradient costs
    milliseconds, against the seconds a worker takes to start; a whole shard's can cost more
    than that, and the server would then compute the starting workers' gradients one after the
    other while they could compute them side by side. Raises ``ValueError`` for anything but
    ``None``, ``True`` or ``False``."""
    if stand_in is None:
        return batch_size is not None
    if not isinstance(stand_in, bool):
        raise ValueError(f"stand_in: expected None, True or False, got {stand_in!r}")
    return stand_in


# ---- the worker side -----------------------------------------------------------------------------
def unflatten(flat: np.ndarray, names, shapes, dtype) -> dict:
    """The parameters ``{name: array of shape, dtype}`` laid out one after the other in the flat
    vector ``flat`` (the messages' and gradients' layout of either frontend).

    .. note:: Cost: ``O(P)`` for ``P`` numbers (views where ``flat`` has ``dtype`` already)."""
    out, offset = {}, 0
    for n, shape in zip(names, shapes):
        size = int(np.prod(shape, dtype=np.int64))
        out[n] = np.asarray(flat[offset:offset + size].reshape(shape), dtype=dtype)
        offset += size
    return out


def batch_rows(version: int, n: int, batch_size: int | None, seed: int, worker: int) -> np.ndarray | None:
    """The rows of worker ``worker``'s shard (``n`` rows) whose data term it differentiates at
    the parameters of ``version``: ``None`` (all of them) when ``batch_size`` is ``None`` or at
    least ``n``, else ``batch_size`` distinct rows, sorted, drawn uniformly by a generator
    seeded with ``(seed, worker, version)``.

    A worker computes at most one gradient per version, so each gradient gets its own draw;
    and the draw depends on nothing else: a restarted worker redraws the rows its lost gradient
    used, a run resumed from a ``state_dict`` draws the rows of the uninterrupted one, and the
    frontends and transports draw alike.

    .. note:: Cost: ``O(b)`` for ``b`` much smaller than ``n``, at most ``O(n)`` (numpy's draw
       without replacement)."""
    if batch_size is None or batch_size >= n:
        return None
    rng = np.random.default_rng([seed, worker, version])
    return np.sort(rng.choice(n, size=batch_size, replace=False))


def shard_gradient(compute: Callable, flat, version: int, n: int | None, *, batch_size: int | None = None,
                   seed: int = 0, worker: int = 0) -> tuple:
    """Worker ``worker``'s gradient at the parameters ``flat`` of ``version``: ``compute(flat) =
    (g_k, grad g_k)`` on its whole shard of ``n`` rows or, with ``batch_size`` (smaller than
    ``n``; ``n`` is only read then), the unbiased minibatch estimate ``(n / b) compute(flat, rows)``
    on the ``b`` rows :func:`batch_rows` draws. Whoever computes it (the worker, or the server
    standing in for a starting worker) gets the same numbers."""
    rows = batch_rows(version, n, batch_size, seed, worker)
    if rows is None:
        return compute(flat)
    value, grad = compute(flat, rows)
    scale = n / rows.size
    return value * scale, np.asarray(grad) * scale


def serve_gradients(channel, make_compute: Callable, X, y, *, sleep: float = 0.0, batch_size: int | None = None,
                    seed: int = 0, worker: int = 0) -> None:
    """The worker loop: ``compute = make_compute(X, y)`` once (its shard), then until told to
    stop: receive parameters, sleep ``sleep`` seconds (simulated straggler), send back
    :func:`shard_gradient` (``compute(flat) = (value, grad)``, or with ``batch_size`` the
    minibatch estimate ``(n / b) compute(flat, rows)`` on the rows :func:`batch_rows` draws for
    ``(seed, worker)`` and the parameters' version: stochastic delayed proximal gradient, each
    update costing ``O(b)`` rows instead of ``O(n)``) with the parameters' tag. An exception is
    reported to the server (``channel.fail``) and re-raised."""
    try:
        compute = make_compute(X, y)
        n = None if batch_size is None else len(y)  # (the transport tests' shards are not arrays)
        while True:
            message = channel.recv()
            if message is None:
                return
            tag, version, flat = message
            if sleep > 0:
                time.sleep(sleep)
            value, grad = shard_gradient(compute, flat, version, n, batch_size=batch_size, seed=seed, worker=worker)
            channel.send(tag, value, grad)
    except PeerFailedError:
        raise
    except Exception:
        channel.fail(traceback.format_exc())
        raise


class ConnectionChannel:
    """The worker end of a ``multiprocessing.connection.Connection`` (a pipe or a socket).
    ``peer`` names the server in errors."""

    def __init__(self, conn: Connection, peer: str = "the server"):
        self._conn, self._peer = conn, peer

    def recv(self):
        try:
            message = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise PeerFailedError(f"{self._peer} died (its connection closed)") from exc
        if message is None:
            return None
        kind, *payload = message
        if kind == "abort":
            raise PeerFailedError(f"{self._peer} stopped the run: {payload[0]}")
        return tuple(payload)

    def send(self, tag: int, value: float, grad: np.ndarray) -> None:
        try:
            self._conn.send(("grad", tag, float(value), np.asarray(grad, dtype=np.float64)))
        except OSError as exc:
            raise PeerFailedError(f"{self._peer} died (its connection closed)") from exc

    def fail(self, text: str) -> None:
        try:
            self._conn.send(("error", text))
        except OSError:
            pass  # the server is gone too: the worker's own traceback is all that is left


# ---- transports (the server side) ------------------------------------------------------------------
class ConnectionWorkers:
    """Workers behind ``multiprocessing.connection.Connection`` objects, one per worker
    (``names[k]`` for messages). A closed connection is a dead worker; not restartable."""

    restartable = False
    can_compute_here = False

    def __init__(self, conns: Sequence[Connection], names: Sequence[str]):
        self._conns = list(conns)
        self._names = list(names)
        self.num_workers = len(self._conns)

    def describe(self, k: int) -> str:
        return self._names[k]

    def send(self, k: int, tag: int, version: int, flat: np.ndarray) -> None:
        try:
            self._conns[k].send(("params", tag, version, flat))
        except OSError:
            pass  # a dead worker: poll reports it

    def _sentinels(self) -> dict:
        """Extra objects to wait on, mapped to the worker whose death they signal."""
        return {}

    def _reason(self, k: int) -> str:
        return "its connection closed"

    def poll(self, timeout: float) -> list[tuple]:
        sentinels = self._sentinels()
        ready = mp_wait(self._conns + list(sentinels), timeout=timeout)
        events, dead = [], set()
        for k, conn in enumerate(self._conns):
            if conn not in ready:
                continue
            while True:  # everything that already arrived
                try:
                    kind, *payload = conn.recv()
                except (EOFError, OSError):
                    dead.add(k)
                    break
                events.append((kind, k, *payload))
                if not conn.poll(0):
                    break
        dead.update(k for s, k in sentinels.items() if s in ready)
        events.extend(("dead", k, self._reason(k)) for k in sorted(dead))
        return events

    def close(self, abort: str | None = None) -> None:
        for conn in self._conns:
            try:
                conn.send(None if abort is None else ("abort", abort))
            except OSError:
                pass
            conn.close()


#: ``mallopt`` parameters of glibc (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's ``malloc`` in this process serve blocks under ``mmap_threshold`` bytes from its
    heap and keep up to ``trim_threshold`` bytes of freed heap for reuse. Under glibc's defaults
    (larger blocks mapped afresh and unmapped when freed, freed heap beyond a few hundred KiB given
    back to the system) a worker's gradient, which allocates and frees tensors of hundreds of KiB
    dozens of times, faults their pages in again on every call: a 1,024-row Pyro gradient at M = 50
    on the 2-core benchmark machine took about 190 page faults and a median 4.7 ms, with this
    setting none and 3.9 ms. Called by the worker processes :class:`ProcessWorkers` starts (the
    user's own process is left as it is). Returns whether the settings took (``False`` where
    ``mallopt`` is missing: not glibc).

    .. note:: Cost: two ``mallopt`` calls; the process keeps up to ``trim_threshold`` bytes of freed
       memory for reuse.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def _process_main(conn) -> None:
    keep_freed_memory()
    try:
        make_compute, X, y, options = conn.recv()  # handed over by ProcessWorkers once this process runs
        serve_gradients(ConnectionChannel(conn), make_compute, X, y, **options)
    except Exception:  # already reported to the server (or the server is gone)
        pass


class ProcessWorkers(ConnectionWorkers):
    """One local worker process per shard, started by ``context`` (a ``multiprocessing``
    context: ``"fork"``, ``"forkserver"`` or ``"spawn"``), each running :func:`serve_gradients` with
    ``make_compute`` (a picklable callable) on its shard ``data[k] = (X_k, y_k)``, its straggler sleep
    ``sleeps[k]`` and the minibatch options ``batch_size`` and ``seed``; joined by a duplex pipe. A dead
    worker is restartable on its shard. Each process keeps the memory it frees for reuse
    (:func:`keep_freed_memory`).

    ``make_compute`` and the shard go over the worker's own pipe once the process runs, not
    with the spawn arguments, and a thread per worker hands them over, so that starting (or
    restarting) a worker does not hold up the server. That thread also starts the process,
    unless ``context`` forks this process (a fork stays on the calling thread, which holds no
    lock a child could inherit, and every worker is forked before the first of these threads
    starts, so that none is copied into a child): a fork server answers once it has imported
    its modules (seconds, the first time). :attr:`processes` waits for the starts. Parameters sent to a
    worker before it has read its shard wait for it (the newest only). A process that exits
    before reading its shard (a spawned process, or one forked from a fork server, imports the
    main module, so a script that creates the workers outside ``if __name__ == "__main__":``
    fails there), or that could not be started or sent its shard, is reported by :meth:`poll` as
    :class:`PeerFailedError` naming it, whereas ``multiprocessing`` would wait forever to write
    spawn arguments larger than a pipe buffer to a process that is gone.

    With ``stand_in`` (a callable like ``make_compute``, called in this process), the server can
    compute a worker's gradient itself while that worker starts (:meth:`compute_here`, see
    :class:`ProximalServer`).

    .. note:: Starting a spawned worker costs an interpreter start-up (which re-imports the main
       module) plus ``make_compute`` (imports, compilation): seconds; the workers start in
       parallel. A forked one starts in milliseconds plus ``make_compute``; one forked from a
       fork server imports the main module and what its server has not.
    """

    restartable = True

    def __init__(self, context, make_compute: Callable, data: Sequence[tuple], sleeps: Sequence[float], *,
                 batch_size: int | None = None, seed: int = 0, stand_in: Callable | None = None):
        self._context, self._make_compute = context, make_compute
        self._forks_here = context.get_start_method() == "fork"
        self._data, self._sleeps = list(data), list(sleeps)
        self._batching = {"batch_size": batch_size, "seed": seed}
        self._stand_in = stand_in
        self._local: list = [None] * len(self._data)  # stand_in(*data[k]), built on first use
        self._processes: list = [None] * len(self._data)
        self._started: list = [None] * len(self._data)  # threading.Event: the start was tried
        self._running = [False] * len(self._data)  # started: has a sentinel
        self._lock = threading.Lock()
        self._handed = [False] * len(self._data)  # has read its shard
        self._pending: list = [None] * len(self._data)  # parameters waiting for that
        self._handing: list = [None] * len(self._data)  # the start and hand-over threads
        self._restarted = [False] * len(self._data)
        self._failed: list = [None] * len(self._data)  # why a start or hand-over failed, other than a dead process
        super().__init__([None] * len(self._data), [""] * len(self._data))
        for k in range(self.num_workers):
            self._spawn(k)
        for thread in self._handing:  # after every fork here: no thread of ours is forked into a worker
            thread.start()

    @property
    def processes(self) -> list:
        """The worker processes (``multiprocessing.Process``), one per shard, once their starts
        have been tried (waits for them)."""
        for started in self._started:
            started.wait()
        return list(self._processes)

    @property
    def can_compute_here(self) -> bool:
        """Whether :meth:`compute_here` is available (a ``stand_in`` was given)."""
        return self._stand_in is not None

    def compute_here(self, k: int, version: int, flat: np.ndarray) -> tuple:
        """Worker ``k``'s gradient at ``flat`` (of ``version``), computed in this process: what the
        worker would send (:func:`shard_gradient`, the same minibatch draw). The first call for a
        shard builds ``stand_in`` on it."""
        if self._local[k] is None:
            self._local[k] = self._stand_in(*self._data[k])
        y = self._data[k][1]
        return shard_gradient(self._local[k], flat, version, len(y), worker=k, **self._batching)

    def _spawn(self, k: int) -> None:
        """Worker ``k``'s process and pipe; the process is started here if the context forks this
        process (on the calling thread, before the hand-over threads start), else by its hand-over thread
        (``_handing[k]``, which the caller starts)."""
        conn, child = self._context.Pipe(duplex=True)
        # a forked process (this worker or a later one) closes its copy of the server's end: holding
        # it, a worker would never read EOF, and so never exit, when the server dies
        register_after_fork(conn, Connection.close)
        proc = self._context.Process(target=_process_main, daemon=True, args=(child,))
        self._processes[k], self._conns[k] = proc, conn
        self._names[k] = f"worker {k}"
        self._handed[k], self._pending[k], self._running[k] = False, None, False
        self._started[k] = threading.Event()
        self._handing[k] = threading.Thread(target=self._start_and_hand_over, args=(k, proc, conn, child),
                                            daemon=True)
        if self._forks_here:
            self._start(k, proc, child)

    def _start(self, k: int, proc, child) -> bool:
        """Start worker ``k``'s process (once); whether it runs (a failure is kept for :meth:`poll`)."""
        if not self._started[k].is_set():
            try:
                proc.start()
                self._names[k] = f"worker {k} (pid {proc.pid})"
                self._running[k] = True
            except Exception as exc:
                self._failed[k] = f"{self._names[k]} could not be started: {exc!r}"
            finally:
                child.close()
                self._started[k].set()
        return self._running[k]

    def _start_and_hand_over(self, k: int, proc, conn, child) -> None:
        if self._start(k, proc, child):
            self._hand_over(k, conn)

    def _hand_over(self, k: int, conn) -> None:
        """(In a thread) send worker ``k`` its ``make_compute``, shard and options, then the
        parameters that wait for it; returns quietly if the process is gone or the hand-over
        fails (:meth:`poll` reports either)."""
        try:
            options = {"sleep": self._sleeps[k], "worker": k, **self._batching}
            conn.send((self._make_compute, *self._data[k], options))
            with self._lock:
                self._handed[k] = True
                pending, self._pending[k] = self._pending[k], None
                if pending is not None:
                    conn.send(pending)
        except OSError:
            pass  # the process is gone: poll reports it
        except Exception as exc:  # (an object that cannot be pickled) poll reports it
            self._failed[k] = f"{self._names[k]} could not be sent its shard: {exc!r}"

    def send(self, k: int, tag: int, version: int, flat: np.ndarray) -> None:
        with self._lock:
            if not self._handed[k]:
                self._pending[k] = ("params", tag, version, flat)
                return
        super().send(k, tag, version, flat)

    def poll(self, timeout: float) -> list[tuple]:
        """As :meth:`ConnectionWorkers.poll`; a worker that died before reading its shard, or
        whose shard could not be sent, stops every worker and raises :class:`PeerFailedError`
        naming it."""
        events = super().poll(timeout)
        for message in self._failed:
            if message is not None:
                self.close(abort=message)
                raise PeerFailedError(message)
        for kind, k, *_ in events:
            if kind == "dead":
                self._handing[k].join(timeout=5.0)  # its send fails at once: the process is gone
                if not self._handed[k]:
                    message = (f"{self._names[k]} exited while starting ({self._reason(k)}); its own output, "
                               "if any, is above")
                    if not self._restarted[k] and not self._forks_here:
                        message += (". Workers that are not forked from this process re-import the main module: in "
                                    "a script, create them under `if __name__ == \"__main__\":`")
                    self.close(abort=message)
                    raise PeerFailedError(message)
        return events

    def _sentinels(self) -> dict:
        return {proc.sentinel: k for k, proc in enumerate(self._processes) if self._running[k]}

    def _reason(self, k: int) -> str:
        if not self._running[k]:  # its start failed (poll names why)
            return "not started"
        proc = self._processes[k]
        proc.join(timeout=5.0)
        return f"exit code {proc.exitcode}"

    def restart(self, k: int) -> None:
        old = self._processes[k]
        if old.is_alive():  # closed its pipe but lingers: make sure it is gone
            old.kill()
            old.join()
        self._handing[k].join()
        self._conns[k].close()
        self._restarted[k] = True
        self._spawn(k)
        self._handing[k].start()

    def close(self, abort: str | None = None) -> None:
        for k, proc in enumerate(self.processes):  # (a start under way finishes first)
            if not self._handed[k] and self._running[k]:  # still starting: nothing of it to wait for
                proc.kill()
                proc.join()
            self._handing[k].join()
        super().close(abort)
        for k, proc in enumerate(self._processes):
            if not self._running[k]:
                continue
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def accept_workers(server: socket.socket, authkey: bytes, num_workers: int, *,
                   timeout: float) -> ConnectionWorkers:
    """Accept ``num_workers`` authenticated connections on the listening socket ``server``
    (from :func:`connect_to_server`, each announcing its worker index) within ``timeout``
    seconds, then close ``server``; workers are named ``rank k + 1 (worker k)``. Raises
    :class:`PeerFailedError` naming the ranks that did not connect."""
    conns: list = [None] * num_workers
    deadline = time.monotonic() + timeout
    try:
        while not all(conns):
            server.settimeout(max(deadline - time.monotonic(), 1e-3))
            try:
                sock, _ = server.accept()
            except TimeoutError:
                missing = [f"rank {k + 1}" for k, c in enumerate(conns) if c is None]
                raise PeerFailedError(f"{', '.join(missing)} did not connect within {timeout} s") from None
            sock.setblocking(True)
            conn = Connection(sock.detach())
            deliver_challenge(conn, authkey)  # the handshake of multiprocessing.connection.Listener
            answer_challenge(conn, authkey)
            conns[int(conn.recv())] = conn
    finally:
        server.close()
    return ConnectionWorkers(conns, [f"rank {k + 1} (worker {k})" for k in range(num_workers)])


def connect_to_server(address: tuple, authkey: bytes, k: int, *, timeout: float) -> ConnectionChannel:
    """Connect worker ``k`` to the server listening at ``address``, retrying for ``timeout``
    seconds; the server is named ``rank 0 (the server)`` in errors."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Client(address, authkey=authkey)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise PeerFailedError(f"rank 0 (the server) is not listening at {address}") from None
            time.sleep(_POLL_SECONDS)
    conn.send(k)
    return ConnectionChannel(conn, "rank 0 (the server)")


# ---- the server ------------------------------------------------------------------------------------
def _check_num_steps(num_steps) -> None:
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps: expected a non-negative integer, got {num_steps!r}")


class ProximalServer:
    """The server of the protocol (module docstring) over a transport ``workers``.

    Frontends subclass it and implement four hooks: ``_flat_parameters()`` (the current
    parameters as one float64 vector, in the order the workers' gradients use),
    ``_proximal_step(grad, step_scale)`` (apply the proximal optimizer step with the summed
    gradient and its step sizes multiplied by ``step_scale``, returning :math:`h(\\theta_t)`
    before it), ``_checkpoint()`` (``{"params", "optim"}``)
    and ``_restore(state)``. The hooks must be usable before ``__init__`` is called (it
    publishes the initial parameters).

    ``shrink_stale_steps``: divide each update's step sizes by one plus the mean delay of
    the gradients it sums (module docstring). ``average_decay``: :math:`\beta` of the
    averaged parameters (module docstring; 0: the last iterate).

    Attributes: ``version`` (updates applied), ``staleness`` (the largest delay
    :math:`t - \\min_k t_k` each update used), ``restarts`` (``(worker, version)``),
    ``stalls`` (``(worker, version, seconds)``), ``stood_in`` (``(worker, version)``: the
    gradients the server computed for starting workers), ``average`` (the averaged parameters
    as one float64 vector).

    .. note:: Cost per update: ``O(K P)`` here (see the module note) plus the hook.
    """

    def __init__(self, workers, *, max_delay: int, stall_timeout: float, shrink_stale_steps: bool = True,
                 average_decay: float = 0.0):
        self._workers = workers
        self.average_decay = float(average_decay)
        self.num_workers = workers.num_workers
        self.max_delay = max_delay
        self.shrink_stale_steps = bool(shrink_stale_steps)
        self.stall_timeout = float(stall_timeout)
        self.version = 0
        self.restarts: list[tuple[int, int]] = []
        self.stalls: list[tuple[int, int, float]] = []
        self.staleness: list[int] = []
        self.stood_in: list[tuple[int, int]] = []
        n = self.num_workers
        self._starting = [workers.can_compute_here] * n  # no gradient from it since it was (re)started
        self._grad: list[np.ndarray | None] = [None] * n
        self._value = [0.0] * n
        self._used = [-1] * n  # the version each latest gradient was computed at
        self._busy = [False] * n  # holds parameters, gradient not back yet
        self._heard = [time.monotonic()] * n
        self._stall_reported = [False] * n
        self._deaths = [0] * n  # deaths of each worker since its last gradient
        self._tag = 0
        self._first_valid_tag = 1
        self._closed = False
        self._publish()
        self.average = self._flat.copy()

    # ---- hooks -------------------------------------------------------------------------------
    def _flat_parameters(self) -> np.ndarray:
        raise NotImplementedError

    def _proximal_step(self, grad: np.ndarray, step_scale: float) -> float:
        raise NotImplementedError

    def _checkpoint(self) -> dict:
        raise NotImplementedError

    def _restore(self, state: dict) -> None:
        raise NotImplementedError

    # ---- protocol ----------------------------------------------------------------------------
    def _publish(self) -> None:
        self._tag += 1
        self._tag_offset = self.version - self._tag  # version of a valid tag = tag + offset
        self._flat = np.asarray(self._flat_parameters(), dtype=np.float64)
        for k in range(self.num_workers):
            if not self._busy[k]:
                self._send(k)

    def _send(self, k: int) -> None:
        self._busy[k] = True
        self._workers.send(k, self._tag, self.version, self._flat)

    def _needs(self, k: int) -> bool:
        """Whether the next update waits for a newer gradient from worker ``k``."""
        return self._grad[k] is None or self._used[k] < self.version - self.max_delay

    def _ready(self) -> bool:
        return not any(self._needs(k) for k in range(self.num_workers))

    def _receive(self, wait_start: float, timeout: float = _POLL_SECONDS) -> bool:
        """Handle the events of one poll (waiting up to ``timeout`` seconds); whether a usable
        gradient arrived."""
        got = False
        try:
            events = self._workers.poll(timeout)
        except PeerFailedError:  # the transport stopped the workers (one exited while starting)
            self._closed = True
            raise
        for kind, k, *payload in events:
            if kind == "grad":
                tag, value, grad = payload
                self._busy[k] = False
                self._deaths[k] = 0
                self._heard[k] = time.monotonic()
                self._stall_reported[k] = False
                self._starting[k] = False
                version = tag + self._tag_offset
                # else computed on parameters replaced by a load, or older than the server's stand-in
                if tag >= self._first_valid_tag and version > self._used[k]:
                    self._grad[k], self._value[k], self._used[k] = grad, value, version
                    got = True
                if tag != self._tag:
                    self._send(k)  # newer parameters are waiting for it
            elif kind == "error":
                self._abort(f"{self._workers.describe(k)} failed:\n{payload[0]}")
            else:
                self._dead(k, payload[0])
        now = time.monotonic()
        for k in range(self.num_workers):
            # a starting worker is awaited since its start, even while the server stands in for it
            silent = now - (self._heard[k] if self._starting[k] else max(self._heard[k], wait_start))
            if (self._needs(k) or self._starting[k]) and silent > self.stall_timeout and not self._stall_reported[k]:
                self._stall_reported[k] = True
                self.stalls.append((k, self.version, silent))
                warnings.warn(f"{self._workers.describe(k)} has sent no gradient for {silent:.1f} s "
                              f"(server at version {self.version})", StalledWorkerWarning)
        return got

    def _dead(self, k: int, reason: str) -> None:
        name = self._workers.describe(k)
        if not self._workers.restartable:
            self._abort(f"{name} died ({reason}); the server stopped at version {self.version}")
        self._deaths[k] += 1
        if self._deaths[k] > MAX_RESTARTS:
            self._abort(f"{name} died {self._deaths[k]} times without sending a gradient in between "
                        f"(last: {reason}); the server stopped at version {self.version}")
        self._workers.restart(k)
        self.restarts.append((k, self.version))
        warnings.warn(f"{name} died ({reason}); restarted on its shard at version {self.version}",
                      RuntimeWarning)
        self._heard[k] = time.monotonic()
        self._stall_reported[k] = False
        self._starting[k] = self._workers.can_compute_here
        self._send(k)

    def _stand_in(self, k: int) -> None:
        """Compute worker ``k``'s gradient at the current version in this process."""
        value, grad = self._workers.compute_here(k, self.version, self._flat)
        self._grad[k], self._value[k], self._used[k] = grad, value, self.version
        self.stood_in.append((k, self.version))

    def step(self) -> float:
        """One server update; returns the loss estimate ``sum_k g_k(theta_{t_k}) + h(theta_t)``
        (the exact negative ELBO at ``theta_t`` when ``max_delay=0``)."""
        if self._closed:
            raise RuntimeError("step: this server is closed")
        wait_start = time.monotonic()
        got_new = False
        while not (got_new and self._ready()):
            covered = [k for k in range(self.num_workers) if self._starting[k] and self._needs(k)]
            got_new = self._receive(wait_start, 0.0 if covered else _POLL_SECONDS) or got_new
            for k in covered:
                if self._starting[k] and self._needs(k):  # (unless its first gradient just came)
                    self._stand_in(k)
                    got_new = True
        grad = np.sum(self._grad, axis=0)
        value = float(sum(self._value))
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            self._refuse_non_finite()
        mean_delay = self.version - sum(self._used) / self.num_workers
        loss = value + self._proximal_step(grad, 1.0 / (1 + mean_delay) if self.shrink_stale_steps else 1.0)
        self.staleness.append(self.version - min(self._used))
        self.version += 1
        self._publish()
        decay = average_weight(self.average_decay, self.version)
        self.average = decay * self.average + (1 - decay) * self._flat
        return loss

    def _refuse_non_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the workers whose loss or gradient is NaN or
        infinite; the parameters are not updated."""
        bad = [f"{self._workers.describe(k)} (computed at version {self._used[k]})"
               for k in range(self.num_workers)
               if not (np.isfinite(self._value[k]) and np.all(np.isfinite(self._grad[k])))]
        raise FloatingPointError(f"non-finite loss or gradient from {', '.join(bad)}; the server did not "
                                 f"update and stays at version {self.version} (lower the learning rate, "
                                 "or resume from an earlier state_dict)")

    def run(self, num_steps: int, *, progress_bar: bool = True) -> list[float]:
        """``num_steps`` updates with a progress bar; returns the loss estimates."""
        _check_num_steps(num_steps)
        losses = []
        with tqdm(total=num_steps, disable=not progress_bar, desc="ADVGP") as bar:
            for _ in range(num_steps):
                losses.append(self.step())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                bar.update()
        return losses

    def run_checkpointed(self, num_steps: int, checkpoint: str) -> dict:
        """Updates up to version ``num_steps`` in all, resumable: the state, the losses and the
        staleness are written to the file ``checkpoint`` after every update (a new file
        replaces the old one, so a crash leaves the last complete one), and a run that finds
        the file resumes from it. A launcher that restarts every process after a failure
        (``torchrun --max-restarts``, a job scheduler) thus goes on where the run stopped; a
        synchronous run ends exactly as an uninterrupted one. Returns ``{"losses", "staleness",
        "state", "resumed_from"}``, the lists covering every update since version 0 and
        ``resumed_from`` the version the file held (``None`` for a fresh start).

        .. note:: Cost: one pickle of the parameters and optimizer state per update."""
        _check_num_steps(num_steps)
        done = {"losses": [], "staleness": []}
        resumed_from = None
        if os.path.exists(checkpoint):
            with open(checkpoint, "rb") as f:
                done = pickle.load(f)
            self.load_state_dict(done["state"])
            resumed_from = self.version
        losses, staleness = list(done["losses"]), list(done["staleness"])
        while self.version < num_steps:
            losses.append(self.step())
            staleness.append(self.staleness[-1])
            written = f"{checkpoint}.partial"
            with open(written, "wb") as f:
                pickle.dump({"state": self.state_dict(), "losses": losses, "staleness": staleness}, f)
            os.replace(written, checkpoint)
        return {"losses": losses, "staleness": staleness, "state": self.state_dict(), "resumed_from": resumed_from}

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameters, optimizer state, version and averaged parameters: enough to resume a
        synchronous run exactly."""
        return {"version": self.version, **self._checkpoint(), "average": self.average.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; gradients in flight on older parameters are dropped."""
        average = state.get("average")
        if average is not None and np.size(average) != self._flat.size:
            raise ValueError(f"state: the average has {np.size(average)} entries, the parameters {self._flat.size}")
        self._restore(state)
        self.version = int(state["version"])
        self._grad = [None] * self.num_workers
        self._used = [-1] * self.num_workers
        self._first_valid_tag = self._tag + 1
        self._publish()
        # (a state written before averaged parameters existed restarts the average at its parameters)
        self.average = self._flat.copy() if average is None else np.array(average, dtype=np.float64).reshape(-1)

    def _abort(self, message: str) -> None:
        """Stop the workers, telling them why, and raise :class:`PeerFailedError`."""
        if not self._closed:
            self._closed = True
            self._workers.close(abort=message)
        raise PeerFailedError(message)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if not self._closed:
            self._closed = True
            self._workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
