r"""Delayed (bounded-staleness) proximal gradient training of ADVGP over worker processes, JAX side.

The same server/worker protocol as :mod:`pyro_scalegp.async_svi`, written once in
:mod:`scalegp.async_server`: a server (this process) holds the unconstrained parameter
dict of a :class:`~numpyro_scalegp.advgp.ADVGP`; ``num_workers`` processes (forked from a
fork server that has imported :mod:`numpyro_scalegp.worker`, or spawned:
:func:`scalegp.processes.preloading_context`)
each own a data shard, receive the newest parameters, compute the gradient of their data term
:math:`g_k` with a jitted ``jax.value_and_grad`` and send it back tagged with the version
used. The server applies

.. math::

    \theta_{t+1} = \mathrm{prox}_{\gamma h}\Big(\theta_t - \gamma \sum_k \nabla g_k(\theta_{t_k})\Big),
    \qquad t - \tau \le t_k \le t,

with :func:`~numpyro_scalegp.optim.proximal_adadelta` as soon as it has a new gradient
and every worker's latest gradient is at most ``max_delay`` (:math:`\tau`) versions
old; ``max_delay=0`` is synchronous proximal gradient descent. A dead worker is
restarted on its own shard, a silent one is reported after ``stall_timeout`` seconds
(:class:`StalledWorkerWarning`), ``state_dict``/``load_state_dict`` stop and resume.
This module supplies the JAX parts: the optax step, and the jitted gradient and the
(de)serialization of the parameter dict from :mod:`numpyro_scalegp.worker`.

Past one machine, :func:`distributed_proximal_svi` runs the protocol between the
processes of a ``jax.distributed`` job. JAX offers collectives across processes but no
point-to-point messages that a server could poll, so the messages travel over TCP
sockets (``multiprocessing.connection``, authenticated); ``jax.distributed`` provides
the process ids and the rendezvous (process 0 broadcasts its port and a fresh key with
:func:`jax.experimental.multihost_utils.broadcast_one_to_all`).

.. note:: Cost per update: ``O(M^3 + n_k M^2)`` time on worker ``k`` and ``O(K P)`` on the
   server for ``P = O(M^2 + M d)`` parameters and ``K`` workers, plus two messages of ``P``
   numbers per worker; memory ``O(n_k M)`` per worker. Each worker compiles its whole-shard
   gradient once (seconds); local workers load the minibatch gradient that the server compiled
   for its stand-in (milliseconds).
"""
from __future__ import annotations

import functools
import secrets
import socket
from typing import Callable, Sequence

import jax
import numpy as np
import optax
from threadpoolctl import threadpool_limits

from scalegp.async_server import (PeerFailedError, ProcessWorkers, ProximalServer, StalledWorkerWarning,
                                  accept_workers, averaging, check_options, connect_to_server, serve_gradients,
                                  shard_gradient, standing_in, unflatten)
from scalegp.processes import preloading_context, start_fork_server

from .advgp import ADVGP
from .optim import proximal_adadelta
from .worker import _QUICK_COMPILE, _flatten, _Gradient, _layout

__all__ = ["AsyncProximalSVI", "PeerFailedError", "StalledWorkerWarning", "distributed_proximal_svi"]

