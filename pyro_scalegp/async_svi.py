r"""Delayed (bounded-staleness) proximal gradient training of ADVGP over worker processes.

A server (this process) holds the parameters of an :class:`~pyro_scalegp.advgp.ADVGP`;
``num_workers`` local processes (:func:`worker_context`) each own a shard of the data. A
worker receives the newest parameters, computes the gradient of its data term :math:`g_k`
(:meth:`~pyro_scalegp.advgp.ADVGP.data_term`) and sends it back tagged with the
version it used. The server applies

.. math::

    \theta_{t+1} = \mathrm{prox}_{\gamma h}\Big(\theta_t - \gamma \sum_k \nabla g_k(\theta_{t_k})\Big),
    \qquad t - \tau \le t_k \le t,

(proximal ADADELTA, :class:`~pyro_scalegp.optim.ProximalAdadeltaOptimizer`; the prox
acts on :math:`\mu, U` only) as soon as it has a new gradient and every worker's latest
gradient is at most ``max_delay`` (:math:`\tau`) versions old (Peng et al., 2017,
section 4; Li et al., 2013). ``max_delay=0`` is synchronous proximal gradient descent.

The protocol (versions, the update condition, restarts of dead workers, stall
warnings, resume) is the framework-free :mod:`scalegp.async_server`; this module
supplies the torch parts: the workers' gradient (each worker unpickles its own copy of
the model), the optimizer step and the (de)serialization of parameters, plus a
transport over ``torch.distributed`` for :func:`distributed_proximal_svi`.

.. note:: Cost per update: ``O(M^3 + n_k M^2)`` time on worker ``k`` (its shard of
   ``n_k`` rows) and ``O(K P)`` on the server for ``P = O(M^2 + M d)`` parameters and
   ``K`` workers; memory ``O(n_k M)`` per worker.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import queue
import sys
import threading
from typing import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from scalegp.async_server import (PeerFailedError, ProcessWorkers, ProximalServer, StalledWorkerWarning,
                                  averaging, check_options, serve_gradients, standing_in)
from scalegp.processes import preloading_context

from .advgp import ADVGP, _flat_rbf_gradient
from .optim import ProximalAdadeltaOptimizer
from .threads import torch_threads

__all__ = ["AsyncProximalSVI", "PeerFailedError", "StalledWorkerWarning", "distributed_proximal_svi"]


def _flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, tensors) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _jax_runs_here() -> bool:
    """Whether JAX's runtime (its threads) has started in this process (without importing JAX)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    initialized = getattr(bridge, "backends_are_initialized", None)
    return True if initialized is None else bool(initialized())


def worker_context(num_threads: int):
    """The ``multiprocessing`` context that starts :class:`AsyncProximalSVI`'s workers:
    ``"fork"`` on Linux for one torch thread per worker while neither CUDA nor JAX's runtime
    has started in this process; otherwise a fork server that has imported this module once
    (``"spawn"`` where there is none: :func:`scalegp.processes.preloading_context`).

    A forked worker shares the server's imported modules (torch, Pyro, the user's own
    ``__main__``, so classes defined in a notebook or script unpickle there) and starts in
    milliseconds, where spawned interpreters re-import the main module and torch: on a
    2-core machine 1.3 s before one computes, 3.4 s before four do (from a fork server, the
    main module only, once the server has imported torch). Only one thread
    is safe: GNU OpenMP's thread pool does not survive ``fork``, and a forked child that
    runs a torch operation on two threads hangs once the parent has used two (checked on
    torch 2.13; one thread never enters OpenMP). CUDA cannot be used in a forked child, and
    JAX warns that forking its threads may deadlock (a process that also runs NumPyro).

    .. note:: Cost: one ``multiprocessing.get_context`` call.
    """
    if sys.platform == "linux" and num_threads == 1 and not torch.cuda.is_initialized() and not _jax_runs_here():
        return multiprocessing.get_context("fork")
    return preloading_context(__name__)


