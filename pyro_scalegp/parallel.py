"""Parallel evaluation of the HGP objective: worker processes and ``torch.distributed`` ranks.

The HGP objective is a sum over experts (paper [1], eq. 5),

.. math::

    \\log p(y \\mid \\theta) \\approx \\sum_{k=1}^{E} \\log \\mathcal{N}(y_k \\mid m, K_k + \\sigma^2 I),

so disjoint groups of experts ("shards") can be evaluated anywhere and their values and
gradients summed. Section 3.5 of [1] runs the child GPs of the hierarchy in separate processes
to escape Python's global interpreter lock; this module does the same in two ways:

* :func:`pool_log_prob` (``HGPMarginal(..., workers=n)``): ``n`` ``torch.multiprocessing``
  processes on this machine, forked from a fork server that has imported this frontend's HGP once
  (spawned where the platform has no fork server: :func:`scalegp.processes.preloading_context`;
  on 2 cores a pool of 4 workers starts in 1.25 s instead of 3.2 s spawned, a later pool in the
  same process in 0.05 s instead of 2.8 s, ``/work/notes/adhoc/hgp_pool_start.py``). ``X`` and
  ``y`` live in shared memory, read-only in the workers; torch's threads are divided among the
  processes. With an expert tree the root's children are dealt to the workers, so the tree lays
  out where the work runs; without
  one, contiguous balanced ranges of experts. The pool is created once and reused by every
  later evaluation (SVI steps, L-BFGS closures): implicit pools are cached by the content of
  ``X``, the experts' index and ``n``; or pass an :class:`ExpertPool` you manage yourself.
* :func:`distributed_log_prob` (``HGPMarginal(..., distributed=True)``): every
  ``torch.distributed`` rank holds its *own* data shard (``X``, ``y`` and the experts are the
  rank's local ones); the value and the gradient are summed over the ranks by one
  ``all_reduce`` of a flat buffer, so every rank sees the global objective and the global
  gradient and its optimizer takes the same step. Launch with ``torchrun`` (see
  ``benchmarks/hgp_torchrun.py``).

Each evaluation sends the current hyperparameter *values* to the workers; they evaluate
their shard's value and its gradient with respect to the kernel hyperparameters, the noise and
the mean (:func:`pyro_scalegp.hgp.expert_log_likelihood`), and the parent returns a tensor whose
value is the sum and whose backward pass gives the summed gradients (a custom autograd
function whose inputs are the hyperparameter tensors, so gradients reach the unconstrained
parameters behind them as usual).

Supported kernels: RBF, Matern32, Matern52 and Exponential of ``pyro.contrib.gp.kernels``
(the values ``variance`` and ``lengthscale`` that :class:`~pyro_scalegp.kernels.BoundKernel`
read when the distribution was built are sent), and any other ``torch.nn.Module`` kernel
(sums, products, subclasses, your own) whose hyperparameters are ``PyroParam`` or
``PyroSample`` attributes of ``PyroModule`` (sub)modules or plain ``nn.Parameter``
attributes (:func:`kernel_hyperparameters`; a ``PyroSample`` sends the value drawn when the
distribution was built). The guide parameters that ``pyro.contrib.gp``'s ``autoguide``
attaches to a ``PyroSample`` are not hyperparameters of the kernel and are skipped. The
kernel's class must be importable by the workers and its other attributes picklable (no
lambdas); tensors it holds beyond its hyperparameters are copied to the workers as constants.

Limits: one observation vector ``y`` of shape ``(N,)`` (no batch dimensions); no gradients with
respect to ``y`` or ``X`` (a ``y`` or ``X`` that requires grad raises ``ValueError``: pass it
detached); CPU tensors. Worker pools pay off for fixed training inputs: a pool is tied to
its ``X`` and experts, and new ones start a new pool. Workers are not forked from
this process (they re-import the main module), so a script that uses them needs the usual
``if __name__ == "__main__":`` guard.

Faults: a worker process that dies (killed, segfault, ``os._exit``) raises a
:class:`WorkerError` (a ``RuntimeError``) naming its rank, pid and exit code as soon as the operating system reports
the death (the parent waits on the result pipes *and* the process sentinels, never blindly);
an exception inside a worker is sent back and re-raised in the parent with the worker's
traceback as its cause. Pools shut down on :meth:`ExpertPool.close`, on leaving a ``with``
block, when garbage collected and at interpreter exit, and reap their processes; a pool with a
dead worker is closed, and the next evaluation with ``workers=n`` starts a fresh one. Workers
exit by themselves when the parent process dies (their pipe reaches end-of-file).

.. note:: Cost per evaluation: the in-process cost divided among the workers (``O(E n^3 / w)``
   time per worker, ``O(E n^2 / w)`` memory per worker at ``chunk_size=None``), plus pickling
   the kernel and the hyperparameters (a few kilobytes) and one copy of ``y`` (``O(N)``) into
   shared memory. Creating a pool costs one process start per worker (importing torch and
   Pyro, a few seconds) and one ``O(N d)`` copy of ``X`` into shared memory. The distributed
   mode adds one ``all_reduce`` of ``1 + 1 + P`` numbers (``P`` the number of
   hyperparameter entries) per evaluation.

References:

[1] J. Ng, M. P. Deisenroth. Hierarchical Mixture-of-Experts Model for Large-Scale Gaussian
    Process Regression. arXiv:1412.3078, 2014.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from multiprocessing.connection import wait as _wait_ready

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from scalegp.partition import Experts, tree_leaves
from scalegp.processes import preloading_context

__all__ = [
    "ExpertPool",
    "WorkerError",
    "close_pools",
    "distributed_log_prob",
    "get_pool",
    "kernel_hyperparameters",
    "pool_log_prob",
    "tree_shards",
]

#: implicit pools kept alive between calls (least recently used beyond this are closed)
MAX_CACHED_POOLS = 2


# --------------------------------------------------------------------------------------------
# Kernel hyperparameters: read them in the parent, rebuild a plain kernel elsewhere
# --------------------------------------------------------------------------------------------


def _hyper_names(module: torch.nn.Module) -> list[str]:
    """Names of the hyperparameter attributes of one module (not of its submodules)."""
    d = module.__dict__
    guide_params = {
        f"{site}_{arg}" for site, (_, args) in d.get("_guides", {}).items() for arg in args
    }
    names = [n for n in d.get("_pyro_params", {}) if n not in guide_params]
    names += [n for n in d.get("_pyro_samples", {}) if n not in names]
    names += [
        n for n, p in d["_parameters"].items()
        if p is not None and not n.endswith("_unconstrained") and n not in guide_params
        and n not in names
    ]
    return names


def _hyper_sites(kernel: torch.nn.Module) -> list[tuple[str, str]]:
    return [(path, name) for path, mod in kernel.named_modules() for name in _hyper_names(mod)]


def kernel_hyperparameters(kernel: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The current values of a kernel's hyperparameters, by dotted name.

    ``PyroParam`` attributes give their constrained values (differentiable in the unconstrained
    parameters), ``PyroSample`` attributes one draw each (all read inside one ``PyroModule``
    context, so a sample site is drawn once even when read twice), plain ``nn.Parameter``
    attributes themselves.

    :param kernel: a ``torch.nn.Module`` kernel, e.g. ``pyro.contrib.gp.kernels.RBF``.
    :returns: ``{"lengthscale": tensor, "variance": tensor, ...}``; nested kernels give dotted
        names such as ``"kern0.lengthscale"``.
    """
    if not isinstance(kernel, torch.nn.Module):
        raise ValueError(f"kernel: expected a torch.nn.Module kernel, got {type(kernel).__name__}")
    context = kernel.__dict__.get("_pyro_context", None)
    values: OrderedDict[str, torch.Tensor] = OrderedDict()
    with context if context is not None else nullcontext():
        for path, name in _hyper_sites(kernel):
            value = getattr(kernel.get_submodule(path), name)
            values[f"{path}.{name}" if path else name] = torch.as_tensor(value)
    return values


