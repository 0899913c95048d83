r"""Delayed (bounded-staleness) proximal gradient training of ADVGP over worker processes.

A server (this process) holds the parameters of an :class:`~pyro_scalegp.advgp.ADVGP`;
``num_workers`` ``torch.multiprocessing`` processes (spawned) each own a shard of the
data. A worker pulls the latest parameters, computes the gradient of its data term
:math:`g_k` (:meth:`~pyro_scalegp.advgp.ADVGP.data_term`) and pushes it tagged with the
version it used; it then waits for a newer version. The server applies the update

.. math::

    \theta_{t+1} = \mathrm{prox}_{\gamma h}\Big(\theta_t - \gamma \sum_k \nabla g_k(\theta_{t_k})\Big),
    \qquad t - \tau \le t_k \le t,

(proximal ADADELTA, :class:`~pyro_scalegp.optim.ProximalAdadeltaOptimizer`; the prox
acts on :math:`\mu, U` only) as soon as it has a new gradient and every worker's latest
gradient is at most ``max_delay`` (:math:`\tau`) versions old (Peng et al., 2017,
section 4; Li et al., 2013). ``max_delay=0`` is synchronous proximal gradient descent.

Parameters reach the workers through one shared-memory buffer and a version counter;
gradients come back through one pipe per worker. Faults: a worker that dies is
restarted on its own shard (its pending gradient is recomputed at the current
version, so in synchronous mode the run is unchanged); a worker silent for longer
than ``stall_timeout`` seconds is reported with a :class:`StalledWorkerWarning`;
``state_dict``/``load_state_dict`` stop and resume a run.

.. note:: Cost per update: ``O(M^3 + n_k M^2)`` time on worker ``k`` (its shard of
   ``n_k`` rows) and ``O(P)`` on the server for ``P = O(M^2 + M d)`` parameters; memory
   ``O(n_k M)`` per worker plus one shared ``O(P)`` buffer.
"""
from __future__ import annotations

import time
import traceback
import warnings
from multiprocessing.connection import wait as mp_wait
from typing import Sequence

import numpy as np
import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from .advgp import ADVGP
from .optim import ProximalAdadeltaOptimizer

__all__ = ["AsyncProximalSVI", "StalledWorkerWarning", "distributed_proximal_svi"]


class StalledWorkerWarning(RuntimeWarning):
    """A worker sent no gradient for longer than ``stall_timeout`` seconds."""


def _flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, tensors) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


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


def _worker_main(rank, advgp, X, y, shared, seq, stop, bell, conn, sleep, num_threads):
    """Worker loop: wait for a newer parameter version, compute grad g_k, push it."""
    try:
        torch.set_num_threads(num_threads)
        params = [p for _, p in advgp.named_parameters()]
        X, y = torch.as_tensor(X), torch.as_tensor(y)
        last = -1
        while True:
            flat, last = _pull(shared.numpy(), seq, stop, bell, last)
            if flat is None:
                return
            flat = torch.from_numpy(flat)
            with torch.no_grad():
                _unflatten_into(flat, params)
            if sleep > 0:
                time.sleep(sleep)
            for p in params:
                p.grad = None
            value = advgp.data_term(X, y)
            value.backward()
            grad = _flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
            conn.send(("grad", rank, last, grad.numpy(), value.item()))
    except Exception:  # reported to the server, which raises
        conn.send(("error", rank, -1, traceback.format_exc(), None))