class _Server(ProximalServer):
    """The protocol's server with the JAX hooks: ``params`` (a dict of arrays) and
    ``opt_state`` of :func:`~numpyro_scalegp.optim.proximal_adadelta`.

    ``start_workers()`` returns the worker transport. It is called once the update is compiled
    (by one call on zero gradients, discarded) and ``warm_up(flat)`` has run (the stand-in's
    first gradient, which compiles it): worker interpreters started earlier compete with the
    compilations for the cores (on the flights and 2 cores, with 2 workers and minibatches, the
    first update came after 2.9 s with the workers started first, after 1.5-1.6 s with them
    started after the compilations), and the workers load the program the stand-in compiled.
    Only the fork server, which imports :mod:`numpyro_scalegp.worker` (JAX, single-threaded),
    starts before the compilations, beside them (:class:`AsyncProximalSVI`)."""

    def __init__(self, advgp: ADVGP, params: dict, optim: dict, start_workers: Callable, *, max_delay: int,
                 stall_timeout: float, shrink_stale_steps: bool = True, average_decay: float = 0.0,
                 warm_up: Callable | None = None):
        self.advgp = advgp
        self._names, self._shapes, self._dtype = _layout(params)
        self.params = {n: jax.numpy.asarray(params[n]) for n in self._names}
        tx = proximal_adadelta(**optim)
        # jitted, as everything the first update runs: each eager JAX operation compiles on first use
        self.opt_state = jax.jit(tx.init)(self.params)

        @functools.partial(jax.jit, compiler_options=_QUICK_COMPILE)
        def update(params, grads, state, step_scale):
            """The next parameters and optimizer state, and the KL term at the current parameters
            (one compilation and one call per update for both)."""
            updates, state = tx.update(grads, state, params, step_scale=step_scale)
            return optax.apply_updates(params, updates), state, advgp.kl(params=params)

        self._update = update
        flat = _flatten(self.params, self._names)
        update(self.params, unflatten(np.zeros_like(flat), self._names, self._shapes, self._dtype), self.opt_state,
               1.0)
        if warm_up is not None:
            warm_up(flat)
        super().__init__(start_workers(), max_delay=max_delay, stall_timeout=stall_timeout,
                         shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)

    def averaged_params(self) -> dict:
        """The averaged parameters (``average``, see :mod:`scalegp.async_server`) as a dict of
        arrays laid out as ``params`` (unconstrained)."""
        return {n: jax.numpy.asarray(a) for n, a in unflatten(self.average, self._names, self._shapes,
                                                                 self._dtype).items()}

    def predict(self, X_new, *, averaged: bool = True):
        """``advgp.predict(X_new)`` at the averaged parameters (``averaged=False``: at the
        current ones, ``params``)."""
        return self.advgp.predict(X_new, params=self.averaged_params() if averaged else self.params)

    def _stand_in(self, k: int) -> None:
        with threadpool_limits(1, user_api="blas"):  # the other cores are the starting workers'
            super()._stand_in(k)

    def _flat_parameters(self) -> np.ndarray:
        return _flatten(self.params, self._names)

    def _proximal_step(self, grad: np.ndarray, step_scale: float) -> float:
        grads = unflatten(grad, self._names, self._shapes, self._dtype)
        self.params, self.opt_state, h = self._update(self.params, grads, self.opt_state, step_scale)
        return float(h)

    def _checkpoint(self) -> dict:
        to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
        return {"params": to_np(self.params), "optim": to_np(self.opt_state)}

    def _restore(self, state: dict) -> None:
        if set(state.get("params", {})) != set(self._names):
            raise ValueError("state: parameter names do not match this model")
        self.params = {n: jax.numpy.asarray(state["params"][n]) for n in self._names}
        self.opt_state = jax.tree_util.tree_map(jax.numpy.asarray, state["optim"])


def _check(advgp, X, y, optim, params):
    """Validated ``(X, y, optim, params)`` shared by both entry points."""
    if not isinstance(advgp, ADVGP):
        raise ValueError(f"advgp: expected a numpyro_scalegp.ADVGP, got {type(advgp).__name__}")
    X, y = advgp._check_data(X, y)
    if y is None:
        raise ValueError("y: required")
    optim = {} if optim is None else dict(optim)
    unknown = set(optim) - {"learning_rate", "rho", "eps"}
    if unknown:
        raise ValueError(f"optim: unknown ADADELTA arguments {sorted(unknown)}")
    params = advgp.init_params() if params is None else dict(params)
    if set(params) != set(advgp.init_params()):
        raise ValueError("params: expected the keys of advgp.init_params()")
    return np.asarray(X), np.asarray(y), optim, params