def _strip(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose hyperparameter attributes are plain placeholders (``None``).

    The copy is built from shallow copies of the modules' dictionaries, never through
    ``delattr``, so Pyro's global param store is not touched; it holds no parameters, no
    ``PyroParam``/``PyroSample`` and a fresh Pyro context, so it pickles and runs anywhere.
    """
    names = _hyper_names(module)
    clone = module.__class__.__new__(module.__class__)
    state = dict(module.__dict__)
    state["_parameters"] = OrderedDict()
    state["_buffers"] = OrderedDict((k, None if b is None else b.detach()) for k, b in state["_buffers"].items())
    state["_modules"] = OrderedDict(
        (k, None if m is None else _strip(m)) for k, m in state["_modules"].items()
    )
    if "_pyro_params" in state:
        state["_pyro_params"] = OrderedDict()
        state["_pyro_samples"] = OrderedDict()
        context_type = type(state["_pyro_context"])
        state["_pyro_context"] = context_type()
    for name in names:
        state[name] = None
    clone.__dict__.update(state)
    return clone


def _bind(template: torch.nn.Module, sites: list[tuple[str, str]], values) -> torch.nn.Module:
    for (path, name), value in zip(sites, values):
        template.get_submodule(path).__dict__[name] = value
    return template


class _Spec:
    """What an evaluation needs besides the data: a stripped kernel and the input tensors
    (the kernel hyperparameters, then the noise, then the prior mean)."""

    def __init__(self, dist):
        from .kernels import bind

        bound = bind(dist.kernel)
        if bound.kind is not None:  # the four stationary kernels: values read at construction
            self.sites = [("", "variance"), ("", "lengthscale")]
            values = list(bound.params)
        else:  # generic kernels: PyroSample values replayed from the construction
            with bound._replay():
                values = list(kernel_hyperparameters(bound.kernel).values())
            self.sites = _hyper_sites(bound.kernel)
        self.template = _strip(bound.kernel)
        loc = getattr(dist, "loc", None)
        loc = torch.zeros((), dtype=dist.X.dtype) if loc is None else torch.as_tensor(loc)
        self.inputs = [torch.as_tensor(v) for v in values] + [torch.as_tensor(dist.noise), loc]
        self.jitter = float(dist.jitter)
        self.chunk_size = getattr(dist, "chunk_size", None)


def _check_data(dist, y) -> torch.Tensor:
    y = torch.as_tensor(y)
    X = torch.as_tensor(dist.X)
    N = X.shape[0]
    if y.shape != (N,):
        raise ValueError(
            f"y: workers/distributed evaluation takes one observation vector of shape ({N},) "
            f"(no batch dimensions), got {tuple(y.shape)}"
        )
    if torch.is_grad_enabled() and y.requires_grad:
        raise ValueError(
            "y: gradients with respect to the observations are not supported with workers or "
            "distributed=True; pass y.detach()"
        )
    if torch.is_grad_enabled() and X.requires_grad:
        raise ValueError(
            "X: gradients with respect to the inputs are not supported with workers or "
            "distributed=True; pass X.detach()"
        )
    return y.detach()


def _shard_value_and_grads(template, sites, values, requires, X, y, index, jitter, chunk_size):
    """Value of the experts ``index`` and its gradient w.r.t. the inputs flagged in ``requires``.

    ``values`` are the kernel hyperparameters (bound to ``sites`` of the stripped kernel
    ``template``), then the noise, then the prior mean. Runs in a worker process or in a
    ``torch.distributed`` rank.
    """
    from .hgp import expert_log_likelihood

    leaves = [v.detach().clone().requires_grad_(bool(r)) for v, r in zip(values, requires)]
    nk = len(sites)
    kernel = _bind(template, sites, leaves[:nk])
    noise, loc = leaves[nk], leaves[nk + 1]
    need_grad = any(requires)
    with torch.enable_grad() if need_grad else torch.no_grad():
        value = expert_log_likelihood(kernel, X, y, index, noise, loc, jitter=jitter, chunk_size=chunk_size)
    if not need_grad:
        return value.detach(), None
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    got = iter(torch.autograd.grad(value, wrt, allow_unused=True))
    grads = []
    for leaf in leaves:
        g = next(got) if leaf.requires_grad else None
        grads.append(torch.zeros_like(leaf) if g is None else g.detach())
    return value.detach(), grads


class _SummedLogProb(torch.autograd.Function):
    """Value ``evaluate(inputs)[0]``; backward multiplies the gradients computed with it
    (constants: no second derivatives)."""

    @staticmethod
    def forward(ctx, evaluate, *inputs):
        value, grads = evaluate(inputs)
        ctx.grads = grads
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (None,) + tuple(
            None if g is None else (grad_output * g).to(dtype=g.dtype) for g in ctx.grads
        )


def _apply(evaluate, inputs):
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    requires = [need_grad and t.requires_grad for t in inputs]
    return _SummedLogProb.apply(lambda xs: evaluate(xs, requires), *inputs)


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def _leaf_count(node) -> int:
    return 1 if isinstance(node, (int, np.integer)) else len(tree_leaves(node))


def tree_shards(experts: Experts, workers: int) -> list[np.ndarray]:
    """Expert numbers (rows of ``experts.index``) evaluated by each of ``workers`` workers.

    With a tree, the root's children are dealt to the workers as contiguous groups balanced by
    their number of leaves; when the root has fewer children than there are workers, the
    largest children are replaced by their own children until there are enough. Without a tree,
    contiguous balanced ranges of experts.

    :raises ValueError: when there are fewer experts than workers.
    """
    E = experts.num_experts
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if workers > E:
        raise ValueError(f"workers: {workers} worker processes for only {E} experts")
    tree = experts.tree
    if tree is None or isinstance(tree, (int, np.integer)):
        return [np.asarray(s, dtype=np.int64) for s in np.array_split(np.arange(E), workers)]
    nodes = list(tree)
    while len(nodes) < workers:
        splittable = [i for i, node in enumerate(nodes) if not isinstance(node, (int, np.integer))]
        i = max(splittable, key=lambda j: _leaf_count(nodes[j]))
        nodes[i:i + 1] = list(nodes[i])
    sizes = np.array([_leaf_count(node) for node in nodes])
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    cuts = [0]
    for k in range(1, workers):
        lo, hi = cuts[-1] + 1, len(nodes) - (workers - k)  # every group keeps at least one node
        target = prefix[-1] * k / workers
        cuts.append(lo + int(np.argmin(np.abs(prefix[lo:hi + 1] - target))))
    cuts.append(len(nodes))
    return [
        np.asarray([leaf for node in nodes[a:b] for leaf in tree_leaves(node)], dtype=np.int64)
        for a, b in zip(cuts[:-1], cuts[1:])
    ]


# --------------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker process of an :class:`ExpertPool` died or could not start."""


class _RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker (the re-raised exception's cause)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _worker_main(rank, conn, X, y, index, threads):
    """Entry point of a worker process: evaluate the shard ``index`` on request."""
    try:
        # Ctrl-C reaches the whole process group: only the parent handles it (it closes the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(int(threads))
        import pyro_scalegp.hgp  # noqa: F401  (fail at start-up rather than at the first call)

        conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    except BaseException as exc:  # report start-up failures instead of dying silently
        conn.send_bytes(pickle.dumps(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        return
    template = None
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the parent went away
            msg = ("close",)
        if msg[0] == "close":
            # nothing to flush or clean up (shared memory is released with the process): skip the
            # interpreter's slow teardown of torch so that the pool closes promptly
            conn.close()
            os._exit(0)
        _, call, template_bytes, sites, values, requires, jitter, chunk_size = msg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if template_bytes is not None:
                    template = pickle.loads(template_bytes)
                value, grads = _shard_value_and_grads(
                    template, sites, values, requires, X, y, index, jitter, chunk_size
                )
                reply = ("ok", call, value, grads)
            except BaseException as exc:
                try:
                    exc_bytes = pickle.dumps(exc)
                    pickle.loads(exc_bytes)
                except Exception:
                    exc_bytes = None
                reply = ("error", call, exc_bytes, traceback.format_exc())
        notes = []
        for w in caught:
            try:
                pickle.dumps(w.category)
                category = w.category
            except Exception:
                category = UserWarning
            notes.append((str(w.message), category))
        conn.send_bytes(pickle.dumps(reply + (notes,)))


def _describe_exit(code) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


def _shutdown(procs, conns, owner: int, grace: float = 5.0) -> None:
    if os.getpid() != owner:  # a forked copy of the parent must leave the workers alone
        return
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("close",)))
        except Exception:
            pass
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass


def _experts_digest(experts: Experts) -> str:
    h = hashlib.blake2b(np.ascontiguousarray(experts.index).tobytes(), digest_size=16)
    h.update(repr(experts.index.shape).encode())
    h.update(repr(experts.tree).encode())
    return h.hexdigest()


class ExpertPool:
    """``workers`` processes that evaluate shards of the HGP experts for one data set.

    Create it once and pass it as ``HGPMarginal(..., workers=pool)``; it serves every later
    evaluation with the same ``X`` and experts (any ``y``, kernel, noise and mean)::

        with ExpertPool(X, experts, 2) as pool:
            d = HGPMarginal(kernel, X, noise, experts=experts, workers=pool)
            loss = -d.log_prob(y); loss.backward()

    ``HGPMarginal(..., workers=2)`` creates and caches such a pool itself.

    :param X: training inputs ``(N, d)`` (CPU tensor); copied once into shared memory.
    :param experts: :class:`scalegp.Experts` (or an ``(E, n)`` index array / nested list).
    :param workers: number of processes ``w >= 1`` (at most the number of experts).
    :param threads: torch threads per worker; default ``max(1, cores // w)``.
    :param start_timeout: seconds to wait for the workers to start (import torch and Pyro).
    :raises WorkerError: when a worker dies or fails to start.

    .. note:: Creating the pool costs ``w`` process starts and an ``O(N d)`` copy of ``X``;
       each evaluation costs the experts' ``O(E n^3)`` work divided among the workers.
    """

    def __init__(self, X, experts, workers: int, *, threads: int | None = None, start_timeout: float = 300.0):
        X = torch.as_tensor(X)
        if X.ndim != 2:
            raise ValueError(f"X: expected shape (N, d), got {tuple(X.shape)}")
        if X.device.type != "cpu":
            raise ValueError(f"X: worker processes need a CPU tensor, got device {X.device}")
        if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        experts = Experts.from_any(experts)
        experts.check(X.shape[0])
        self.num_workers = int(workers)
        self.shards = tree_shards(experts, self.num_workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cores // self.num_workers) if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        self.experts = experts
        self._digest = _experts_digest(experts)
        self.X = X.detach().clone().share_memory_()
        self._y = torch.zeros(X.shape[0], dtype=X.dtype).share_memory_()
        self._lock = threading.Lock()
        self._call = 0
        self._sent_template: bytes | None = None
        self.closed = False
        self.last_shard_values: list[float] | None = None

        ctx = preloading_context("pyro_scalegp.hgp")
        self._procs, self._conns = [], []
        self.pids: list = []
        self._owner = os.getpid()
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._owner)
        try:
            for rank, shard in enumerate(self.shards):
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(rank, child_end, self.X, self._y, torch.from_numpy(experts.index[shard]), self.threads),
                    name=f"scalegp-hgp-worker-{rank}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)
            self.pids = [None] * self.num_workers
            for rank, msg in self._gather(range(self.num_workers), timeout=start_timeout):
                if msg[0] != "ready":
                    raise WorkerError(f"HGP worker {rank} failed to start:\n{msg[1]}")
                self.pids[rank] = msg[1]
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------

    def _dead(self, rank: int) -> WorkerError:
        proc = self._procs[rank]
        proc.join(1.0)
        starting = not self.pids or self.pids[rank] is None
        hint = (" while starting (workers re-import the main module: in a script, create the "
                "pool under `if __name__ == \"__main__\":`)") if starting else ""
        error = WorkerError(
            f"HGP worker {rank} (pid {proc.pid}) died{hint}: {_describe_exit(proc.exitcode)}; "
            f"the pool is closed"
        )
        self.close(grace=0.2)
        return error

    def _gather(self, ranks, timeout: float | None = None):
        """Yield ``(rank, message)`` for one message from each of ``ranks``; raise on a death."""
        pending = {self._conns[r]: r for r in ranks}
        sentinels = {self._procs[r].sentinel: r for r in ranks}
        deadline = None if timeout is None else _now() + timeout
        while pending:
            wait_for = None if deadline is None else max(0.0, deadline - _now())
            ready = _wait_ready(list(pending) + list(sentinels), timeout=wait_for)
            if not ready:
                late = sorted(pending.values())
                self.close(grace=0.2)
                raise WorkerError(f"HGP workers {late} did not answer within {timeout} s; the pool is closed")
            for obj in ready:  # results first: a worker may have answered and then exited
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        data = obj.recv_bytes()
                    except (EOFError, OSError):
                        raise self._dead(rank) from None
                    sentinels = {s: r for s, r in sentinels.items() if r != rank}
                    yield rank, pickle.loads(data)
            for obj in ready:
                if obj in sentinels:
                    raise self._dead(sentinels[obj])

    # -- public --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self._procs)

    def matches(self, X: torch.Tensor, experts: Experts) -> bool:
        """True when this pool serves the inputs ``X`` and ``experts`` (index and tree)."""
        return (
            tuple(X.shape) == tuple(self.X.shape) and X.dtype == self.X.dtype
            and _experts_digest(experts) == self._digest and torch.equal(X.detach(), self.X)
        )

    def evaluate(self, spec: _Spec, y: torch.Tensor, values, requires):
        """Summed value and gradients of all shards (see :func:`pool_log_prob`)."""
        with self._lock:
            if self.closed:
                raise WorkerError("ExpertPool: the pool is closed")
            try:
                template = pickle.dumps(spec.template)
            except Exception as exc:
                raise ValueError(
                    f"kernel: cannot be sent to the worker processes ({type(exc).__name__}: {exc}); its "
                    "class must be importable and its attributes picklable (no lambdas), or use workers=0"
                ) from exc
            self._y.copy_(y.detach())
            send_template = None if template == self._sent_template else template
            self._call += 1
            msg = pickle.dumps((
                "eval", self._call, send_template, spec.sites, [v.detach() for v in values],
                list(requires), spec.jitter, spec.chunk_size,
            ))
            try:
                for rank, conn in enumerate(self._conns):
                    try:
                        conn.send_bytes(msg)
                    except (BrokenPipeError, OSError):
                        raise self._dead(rank) from None
                self._sent_template = template
                replies = dict(self._gather(range(self.num_workers)))
            except WorkerError:
                raise
            except BaseException:  # interrupted while workers compute: the protocol is out of step
                self.close(grace=0.2)
                raise
        for rank in range(self.num_workers):
            for text, category in replies[rank][-1]:
                warnings.warn(f"[HGP worker {rank}] {text}", category, stacklevel=4)
        for rank in range(self.num_workers):
            reply = replies[rank]
            if reply[1] != self._call:
                self.close()
                raise WorkerError(f"HGP worker {rank} answered call {reply[1]}, expected {self._call}")
            if reply[0] == "error":
                remote = _RemoteTraceback(
                    f"\n\nTraceback in HGP worker {rank} (pid {self.pids[rank]}):\n{reply[3]}"
                )
                exc = pickle.loads(reply[2]) if reply[2] is not None else None
                if isinstance(exc, Exception):
                    exc.add_note(f"raised in HGP worker {rank} (pid {self.pids[rank]})")
                    raise exc from remote
                raise RuntimeError(f"HGP worker {rank} (pid {self.pids[rank]}) failed:\n{reply[3]}") from remote
        self.last_shard_values = [float(replies[r][2]) for r in range(self.num_workers)]
        value = sum(replies[r][2] for r in range(self.num_workers))
        if not any(requires):
            return value, None
        grads = [
            None if not req else sum(replies[r][3][i] for r in range(self.num_workers))
            for i, req in enumerate(requires)
        ]
        return value, grads

    def close(self, grace: float = 5.0) -> None:
        """Stop the workers (idempotent): ask them to exit, terminate those still running after
        ``grace`` seconds, and reap every process."""
        self.closed = True
        if self._finalizer.detach() is not None:
            _shutdown(self._procs, self._conns, self._owner, grace)

    def __enter__(self) -> "ExpertPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pids={self.pids}"
        return f"ExpertPool(workers={self.num_workers}, threads={self.threads}, {state})"


def _now() -> float:
    return time.monotonic()


_POOLS: "OrderedDict[tuple, ExpertPool]" = OrderedDict()
_POOLS_LOCK = threading.Lock()


def close_pools() -> None:
    """Close every pool that :func:`pool_log_prob` created and cached."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def _cached_pool(X: torch.Tensor, experts: Experts, workers: int) -> ExpertPool:
    key = (int(workers), tuple(X.shape), str(X.dtype), _experts_digest(experts))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.alive and torch.equal(X.detach(), pool.X):
            _POOLS.move_to_end(key)
            return pool
        if pool is not None:
            del _POOLS[key]
            pool.close()
        pool = ExpertPool(X, experts, workers)
        _POOLS[key] = pool
        while len(_POOLS) > MAX_CACHED_POOLS:
            _, old = _POOLS.popitem(last=False)
            old.close()
        return pool


def get_pool(dist) -> ExpertPool:
    """The :class:`ExpertPool` that evaluates ``dist.log_prob`` (``dist.workers``): the pool
    itself when one was given, else the cached pool for ``dist.X``, ``dist.experts`` and the
    number of workers, created (once) if needed."""
    workers = dist.workers
    X = torch.as_tensor(dist.X)
    experts = Experts.from_any(dist.experts)
    if isinstance(workers, ExpertPool):
        if not workers.matches(X, experts):
            raise ValueError("workers: this ExpertPool was built for different inputs X or experts")
        return workers
    if isinstance(workers, (int, np.integer)) and not isinstance(workers, bool) and workers >= 1:
        return _cached_pool(X, experts, int(workers))
    raise ValueError(f"workers: expected an integer >= 1 or an ExpertPool, got {workers!r}")


def pool_log_prob(dist, y) -> torch.Tensor:
    """``dist.log_prob(y)`` evaluated by worker processes (``dist.workers``).

    :param dist: an :class:`~pyro_scalegp.hgp.HGPMarginal` with ``workers`` an integer ``w >= 1``
        (a pool cached by the content of ``X``, the experts and ``w`` is created on first use
        and reused, see :func:`get_pool`) or an :class:`ExpertPool` built for the same ``X``
        and experts.
    :param y: observations ``(N,)``; not differentiated.
    :returns: a scalar tensor: the sum of the experts' log marginal likelihoods, whose backward
        pass gives the gradients with respect to the kernel hyperparameters, noise and mean.
    """
    y = _check_data(dist, y)
    pool = get_pool(dist)
    spec = _Spec(dist)
    y = y.to(dtype=pool.X.dtype)
    return _apply(lambda inputs, requires: pool.evaluate(spec, y, inputs, requires), spec.inputs)


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------


def distributed_log_prob(dist, y, *, group=None) -> torch.Tensor:
    """``dist.log_prob(y)`` summed over the ranks of ``torch.distributed``.

    Every rank passes its *local* data: ``dist.X``, ``y`` and ``dist.experts`` are the rank's
    own shard. The rank evaluates its experts' value and gradient, then one ``all_reduce``
    (SUM) of the flat buffer ``[value, flag, gradients...]`` gives every rank the global value
    and the global gradient; the backward pass returns ``grad_output`` times the global
    gradient, so the same optimizer step follows on every rank. All ranks must call it the
    same number of times, all with or all without gradients (``flag`` checks the latter).

    :param dist: an :class:`~pyro_scalegp.hgp.HGPMarginal` over the rank's local data.
    :param y: the rank's local observations ``(N_local,)``.
    :param group: the process group (default: the global one).
    :raises RuntimeError: when ``torch.distributed`` is not initialized or the ranks disagree
        about gradients.
    """
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group: launch with "
            "torchrun and call torch.distributed.init_process_group('gloo') first"
        )
    y = _check_data(dist, y)
    X = torch.as_tensor(dist.X)
    experts = Experts.from_any(dist.experts)
    experts.check(X.shape[0])
    spec = _Spec(dist)
    index = torch.from_numpy(experts.index)
    y = y.to(dtype=X.dtype)

    def evaluate(inputs, requires):
        value, grads = _shard_value_and_grads(
            spec.template, spec.sites, inputs, requires,
            X, y, index, spec.jitter, spec.chunk_size,
        )
        flat = [value.reshape(1).double(), torch.ones(1, dtype=torch.float64) * float(grads is not None)]
        if grads is not None:
            flat += [g.reshape(-1).double() for g in grads]
        else:
            flat += [torch.zeros(t.numel(), dtype=torch.float64) for t in inputs]
        buffer = torch.cat(flat)
        tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM, group=group)
        world = tdist.get_world_size(group)
        flag = int(round(buffer[1].item()))
        if flag not in (0, world):
            raise RuntimeError(
                f"distributed HGP: {flag} of {world} ranks asked for gradients; all ranks must "
                "evaluate log_prob with or all without gradients"
            )
        total = buffer[0].to(dtype=value.dtype)
        if grads is None:
            return total, None
        out, offset = [], 2
        for t, req in zip(inputs, requires):
            n = t.numel()
            out.append(buffer[offset:offset + n].reshape(t.shape).to(dtype=t.dtype) if req else None)
            offset += n
        return total, out

    return _apply(evaluate, spec.inputs)