class _Gradient:
    """Picklable: builds, in a worker, ``compute(flat, rows=None) -> (g_k, grad g_k)`` on the
    shard ``(X, y)`` (or on its ``rows``) for a private copy of the model (``num_threads`` torch
    threads, if given): on one thread for an RBF model in numpy
    (:func:`~pyro_scalegp.advgp._flat_rbf_gradient`), else by autograd."""

    def __init__(self, advgp: ADVGP, num_threads: int | None = None):
        self._model = pickle.dumps(advgp)  # by value: no storage shared with the server
        self._num_threads = num_threads

    def __call__(self, X, y):
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        advgp = pickle.loads(self._model)
        X, y = torch.as_tensor(X), torch.as_tensor(y)
        written_out = _flat_rbf_gradient(advgp) if self._num_threads == 1 else None
        if written_out is not None:
            threadpool_limits(1, user_api="blas")  # (numpy's OpenBLAS on two threads: 4x slower, M = 100, 1,024 rows)
            X, y = X.numpy(), y.numpy()
            return lambda flat, rows=None: written_out(flat, X, y) if rows is None else written_out(flat, X[rows], y[rows])
        params = list(advgp.parameters())

        def compute(flat, rows=None):
            with torch.no_grad():
                _unflatten_into(torch.as_tensor(flat, dtype=params[0].dtype), params)
            for p in params:
                p.grad = None
            if rows is None:
                value = advgp.data_term(X, y)
            else:
                rows = torch.as_tensor(rows)
                value = advgp.data_term(X[rows], y[rows])
            value.backward()
            grad = _flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
            return value.item(), grad.numpy()

        return compute


class _Server(ProximalServer):
    """The protocol's server with the torch hooks: proximal ADADELTA on ``advgp``'s
    parameters (updated in place)."""

    def __init__(self, advgp: ADVGP, optim: dict, workers, *, max_delay: int, stall_timeout: float,
                 shrink_stale_steps: bool = True, average_decay: float = 0.0):
        self.advgp = advgp
        named = dict(advgp.named_parameters())
        self._names, self._params = list(named), list(named.values())
        self.optimizer = ProximalAdadeltaOptimizer([
            {"params": [named["guide.loc_unconstrained"]], "prox": "loc"},
            {"params": [named["guide.scale_tril_unconstrained"]], "prox": "scale_tril"},
            {"params": [p for n, p in named.items() if not n.startswith("guide.")]},
        ], **optim)
        super().__init__(workers, max_delay=max_delay, stall_timeout=stall_timeout,
                         shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)

    def averaged_params(self) -> dict[str, torch.Tensor]:
        """The averaged parameters (``average``, see :mod:`scalegp.async_server`) by name, as
        ``advgp.named_parameters()`` holds them (unconstrained)."""
        params = [torch.empty_like(p) for p in self._params]
        _unflatten_into(torch.as_tensor(self.average, dtype=params[0].dtype), params)
        return dict(zip(self._names, params))

    @contextlib.contextmanager
    def averaged(self):
        """``with svi.averaged(): ...``: the model holds the averaged parameters inside the
        block (for ``advgp.predict``, ``Predictive``, ...) and its current ones again after it."""
        current = [p.detach().clone() for p in self._params]
        try:
            with torch.no_grad():
                _unflatten_into(torch.as_tensor(self.average, dtype=current[0].dtype), self._params)
            yield self.advgp
        finally:
            with torch.no_grad():
                for p, c in zip(self._params, current):
                    p.copy_(c)

    def predict(self, X_new, *, averaged: bool = True):
        """``advgp.predict(X_new)`` at the averaged parameters (``averaged=False``: at the
        current ones), without gradients."""
        with torch.no_grad(), (self.averaged() if averaged else contextlib.nullcontext()):
            return self.advgp.predict(X_new)

    def _flat_parameters(self) -> np.ndarray:
        with torch.no_grad():
            return _flatten([p.detach() for p in self._params]).to(torch.float64).numpy()

    def _proximal_step(self, grad: np.ndarray, step_scale: float) -> float:
        # on one thread: the tensors are small (O(M^2)), and a thread pool that spins after each
        # parallel region (`tril`) takes the cores from local workers (an update with 2 workers
        # of 512 rows, M = 50, on 2 cores: 11.7 ms with the step on 2 threads, 8.1 ms on one)
        with torch_threads(1):
            for p in self._params:
                p.grad = torch.empty_like(p)
            _unflatten_into(torch.as_tensor(grad), [p.grad for p in self._params])
            with torch.no_grad():
                h = self.advgp.kl().item()
            self.optimizer.step(step_scale=step_scale)
        return h

    def _stand_in(self, k: int) -> None:
        with torch_threads(1):  # as the step: the other cores are the starting workers'
            super()._stand_in(k)

    def _checkpoint(self) -> dict:
        return {"params": {n: p.detach().clone() for n, p in zip(self._names, self._params)},
                "optim": self.optimizer.state_dict()}

    def _restore(self, state: dict) -> None:
        if set(state.get("params", {})) != set(self._names):
            raise ValueError("state: parameter names do not match this model")
        with torch.no_grad():
            for n, p in zip(self._names, self._params):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optim"])