class AsyncProximalSVI(_Server):
    """Asynchronous (bounded-delay) proximal SVI for :class:`~numpyro_scalegp.advgp.ADVGP`
    (the protocol of :mod:`scalegp.async_server` over local worker processes).

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
    :param num_threads: BLAS threads per worker (the LAPACK calls of XLA's CPU backend).
    :param batch_size: rows per gradient and worker (default ``None``: the whole shard); with
        ``b`` rows, the unbiased estimate ``(n_k / b) grad g_k`` from ``b`` rows drawn afresh
        (:func:`scalegp.async_server.batch_rows`).
    :param seed: seeds the minibatch draws (with the worker and the parameter version).
    :param stand_in: while a worker process starts or restarts (seconds: it compiles, and the
        first time the fork server imports JAX, which it starts doing at construction, while the
        server compiles), the server computes that worker's gradients itself when an
        update waits for them (``stood_in`` lists them; it compiles the gradient once, for
        every worker whose batch has the same size, and before starting the workers, which
        would compete with it for the cores, and hands them the compiled program, which they
        load instead of compiling their own). Default ``None``: with ``batch_size`` only
        (:func:`scalegp.async_server.standing_in`); ``False``: always wait for the worker.
    :param shrink_stale_steps: divide each update's step sizes by one plus the mean delay of
        the gradients it sums (default; :mod:`scalegp.async_server`); ``False``: the paper's
        full steps, which overshoot with long delays.
    :param average_decay: the server keeps an exponential moving average of the parameters
        with this decay (:mod:`scalegp.async_server`), which :meth:`predict` and
        :meth:`averaged_params` use. Default ``None``: 0.99 (about the last 100 updates) with
        ``batch_size``, whose noisy updates the average smooths, and 0 (the last iterate) with
        whole shards.

    ``params`` holds the current parameters (a dict of arrays), the last iterate;
    :meth:`predict` predicts at the average, which minibatch noise moves less.

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k`` (``O(M^3 + b M^2)`` with
       ``batch_size=b``), ``O(K (M^2 + M d))`` on the server. Starting the workers (the fork
       server's imports the first time, jit unless they load the stand-in's program) takes seconds,
       during which the server computes their gradients (with ``stand_in``).
    """

    def __init__(self, advgp: ADVGP, X, y, *, num_workers: int = 1, max_delay: int = 0,
                 optim: dict | None = None, shards: Sequence | None = None, params: dict | None = None,
                 worker_sleep: float | Sequence[float] = 0.0, stall_timeout: float = 60.0,
                 num_threads: int = 1, batch_size: int | None = None, seed: int = 0,
                 stand_in: bool | None = None, shrink_stale_steps: bool = True,
                 average_decay: float | None = None):
        X, y, optim, params = _check(advgp, X, y, optim, params)
        shards, sleeps = check_options(X.shape[0], num_workers=num_workers, max_delay=max_delay,
                                       stall_timeout=stall_timeout, shards=shards, worker_sleep=worker_sleep,
                                       batch_size=batch_size, seed=seed, num_threads=num_threads,
                                       shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)
        data = [(X[s], y[s]) for s in shards]
        here = _Gradient(advgp, params) if standing_in(stand_in, batch_size) else None
        # the fork server imports the workers' module while the server compiles (one core each)
        context = preloading_context(_Gradient.__module__)
        start_fork_server(context)

        def start_workers():
            compiled = None if here is None else here.executables()
            return ProcessWorkers(context,
                                  _Gradient(advgp, params, int(num_threads), executables=compiled),
                                  data, sleeps, batch_size=batch_size, seed=seed, stand_in=here)

        def warm_up(flat):  # the stand-in's gradient on worker 0's first batch, compiled by the first call
            shard_gradient(here(*data[0]), flat, 0, len(data[0][1]), batch_size=batch_size, seed=seed)

        super().__init__(advgp, params, optim, start_workers, max_delay=max_delay, stall_timeout=stall_timeout,
                         shrink_stale_steps=shrink_stale_steps, average_decay=averaging(average_decay, batch_size),
                         warm_up=None if here is None else warm_up)

    @property
    def workers(self) -> list:
        """The worker processes (``multiprocessing.Process``), one per shard."""
        return list(self._workers.processes)