class AsyncProximalSVI:
    """Asynchronous (bounded-delay) proximal SVI for :class:`~pyro_scalegp.advgp.ADVGP`.

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
    :param num_threads: torch threads per worker.

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k``, ``O(M^2 + M d)``
       on the server. Starting the workers (spawned interpreters) takes seconds.
    """

    def __init__(self, advgp: ADVGP, X, y, *, num_workers: int = 1, max_delay: int = 0,
                 optim: dict | None = None, shards: Sequence | None = None,
                 worker_sleep: float | Sequence[float] = 0.0, stall_timeout: float = 60.0,
                 num_threads: int = 1):
        if not isinstance(advgp, ADVGP):
            raise ValueError(f"advgp: expected a pyro_scalegp.ADVGP, got {type(advgp).__name__}")
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
        unknown = set(optim) - {"lr", "rho", "eps"}
        if unknown:
            raise ValueError(f"optim: unknown ADADELTA arguments {sorted(unknown)}")

        self.advgp = advgp
        self.num_workers = num_workers
        self.max_delay = max_delay
        self.stall_timeout = float(stall_timeout)
        self._X, self._y, self._shards = X, y, shards
        self._sleeps = sleeps.tolist()
        self._num_threads = int(num_threads)
        named = dict(advgp.named_parameters())
        self._names = list(named)
        self._params = list(named.values())
        self.optimizer = ProximalAdadeltaOptimizer([
            {"params": [named["guide.loc_unconstrained"]], "prox": "loc"},
            {"params": [named["guide.scale_tril_unconstrained"]], "prox": "scale_tril"},
            {"params": [p for n, p in named.items() if not n.startswith("guide.")]},
        ], **optim)

        self.version = 0
        self.restarts: list[tuple[int, int]] = []  # (worker, version) of each restart
        self.stalls: list[tuple[int, int, float]] = []  # (worker, version, seconds) reported
        self.staleness: list[int] = []  # the largest delay used by each update
        self._latest_grad: list[np.ndarray | None] = [None] * num_workers
        self._latest_value = [0.0] * num_workers
        self._latest_version = [-1] * num_workers
        self._last_heard = [time.monotonic()] * num_workers
        self._stall_reported = [False] * num_workers
        self._seq_version: dict[int, int] = {}
        self._wait_start = time.monotonic()

        self._ctx = mp.get_context("spawn")
        with torch.no_grad():
            flat = _flatten([p.detach() for p in self._params])
        self._shared = flat.clone().share_memory_()
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
        idx = torch.as_tensor(self._shards[k])
        proc = self._ctx.Process(
            target=_worker_main, daemon=True,
            args=(k, self.advgp, self._X[idx].numpy(), self._y[idx].numpy(), self._shared, self._seq,
                  self._stop, bell_recv, send, self._sleeps[k], self._num_threads))
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
        with torch.no_grad():
            self._shared.copy_(_flatten([p.detach() for p in self._params]))
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
        grad = torch.as_tensor(np.sum(self._latest_grad, axis=0))
        for p in self._params:
            p.grad = torch.empty_like(p)
        _unflatten_into(grad, [p.grad for p in self._params])
        with torch.no_grad():
            loss = float(sum(self._latest_value)) + self.advgp.kl().item()
        self.staleness.append(self.version - min(self._latest_version))
        self.optimizer.step()
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
        """Parameters, optimizer state and version: enough to resume a synchronous run exactly."""
        return {
            "version": self.version,
            "params": {n: p.detach().clone() for n, p in zip(self._names, self._params)},
            "optim": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; gradients in flight on older parameters are dropped."""
        if set(state.get("params", {})) != set(self._names):
            raise ValueError("state: parameter names do not match this model")
        with torch.no_grad():
            for n, p in zip(self._names, self._params):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optim"])
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


def distributed_proximal_svi(advgp: ADVGP, X, y, num_steps: int, *, max_delay: int = 0,
                             optim: dict | None = None, shards: Sequence | None = None) -> dict | None:
    """The same delayed proximal gradient algorithm over ``torch.distributed`` point-to-point
    messages (gloo): call it in every process of an initialized process group with the same
    model, data and arguments. Rank 0 is the server; rank ``k >= 1`` is the worker of
    shard ``k - 1`` (default: ``numpy.array_split`` of the rows into ``world_size - 1``).

    A worker receives ``(version, parameters)``, sends back ``(version, value, grad g_k)``
    and waits for the next parameters; the server updates once it has a new gradient and
    every worker's latest gradient is at most ``max_delay`` versions old, then sends the new
    parameters to every worker that is idle. Returns, on rank 0, ``{"losses", "staleness",
    "state"}`` (the state as :meth:`AsyncProximalSVI.state_dict`) with ``advgp`` updated in
    place; ``None`` on the workers.

    .. note:: Cost per update: ``O(M^3 + n_k M^2)`` on worker ``k`` and ``O(P)`` on the
       server, plus two messages of ``P`` numbers per worker and update.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("advgp: torch.distributed is not initialized (call init_process_group first)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise ValueError(f"world_size: expected at least 2 processes (a server and a worker), got {world}")
    if not isinstance(max_delay, int) or max_delay < 0:
        raise ValueError(f"max_delay: expected a non-negative integer, got {max_delay!r}")
    X, y = advgp._check_data(X, y)
    num_workers = world - 1
    shards = np.array_split(np.arange(X.shape[0]), num_workers) if shards is None else list(shards)
    if len(shards) != num_workers:
        raise ValueError(f"shards: expected {num_workers} shards (world_size - 1), got {len(shards)}")
    named = dict(advgp.named_parameters())
    params = list(named.values())
    dtype = params[0].dtype
    size = sum(p.numel() for p in params)
    if rank > 0:
        idx = torch.as_tensor(np.asarray(shards[rank - 1], dtype=np.int64))
        Xk, yk = X[idx], y[idx]
        msg = torch.empty(size + 1, dtype=dtype)
        while True:
            dist.recv(msg, src=0)
            version = int(msg[0].item())
            if version < 0:
                return None
            with torch.no_grad():
                _unflatten_into(msg[1:], params)
            for p in params:
                p.grad = None
            value = advgp.data_term(Xk, yk)
            value.backward()
            grad = _flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
            dist.send(torch.cat([torch.tensor([float(version), value.item()], dtype=dtype), grad]), dst=0)
    optimizer = ProximalAdadeltaOptimizer([
        {"params": [named["guide.loc_unconstrained"]], "prox": "loc"},
        {"params": [named["guide.scale_tril_unconstrained"]], "prox": "scale_tril"},
        {"params": [p for n, p in named.items() if not n.startswith("guide.")]},
    ], **({} if optim is None else optim))
    version = 0
    latest_grad: list = [None] * num_workers
    latest_value = [0.0] * num_workers
    latest_version = [-1] * num_workers
    busy = [False] * num_workers
    buffer = torch.empty(size + 2, dtype=dtype)

    def send_params(k):
        with torch.no_grad():
            msg = torch.cat([torch.tensor([float(version)], dtype=dtype), _flatten([p.detach() for p in params])])
        dist.send(msg, dst=k + 1)  # worker k is idle, blocked in its recv
        busy[k] = True

    def receive():
        k = dist.recv(buffer) - 1  # from any worker
        latest_version[k] = int(buffer[0].item())
        latest_value[k] = float(buffer[1].item())
        latest_grad[k] = buffer[2:].clone()
        busy[k] = False

    for k in range(num_workers):
        send_params(k)
    losses, staleness = [], []
    for _ in range(num_steps):
        receive()
        while not all(g is not None and v >= version - max_delay for g, v in zip(latest_grad, latest_version)):
            receive()
        for p in params:
            p.grad = torch.empty_like(p)
        _unflatten_into(torch.stack(latest_grad).sum(0), [p.grad for p in params])
        with torch.no_grad():
            losses.append(float(sum(latest_value)) + advgp.kl().item())
        staleness.append(version - min(latest_version))
        optimizer.step()
        version += 1
        for k in range(num_workers):
            if not busy[k]:  # idle: hand it the new parameters
                send_params(k)
    while any(busy):
        receive()
    for k in range(num_workers):
        dist.send(torch.full((size + 1,), -1.0, dtype=dtype), dst=k + 1)
    state = {"version": version, "params": {n: p.detach().clone() for n, p in named.items()},
             "optim": optimizer.state_dict()}
    return {"losses": losses, "staleness": staleness, "state": state}