def _check_optim(optim: dict | None) -> dict:
    optim = {} if optim is None else dict(optim)
    unknown = set(optim) - {"lr", "rho", "eps"}
    if unknown:
        raise ValueError(f"optim: unknown ADADELTA arguments {sorted(unknown)}")
    return optim


class AsyncProximalSVI(_Server):
    """Asynchronous (bounded-delay) proximal SVI for :class:`~pyro_scalegp.advgp.ADVGP`
    (the protocol of :mod:`scalegp.async_server` over local worker processes).

    :param advgp: the model; its parameters are updated in place by the server.
    :param X: ``(N, d)`` inputs.
    :param y: ``(N,)`` targets.
    :param num_workers: number of worker processes.
    :param max_delay: the staleness bound :math:`\\tau` (``0``: synchronous).
    :param optim: ADADELTA arguments ``lr``, ``rho``, ``eps`` of the
        :class:`~pyro_scalegp.optim.ProximalAdadeltaOptimizer`.
    :param shards: ``num_workers`` arrays of row indices, together covering every row
        (default: ``numpy.array_split`` of the rows in order).
    :param worker_sleep: seconds each worker sleeps before every gradient (simulated
        stragglers, paper section 6.1): a number or one per worker.
    :param stall_timeout: seconds without a gradient from a worker the server waits on
        before a :class:`StalledWorkerWarning`.
    :param num_threads: torch threads per worker. With one (the default) the workers are
        forked on Linux and start at once (unless CUDA or JAX runs in this process), otherwise
        forked from a fork server or spawned (:func:`worker_context`).
    :param batch_size: rows per gradient and worker (default ``None``: the whole shard). With
        ``b`` rows, each gradient is the unbiased estimate ``(n_k / b) grad g_k`` from ``b`` rows
        of the shard drawn afresh (:func:`scalegp.async_server.batch_rows`): cheaper, noisier
        updates, as in minibatch SVI.
    :param seed: seeds the minibatch draws (with the worker and the parameter version, so a
        restarted worker or a resumed run draws the same rows).
    :param stand_in: while a worker process starts or restarts (seconds where it is not forked
        from this process: it re-imports the main module and, spawned, torch), the server
        computes that worker's gradients itself when an update waits for them, so training
        starts at once (``stood_in`` lists them; the same numbers as the worker's). Default
        ``None``: with ``batch_size`` only (:func:`scalegp.async_server.standing_in`);
        ``False``: always wait for the worker.
    :param shrink_stale_steps: divide each update's step sizes by one plus the mean delay of
        the gradients it sums (default; :mod:`scalegp.async_server`); ``False``: the paper's
        full steps, which overshoot with long delays.
    :param average_decay: the server keeps an exponential moving average of the parameters
        with this decay (:mod:`scalegp.async_server`), which :meth:`predict` and :meth:`averaged`
        use. Default ``None``: 0.99 (about the last 100 updates) with ``batch_size``, whose noisy
        updates the average smooths, and 0 (the last iterate) with whole shards.

    A worker that dies is restarted on its shard (``restarts``); ``state_dict`` /
    ``load_state_dict`` stop and resume; ``workers`` are the processes. The model's own
    parameters are the last iterate; :meth:`predict` (or ``with svi.averaged():``) predicts at
    the average, which minibatch noise moves less.

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k`` (``O(M^3 + b M^2)`` with
       ``batch_size=b``), ``O(K (M^2 + M d))`` on the server. Starting workers that are not forked from this
       process takes seconds (forked ones milliseconds), during which the server computes their gradients
       (with ``stand_in``).
    """

    def __init__(self, advgp: ADVGP, X, y, *, num_workers: int = 1, max_delay: int = 0,
                 optim: dict | None = None, shards: Sequence | None = None,
                 worker_sleep: float | Sequence[float] = 0.0, stall_timeout: float = 60.0,
                 num_threads: int = 1, batch_size: int | None = None, seed: int = 0,
                 stand_in: bool | None = None, shrink_stale_steps: bool = True,
                 average_decay: float | None = None):
        if not isinstance(advgp, ADVGP):
            raise ValueError(f"advgp: expected a pyro_scalegp.ADVGP, got {type(advgp).__name__}")
        X, y = advgp._check_data(X, y)
        if y is None:
            raise ValueError("y: required")
        shards, sleeps = check_options(X.shape[0], num_workers=num_workers, max_delay=max_delay,
                                       stall_timeout=stall_timeout, shards=shards, worker_sleep=worker_sleep,
                                       batch_size=batch_size, seed=seed, num_threads=num_threads,
                                       shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)
        optim = _check_optim(optim)
        data = [(X[torch.as_tensor(s)].numpy(), y[torch.as_tensor(s)].numpy()) for s in shards]
        workers = ProcessWorkers(worker_context(int(num_threads)), _Gradient(advgp, int(num_threads)),
                                 data, sleeps, batch_size=batch_size, seed=seed,
                                 stand_in=_Gradient(advgp) if standing_in(stand_in, batch_size) else None)
        super().__init__(advgp, optim, workers, max_delay=max_delay, stall_timeout=stall_timeout,
                         shrink_stale_steps=shrink_stale_steps,
                         average_decay=averaging(average_decay, batch_size))

    @property
    def workers(self) -> list:
        """The worker processes (``multiprocessing.Process``), one per shard."""
        return list(self._workers.processes)