def distributed_proximal_svi(advgp: ADVGP, X, y, num_steps: int, *, max_delay: int = 0,
                             optim: dict | None = None, shards: Sequence | None = None,
                             params: dict | None = None, host: str = "127.0.0.1",
                             stall_timeout: float = 60.0, connect_timeout: float = 60.0,
                             checkpoint: str | None = None, batch_size: int | None = None,
                             seed: int = 0, shrink_stale_steps: bool = True,
                             average_decay: float | None = None) -> dict | None:
    """The same delayed proximal gradient algorithm across the processes of a
    ``jax.distributed`` job: call it in every process (after
    ``jax.distributed.initialize``; on CPU with
    ``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` for the
    rendezvous) with the same model, data and arguments. Process 0 is the server and
    listens on ``host`` (the address the others reach it at); process ``k >= 1`` is the
    worker of shard ``k - 1`` (default: ``numpy.array_split`` of the rows into
    ``process_count - 1``). Messages go over TCP (module docstring).

    Returns, on process 0, ``{"losses", "staleness", "state"}`` (the state as
    :meth:`AsyncProximalSVI.state_dict`); ``None`` on the workers. A process that dies
    makes the others raise :class:`PeerFailedError` naming its rank as soon as its
    connection closes (within a poll interval, 50 ms); ranks that do not connect within
    ``connect_timeout`` seconds are named too; a silent worker is reported after
    ``stall_timeout`` seconds (:class:`StalledWorkerWarning`). ``jax.distributed``'s own
    coordination service notices a dead process too, but only after its
    ``heartbeat_timeout_seconds`` (default 100 s), and its shutdown at exit then waits up to
    ``shutdown_timeout_seconds`` or aborts the process: pass short ones to
    ``jax.distributed.initialize`` for a quick exit after a failure.

    With ``checkpoint`` (a file path that process 0 can write), ``num_steps`` counts updates
    in all and the run is resumable (:meth:`scalegp.async_server.ProximalServer.run_checkpointed`):
    relaunched after a failure (by a job scheduler, or by hand), every process (the dead
    worker on its own shard) starts again and process 0 goes on from the last update
    written; the result then also holds ``resumed_from``. ``batch_size`` and ``seed`` (minibatch
    gradients), ``shrink_stale_steps`` and ``average_decay`` (the state's ``"average"``, the
    flattened averaged parameters in the sorted order of their names): as in
    :class:`AsyncProximalSVI`.

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k`` and ``O(K P)`` on the
       server, plus two messages of ``P`` numbers per worker and update.
    """
    from jax.experimental import multihost_utils

    if not jax.distributed.is_initialized():
        raise ValueError("advgp: jax.distributed is not initialized (call jax.distributed.initialize first)")
    rank, world = jax.process_index(), jax.process_count()
    if world < 2:
        raise ValueError(f"process_count: expected at least 2 processes (a server and a worker), got {world}")
    X, y, optim, params = _check(advgp, X, y, optim, params)
    shards, _ = check_options(X.shape[0], num_workers=world - 1, max_delay=max_delay,
                              stall_timeout=stall_timeout, shards=shards, batch_size=batch_size, seed=seed,
                              shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)
    rendezvous = np.zeros(33, dtype=np.int32)  # the port, then the 32 bytes of the key
    if rank == 0:
        listening = socket.create_server((host, 0))
        rendezvous[0] = listening.getsockname()[1]
        rendezvous[1:] = np.frombuffer(secrets.token_bytes(32), dtype=np.uint8)
    rendezvous = np.asarray(multihost_utils.broadcast_one_to_all(rendezvous))
    port, authkey = int(rendezvous[0]), rendezvous[1:].astype(np.uint8).tobytes()
    if rank > 0:
        channel = connect_to_server((host, port), authkey, rank - 1, timeout=connect_timeout)
        serve_gradients(channel, _Gradient(advgp, params), X[shards[rank - 1]], y[shards[rank - 1]],
                        batch_size=batch_size, seed=seed, worker=rank - 1)
        return None
    with _Server(advgp, params, optim, lambda: accept_workers(listening, authkey, world - 1, timeout=connect_timeout),
                 max_delay=max_delay, stall_timeout=stall_timeout,
                 shrink_stale_steps=shrink_stale_steps,
                 average_decay=averaging(average_decay, batch_size)) as server:
        if checkpoint is not None:
            return server.run_checkpointed(num_steps, checkpoint)
        losses = server.run(num_steps, progress_bar=False)
        return {"losses": losses, "staleness": server.staleness, "state": server.state_dict()}