# ---- torch.distributed -----------------------------------------------------------------------------
_STOP, _FAILED, _ABORT = -1, -2, -3  # tags of control messages


class _DistributedWorkers:
    """The server's transport over ``torch.distributed`` point-to-point messages (rank 0;
    worker ``k`` is rank ``k + 1``). Parameters go out as ``[tag, version, theta]``, gradients come
    back as ``[tag, value, grad]`` (float64). Gloo cannot poll a receive, so one thread per
    worker blocks in ``recv`` from it and queues what arrives; a dead rank makes that
    ``recv`` fail at once (its connection closes), which is reported as its death."""

    restartable = False
    can_compute_here = False

    def __init__(self, num_workers: int, size: int):
        import torch.distributed as dist

        self._dist, self._size = dist, size
        self.num_workers = num_workers
        self._events: queue.Queue = queue.Queue()
        self._dead = [False] * num_workers
        self._threads = [threading.Thread(target=self._listen, args=(k,), daemon=True)
                         for k in range(num_workers)]
        for thread in self._threads:
            thread.start()

    def describe(self, k: int) -> str:
        return f"rank {k + 1} (worker {k})"

    def _listen(self, k: int) -> None:
        buffer = torch.empty(self._size + 2, dtype=torch.float64)
        while True:
            try:
                self._dist.recv(buffer, src=k + 1)
            except RuntimeError as exc:
                self._dead[k] = True
                self._events.put(("dead", k, str(exc).splitlines()[0]))
                return
            tag = int(buffer[0].item())
            if tag == _STOP:  # acknowledges the stop: nothing more comes from it
                return
            if tag == _FAILED:
                self._events.put(("error", k, f"see the traceback in the output of rank {k + 1}"))
                return
            self._events.put(("grad", k, tag, buffer[1].item(), buffer[2:].numpy().copy()))

    def send(self, k: int, tag: int, version: int, flat: np.ndarray) -> None:
        message = torch.cat([torch.tensor([float(tag), float(version)], dtype=torch.float64), torch.from_numpy(flat)])
        try:
            self._dist.send(message, dst=k + 1)
        except RuntimeError:
            pass  # a dead rank: its listener reports it

    def poll(self, timeout: float) -> list[tuple]:
        try:
            events = [self._events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._events.empty():
            events.append(self._events.get())
        return events

    def close(self, abort: str | None = None) -> None:
        """Tell every live worker to stop (or, with ``abort``, to raise; it acknowledges
        either once its gradient in flight is sent) and wait for the acknowledgements."""
        stop = torch.full((self._size + 2,), float(_STOP if abort is None else _ABORT), dtype=torch.float64)
        for k in range(self.num_workers):
            if not self._dead[k]:
                try:
                    self._dist.send(stop, dst=k + 1)
                except RuntimeError:
                    pass
        for thread in self._threads:
            thread.join(timeout=30.0)


class _DistributedChannel:
    """A worker's end of :class:`_DistributedWorkers` (``P`` parameters)."""

    def __init__(self, size: int):
        import torch.distributed as dist

        self._dist, self._size = dist, size
        self._message = torch.empty(size + 2, dtype=torch.float64)

    def _send(self, message: torch.Tensor) -> None:
        try:
            self._dist.send(message, dst=0)
        except RuntimeError as exc:
            raise PeerFailedError(f"rank 0 (the server) died: {str(exc).splitlines()[0]}") from exc

    def recv(self):
        try:
            self._dist.recv(self._message, src=0)
        except RuntimeError as exc:
            raise PeerFailedError(f"rank 0 (the server) died: {str(exc).splitlines()[0]}") from exc
        tag = int(self._message[0].item())
        if tag in (_STOP, _ABORT):
            self._send(torch.full((self._size + 2,), float(_STOP), dtype=torch.float64))  # acknowledged
            if tag == _ABORT:
                raise PeerFailedError("rank 0 (the server) stopped the run: another rank failed (see its error)")
            return None
        return tag, int(self._message[1].item()), self._message[2:].numpy()

    def send(self, tag: int, value: float, grad: np.ndarray) -> None:
        self._send(torch.cat([torch.tensor([float(tag), value], dtype=torch.float64),
                              torch.as_tensor(grad, dtype=torch.float64)]))

    def fail(self, text: str) -> None:
        self._send(torch.full((self._size + 2,), float(_FAILED), dtype=torch.float64))


def distributed_proximal_svi(advgp: ADVGP, X, y, num_steps: int, *, max_delay: int = 0,
                             optim: dict | None = None, shards: Sequence | None = None,
                             stall_timeout: float = 60.0, checkpoint: str | None = None,
                             batch_size: int | None = None, seed: int = 0,
                             shrink_stale_steps: bool = True, average_decay: float | None = None) -> dict | None:
    """The same delayed proximal gradient algorithm over ``torch.distributed`` point-to-point
    messages (gloo): call it in every process of an initialized process group with the same
    model, data and arguments. Rank 0 is the server; rank ``k >= 1`` is the worker of
    shard ``k - 1`` (default: ``numpy.array_split`` of the rows into ``world_size - 1``).

    The protocol is :mod:`scalegp.async_server`'s: an idle worker is sent the newest
    parameters, sends back its gradient tagged with their version; the server updates once
    it has a new gradient and every worker's latest gradient is at most ``max_delay``
    versions old. Returns, on rank 0, ``{"losses", "staleness", "state"}`` (the state as
    :meth:`AsyncProximalSVI.state_dict`) with ``advgp`` updated in place; ``None`` on the
    workers. A rank that dies makes the others raise :class:`PeerFailedError` naming it
    (within a poll interval of its connection closing); the server reports a silent
    worker after ``stall_timeout`` seconds (:class:`StalledWorkerWarning`).

    With ``checkpoint`` (a file path that rank 0 can write), ``num_steps`` counts updates in
    all and the run is resumable (:meth:`scalegp.async_server.ProximalServer.run_checkpointed`):
    under ``torchrun --max-restarts=R`` a rank that dies takes the job down, torchrun restarts
    every rank (the dead worker on its own shard), and rank 0 goes on from the last update
    written; the result then also holds ``resumed_from``. ``batch_size`` and ``seed`` (minibatch
    gradients), ``shrink_stale_steps`` and ``average_decay`` (the state's ``"average"``, the
    flattened averaged parameters in the order of ``advgp.named_parameters()``): as in
    :class:`AsyncProximalSVI`. torchrun's rendezvous
    store outlives a failed attempt, so initialize the group with a prefix per attempt,
    ``dist.PrefixStore(f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)``, or gloo
    reads the dead attempt's addresses (see the README).

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k`` and ``O(K P)`` on the
       server, plus two messages of ``P`` numbers per worker and update.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("advgp: torch.distributed is not initialized (call init_process_group first)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise ValueError(f"world_size: expected at least 2 processes (a server and a worker), got {world}")
    X, y = advgp._check_data(X, y)
    shards, _ = check_options(X.shape[0], num_workers=world - 1, max_delay=max_delay,
                              stall_timeout=stall_timeout, shards=shards, batch_size=batch_size, seed=seed,
                              shrink_stale_steps=shrink_stale_steps, average_decay=average_decay)
    optim = _check_optim(optim)
    size = sum(p.numel() for p in advgp.parameters())
    if rank > 0:
        idx = torch.as_tensor(shards[rank - 1])
        serve_gradients(_DistributedChannel(size), _Gradient(advgp), X[idx], y[idx], batch_size=batch_size,
                        seed=seed, worker=rank - 1)
        return None
    with _Server(advgp, optim, _DistributedWorkers(world - 1, size), max_delay=max_delay,
                 stall_timeout=stall_timeout, shrink_stale_steps=shrink_stale_steps,
                 average_decay=averaging(average_decay, batch_size)) as server:
        if checkpoint is not None:
            return server.run_checkpointed(num_steps, checkpoint)
        losses = server.run(num_steps, progress_bar=False)
        return {"losses": losses, "staleness": server.staleness, "state": server.state_dict()}
