"""Hierarchical mixture of GP experts (Ng & Deisenroth, "Hierarchical Mixture-of-Experts
Model for Large-Scale Gaussian Process Regression", 2014) as a Pyro distribution.

Experts ``k = 1..E`` share the hyperparameters ``theta`` (kernel, noise, mean)
and hold index sets ``I_k`` (equal sizes ``n``; they may overlap). The
marginal likelihood is approximated by independent experts (paper eq. 5-6):

.. math::

    \\log p(y) \\approx \\sum_k \\log \\mathcal N(y_k \\mid m_k, K_k + \\sigma^2 I)
    = \\sum_k -\\tfrac12 r_k^\\top a_k - \\sum_i \\log L_{k,ii} - \\tfrac n2 \\log 2\\pi,

with ``r_k = y_k - m_k``, ``L_k L_k^T = K_k + sigma^2 I`` and ``a_k = L_k^{-T} L_k^{-1} r_k``.
Its gradient is formed analytically per expert [1, eq. 6]:

.. math::

    \\frac{\\partial \\log p}{\\partial (K_k + \\sigma^2 I)} = \\tfrac12 (a_k a_k^\\top - (K_k + \\sigma^2 I)^{-1}),
    \\qquad \\frac{\\partial \\log p}{\\partial r_k} = -a_k,

so the Cholesky factorization is never differentiated by autograd. For the
built-in stationary kernels the contraction with the kernel's derivatives is
analytic as well; for other kernels autograd differentiates the (cheap) kernel
construction only.

References:

[1] J. Ng, M. P. Deisenroth. Hierarchical Mixture-of-Experts Model for Large-Scale
    Gaussian Process Regression. arXiv:1412.3078, 2014.
[2] H. Liu, J. Cai, Y. Wang, Y.-S. Ong. Generalized Robust Bayesian Committee Machine
    for Large-Scale Gaussian Process Regression. ICML 2018.
"""
from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.autograd.function import once_differentiable
from torch.distributions import constraints
from tqdm.auto import tqdm

from scalegp.combine import COMBINE_RULES, combine as combine_predictions, tree_sum
from scalegp.domain import DomainError, JitterWarning
from scalegp.partition import Experts

from .kernels import (BoundKernel, bind, check_finite, check_kernel_inputs, check_positive_scalar, check_shape,
                      stationary_forward, stationary_vjp)
from .threads import flushing_subnormals, torch_threads

__all__ = [
    "HGPMarginal", "JitterWarning", "NotPositiveDefiniteError", "GaussianLogLikelihood",
    "gaussian_log_likelihood", "expert_log_likelihood",
]

_JITTER_STEPS = 6
_CHUNK_ELEMENTS = 1 << 21  # default expert chunk: about 2**21 kernel entries (16 MiB in float64)


class NotPositiveDefiniteError(DomainError):
    """An expert's ``K + noise I`` stayed non positive definite after raising the jitter (a
    :class:`scalegp.domain.DomainError`, so a ``ValueError``: Pyro's HMC and NUTS reject the step)."""


def _chunk(chunk_size: int | None, n: int, E: int | None = None) -> int:
    """Experts per chunk: ``chunk_size``, or about ``2**21 / n^2``, split further so that every
    intra-op thread gets a chunk of the ``E`` experts (:func:`map_chunks`)."""
    if chunk_size is not None:
        return int(chunk_size)
    step = max(1, _CHUNK_ELEMENTS // (n * n))
    return step if E is None else max(1, min(step, -(-E // torch.get_num_threads())))


def map_chunks(fn, E: int, step: int) -> list:
    """``[fn(start) for start in range(0, E, step)]``, run over expert chunks without autograd.

    With ``t = torch.get_num_threads() > 1`` and several chunks, the chunks run in ``t``
    Python threads with one intra-op thread each (restored afterwards): LAPACK's
    factorizations of matrices of a few hundred rows scale poorly over threads, whole chunks
    scale well. The results keep the chunks' order, so sums over them do not depend on timing.
    """
    starts = list(range(0, E, step))
    threads = torch.get_num_threads()

    def call(start):
        with torch.no_grad():
            return fn(start)

    if threads < 2 or len(starts) < 2:
        return [call(start) for start in starts]
    with torch_threads(1), ThreadPoolExecutor(min(threads, len(starts))) as pool:
        return list(pool.map(call, starts))


def _cholesky(Kn: torch.Tensor, jitter: float, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched Cholesky of ``Kn (E, n, n)`` (into ``out`` if given); experts whose
    factorization fails get ``jitter, 10 jitter, ...`` added to their diagonal (with a
    warning), and after :data:`_JITTER_STEPS` tries a :class:`NotPositiveDefiniteError`
    names them (``offset`` is added to the expert numbers in messages)."""
    if out is None:
        L, info = torch.linalg.cholesky_ex(Kn)
    else:
        L, info = torch.linalg.cholesky_ex(Kn, out=(out, torch.empty(Kn.shape[:-2], dtype=torch.int32)))
    todo = torch.nonzero(info).flatten()
    if todo.numel() == 0:
        return L
    if not bool(torch.isfinite(Kn[todo]).all()):
        raise ValueError(
            f"kernel: the kernel matrices of experts {(todo + offset).tolist()[:10]} contain NaN or inf; "
            "check the kernel hyperparameters and noise"
        )
    eye = torch.eye(Kn.shape[-1], dtype=Kn.dtype, device=Kn.device)
    amount, fixed = float(jitter), []
    for _ in range(_JITTER_STEPS):
        Lt, it = torch.linalg.cholesky_ex(Kn[todo] + amount * eye)
        ok = it == 0
        L[todo[ok]] = Lt[ok]
        fixed.extend((todo[ok] + offset).tolist())
        todo = todo[~ok]
        if todo.numel() == 0:
            warnings.warn(
                f"HGPMarginal: K + noise I of experts {fixed[:10]}{'...' if len(fixed) > 10 else ''} "
                f"was not positive definite in {Kn.dtype}; added jitter up to {amount:.1e} to its diagonal",
                JitterWarning, stacklevel=3,
            )
            return L
        amount *= 10
    raise NotPositiveDefiniteError(
        f"HGPMarginal: K + noise I of experts {(todo + offset).tolist()[:10]} is not positive definite "
        f"even with jitter {amount / 10:.1e} added to the diagonal ({Kn.dtype}). Try a larger noise "
        "(or a lower bound on it), removing duplicated inputs, float64, or a larger `jitter`."
    )


def _inverse_from_cholesky(L: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(L L^T)^{-1}`` for a batch of Cholesky factors (into ``out`` if given). On one CPU
    thread LAPACK's ``potri`` (``torch.cholesky_inverse``) is about twice as fast as two
    triangular solves against the identity; with several threads the solves, which MKL
    parallelizes well, are faster."""
    if L.device.type == "cpu" and torch.get_num_threads() > 1:
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        return torch.cholesky_solve(eye, L, out=out)
    return torch.cholesky_inverse(L, out=out)


class Workspace:
    """Buffers reused by the chunks that one thread evaluates in turn. Fresh multi-megabyte
    tensors come from ``mmap`` and pay a page fault per 4 KiB page on first touch (about a
    fifth of an expert chunk's time at ``n = 512``); reusing them across chunks avoids it.
    One instance serves one call (e.g. one evaluation) and is shared by its threads."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized ``shape`` tensor (dtype and device of ``like``), private to the
        calling thread, the same memory at each call with this name."""
        key = (threading.get_ident(), name)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0] or buf.dtype != like.dtype:
            buf = self._buffers[key] = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
        return buf[:shape[0]]


def _check_value(value: torch.Tensor, offset: int) -> torch.Tensor:
    bad = torch.nonzero(~torch.isfinite(value).all(-1)).flatten()
    if bad.numel():  # LAPACK factorizes NaN matrices without complaint
        raise ValueError(f"kernel: the log likelihood of experts {(bad + offset).tolist()[:10]} is not finite; "
                         "check the kernel hyperparameters, noise and inputs for NaN or inf")
    return value


class GaussianLogLikelihood(torch.autograd.Function):
    """Batched ``log N(r_k | 0, Kn_k)`` with the analytic gradient.

    ``forward(Kn, r, jitter, offset)``: ``Kn (E, n, n)``, ``r (E, n, B)``
    (``B`` right-hand sides); returns ``(E, B)``. The backward pass never
    differentiates the Cholesky factorization:

    .. math::

        \\bar K_k = \\tfrac12 \\Big(\\sum_b g_{kb} a_{kb} a_{kb}^\\top - \\sum_b g_{kb} K_k^{-1}\\Big),
        \\qquad \\bar r_{kb} = -g_{kb} a_{kb}.

    .. note:: Cost: forward ``O(E n^3 / 3)`` (Cholesky) plus ``O(E n^2 B)``;
       backward ``O(E n^3)`` (``K^-1`` by ``cholesky_solve``); ``E n^2`` saved entries.
    """

    @staticmethod
    def forward(ctx, Kn, r, jitter, offset):
        L = _cholesky(Kn, jitter, offset)
        a = torch.cholesky_solve(r, L)
        n = Kn.shape[-1]
        logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)
        value = _check_value(-0.5 * (r * a).sum(-2) - logdet - 0.5 * n * math.log(2 * math.pi), offset)
        ctx.save_for_backward(L, a)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        L, a = ctx.saved_tensors
        grad_K = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_K = _inverse_from_cholesky(L)
            if a.shape[-1] == 1:  # one right-hand side: a fused rank-one update
                grad_K.addcmul_(a, a.transpose(-1, -2), value=-1.0).mul_(-0.5 * g[:, :, None])
            else:
                grad_K.mul_(-0.5 * g.sum(-1)[:, None, None])
                grad_K.baddbmm_(a * g[:, None, :], a.transpose(-1, -2), alpha=0.5)
        if ctx.needs_input_grad[1]:
            grad_r = -a * g[:, None, :]
        return grad_K, grad_r, None, None


def gaussian_log_likelihood(Kn: torch.Tensor, r: torch.Tensor, *, jitter: float = 1e-6) -> torch.Tensor:
    """``log N(r_k | 0, Kn_k)`` for a batch of experts, through :class:`GaussianLogLikelihood`.

    :param Kn: ``(E, n, n)`` covariances ``K_k + noise I``.
    :param r: residuals ``(E, n)`` or ``(E, n, B)``.
    :returns: ``(E,)`` or ``(E, B)``.
    """
    check_shape("Kn", Kn, (None, None, Kn.shape[-2]))
    if r.shape[:2] != Kn.shape[:2] or r.dim() not in (2, 3):
        raise ValueError(f"r: expected shape {tuple(Kn.shape[:2])} (+ (B,)), got {tuple(r.shape)}")
    out = GaussianLogLikelihood.apply(Kn, r if r.dim() == 3 else r[..., None], float(jitter), 0)
    return out if r.dim() == 3 else out[..., 0]


def _chunk_values(bound: BoundKernel, params, X, y, loc, noise, idx, jitter, offset):
    """Per-expert log likelihoods ``(Ec, B)`` of the experts ``idx (Ec, n)``; ``y`` is ``(B, N)``."""
    K = bound.gram(X[idx], params if bound.kind is not None else None)
    if bound.kind is not None:  # a fresh tensor from our own formulas: safe to update in place
        K.diagonal(dim1=-2, dim2=-1).add_(noise)
    else:
        K = K + noise * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    resid = y[:, idx] - (loc if loc.dim() == 0 else loc[idx])  # (B, Ec, n)
    return GaussianLogLikelihood.apply(K, resid.permute(1, 2, 0), jitter, offset)


def _chunk_value_and_grads(bound: BoundKernel, inputs, needs, idx, jitter, offset, space: Workspace):
    """One target vector, a fast kernel: the experts ``idx``' log likelihoods ``(Ec, 1)`` and
    their summed gradients with respect to ``inputs = (X, y (1, N), loc, noise, variance,
    lengthscale)`` (``None`` where not needed), formed analytically without autograd:
    ``G = 1/2 (a a^T - Kn^-1)`` contracted with the kernel's derivatives."""
    X, y, loc, noise, variance, lengthscale = inputs
    Xa = bound._slice(X[idx])
    square = idx.shape + idx.shape[-1:]
    K, aux = stationary_forward(bound.kind, variance, lengthscale, Xa, out=space.get("K", square, Xa),
                               scratch=lambda name: space.get(name, square, Xa))
    K.diagonal(dim1=-2, dim2=-1).add_(noise)
    resid = (y[0, idx] - (loc if loc.dim() == 0 else loc[idx]))[..., None]
    # LAPACK writes column-major matrices: transposed views of row-major buffers avoid a copy;
    # K^-1 is symmetric, so its transposed view is K^-1 again, laid out like K
    L = _cholesky(K, jitter, offset, out=space.get("L", square, K).mT)
    kernel_grads = needs[0] or needs[3] or needs[4] or needs[5]
    # with K^-1 needed anyway, a = K^-1 r is one pass over it instead of two triangular solves
    Kinv = _inverse_from_cholesky(L, out=space.get("Kinv", square, K).mT).mT if kernel_grads else None
    a = torch.bmm(Kinv, resid) if kernel_grads else torch.cholesky_solve(resid, L)
    n = K.shape[-1]
    value = _check_value(-0.5 * (resid * a).sum(-2) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)
                         - 0.5 * n * math.log(2 * math.pi), offset)
    del L
    grads = [None] * 6
    flat = idx.reshape(-1)
    if needs[1]:
        grads[1] = torch.zeros_like(y).index_add_(1, flat, -a.reshape(1, -1))
    if needs[2]:
        grads[2] = a.sum() if loc.dim() == 0 else torch.zeros_like(loc).index_add_(0, flat, a.reshape(-1))
    if kernel_grads:
        G = Kinv.baddbmm_(a, a.transpose(-1, -2), beta=-0.5, alpha=0.5)
        trace = G.diagonal(dim1=-2, dim2=-1).sum()
        if needs[3]:
            grads[3] = trace.reshape(noise.shape)
        K.diagonal(dim1=-2, dim2=-1).sub_(noise)
        g_var, g_ls, g_Xa = stationary_vjp(bound.kind, variance, lengthscale, K, aux, G)
        grads[4], grads[5] = g_var, g_ls
        if needs[0]:
            g_X = torch.zeros(idx.shape + X.shape[-1:], dtype=X.dtype, device=X.device)
            g_X[..., bound.active_dims] = g_Xa
            grads[0] = torch.zeros_like(X).index_add_(0, flat, g_X.reshape(-1, X.shape[-1]))
    return value, [g if nd else None for g, nd in zip(grads, needs)]


class _EagerSum(torch.autograd.Function):
    """Sum of expert terms whose gradient ``evaluate`` accumulates chunk by chunk during
    the forward pass, so that only one chunk's buffers are ever alive (bounded memory);
    the backward pass only scales the stored gradients."""

    @staticmethod
    def forward(ctx, evaluate, needs, *inputs):
        value, grads = evaluate(inputs, needs)
        ctx.mask = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        grad_value = grad_value.sum()  # one target vector: value has shape (1,)
        saved = iter(ctx.saved_tensors)
        return (None, None, *[grad_value * next(saved) if m else None for m in ctx.mask])


def expert_log_likelihood(kernel, X, y, index, noise, mean=None, *, jitter: float = 1e-6,
                          chunk_size: int | None = None, tree=None) -> torch.Tensor:
    """Sum over the rows of ``index`` of the experts' exact log marginal likelihoods.

    :param kernel: a Pyro kernel or :class:`~pyro_scalegp.kernels.BoundKernel`.
    :param X: ``(N, d)`` inputs.
    :param y: ``(N,)`` targets, or ``(..., N)`` for several target vectors.
    :param index: ``(E, n)`` integer array or tensor of expert rows.
    :param noise: positive scalar tensor (Gaussian noise variance).
    :param mean: ``None``, or a tensor broadcastable to ``(N,)``.
    :param jitter: first jitter tried for an expert whose Cholesky fails.
    :param chunk_size: experts per batched Cholesky (default about ``2**21 / n^2``).
    :param tree: optional expert tree (:attr:`scalegp.Experts.tree`); the sum is
        accumulated node by node.
    :returns: tensor of shape ``y.shape[:-1]`` (a scalar for one target vector).

    With the four built-in stationary kernels and one target vector the gradient
    with respect to ``X, y, mean, noise`` and the kernel hyperparameters is formed
    analytically (``G = 1/2 (a a^T - Kn^-1)`` contracted with the kernel's
    derivatives, no autograd) and accumulated chunk by chunk during the forward
    pass, so memory stays at one chunk's worth whatever ``E``. Otherwise each
    chunk goes through :class:`GaussianLogLikelihood` and autograd differentiates
    the kernel construction, keeping every chunk's graph until ``backward``.

    .. note:: Cost: ``O(E n^3)`` time; ``O(chunk n^2)`` memory on the chunked
       gradient path, ``O(E n^2)`` otherwise.
    """
    bound = bind(kernel)
    index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index,
                            dtype=torch.long, device=X.device)
    noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
    loc = torch.zeros((), dtype=X.dtype, device=X.device) if mean is None else torch.as_tensor(mean, dtype=X.dtype)
    if loc.numel() > 1:
        loc = loc.expand(X.shape[0])
    loc = loc.reshape(()) if loc.numel() == 1 else loc
    batch = y.shape[:-1]
    y2 = y.reshape(-1, y.shape[-1])
    E, n = index.shape
    jitter = float(jitter)

    def evaluate(inputs, needs):
        X_, y_, loc_, noise_, *params = inputs
        if not any(needs):  # autograd records each chunk's graph: stay in this thread
            step = _chunk(chunk_size, n)
            values = [_chunk_values(bound, params, X_, y_, loc_, noise_, index[start:start + step], jitter, start)
                      for start in range(0, E, step)]
            return tree_sum(torch.cat(values), tree), [None] * len(inputs)
        step, space = _chunk(chunk_size, n, E), Workspace()
        chunks = map_chunks(lambda start: _chunk_value_and_grads(bound, inputs, needs, index[start:start + step],
                                                                 jitter, start, space), E, step)
        grads = [None if parts[0] is None else sum(parts[1:], parts[0]) for parts in zip(*(c[1] for c in chunks))]
        return tree_sum(torch.cat([c[0] for c in chunks]), tree), grads

    inputs = (X, y2, loc, noise, *bound.params)
    needs = [torch.is_grad_enabled() and torch.is_tensor(t) and t.requires_grad for t in inputs]
    with flushing_subnormals():  # the chunks' threads, started here, inherit the mode
        if bound.kind is not None and y2.shape[0] == 1 and any(needs):
            value = _EagerSum.apply(evaluate, needs, *inputs)
        else:
            value = evaluate(inputs, [False] * len(inputs))[0]
    return value.reshape(batch)


class HGPMarginal(TorchDistribution):
    """The HGP's approximate marginal distribution of the targets ``y`` (paper [1], eq. 5).

    ``log_prob(y)`` is the sum of the experts' exact log marginal likelihoods,
    differentiable in every kernel hyperparameter, the noise and the mean;
    use it as ``pyro.sample("y", HGPMarginal(kernel, X, noise, experts=...), obs=y)``
    under ``SVI``, ``NUTS`` or ``MCMC``.

    :param kernel: a ``pyro.contrib.gp.kernels`` kernel (RBF, Matern32, Matern52,
        Exponential take a batched fast path; any kernel with
        ``forward(X, Z, diag)`` works). Its hyperparameters are read once, here
        (:class:`~pyro_scalegp.kernels.BoundKernel`), so construct the
        distribution inside the model.
    :param X: ``(N, d)`` or ``(N,)`` training inputs.
    :param noise: positive scalar, the Gaussian noise variance.
    :param experts: anything :meth:`scalegp.Experts.from_any` accepts: an
        :class:`~scalegp.Experts` (e.g. from :func:`scalegp.partition`), an
        ``(E, n)`` integer array, or a nested list of index arrays (a tree).
        With a communication expert the sum runs over the augmented experts.
    :param mean: ``None`` (zero) or a tensor broadcastable to ``(N,)``.
    :param jitter: first jitter tried on an expert whose Cholesky fails; it is
        raised tenfold up to 5 times with a warning, then
        :class:`NotPositiveDefiniteError` is raised.
    :param workers: ``n > 0`` (or a :class:`pyro_scalegp.parallel.ExpertPool`)
        evaluates expert shards in worker processes
        (:func:`pyro_scalegp.parallel.pool_log_prob`).
    :param distributed: evaluate this rank's experts and all-reduce
        (:func:`pyro_scalegp.parallel.distributed_log_prob`).
    :param chunk_size: experts per batched Cholesky (default about ``2**21 / n^2``).

    Attributes read by :mod:`pyro_scalegp.parallel`: ``kernel`` (the
    :class:`~pyro_scalegp.kernels.BoundKernel`), ``X`` ``(N, d)``, ``noise``,
    ``mean`` (the prior mean broadcast to ``(N,)``; ``loc`` holds it unbroadcast),
    ``experts`` (:class:`~scalegp.Experts`), ``jitter``, ``chunk_size``, ``workers``.

    ``sample()`` is defined only for disjoint experts covering every point (the
    block-independent model); for predictions use :meth:`predict`, which also
    serves posterior predictive checks in place of ``Predictive`` on the
    observed site.

    .. note:: Cost: ``log_prob`` takes ``O(E n^3)`` time (``E`` Cholesky
       factorizations and inverses of ``n x n``) and ``O(chunk_size n^2)``
       memory with the built-in kernels; :meth:`predict` takes
       ``O(E n^3 + E n T d)`` time and ``O(E T)`` memory for ``T`` test points.
    """

    arg_constraints = {"noise": constraints.positive, "loc": constraints.real}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, kernel, X, noise, *, experts, mean=None, jitter: float = 1e-6, workers: int = 0,
                 distributed: bool = False, chunk_size: int | None = None, validate_args=None):
        if not torch.is_tensor(X):
            raise ValueError(f"X: expected a torch.Tensor, got {type(X).__name__}")
        if X.dim() == 1:
            X = X.unsqueeze(-1)
        if X.dim() != 2 or X.shape[0] < 1:
            raise ValueError(f"X: expected shape (N, d) or (N,), got {tuple(X.shape)}")
        check_finite("X", X)
        N = X.shape[0]
        noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
        check_positive_scalar("noise", noise)
        loc = torch.zeros((), dtype=X.dtype, device=X.device) if mean is None else torch.as_tensor(
            mean, dtype=X.dtype, device=X.device)
        if loc.dim() > 1 or (loc.dim() == 1 and loc.shape[0] not in (1, N)):
            raise ValueError(f"mean: expected a scalar or shape ({N},), got {tuple(loc.shape)}")
        check_finite("mean", loc)
        experts = Experts.from_any(experts)
        experts.check(N)
        if not float(jitter) > 0:
            raise ValueError(f"jitter: must be positive, got {jitter}")
        if isinstance(workers, (int, np.integer)) and not isinstance(workers, bool):
            if workers < 0:
                raise ValueError(f"workers: must be >= 0, got {workers}")
            workers = int(workers)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
        self.kernel = bind(kernel)
        for value in self.kernel.params:
            check_finite("kernel", torch.as_tensor(value), DomainError)
        check_kernel_inputs(kernel, X.shape[1])
        self.X = X
        self.noise = noise.reshape(())
        self.loc = loc.reshape(()) if loc.numel() == 1 else loc
        self.experts = experts
        self.jitter = float(jitter)
        self.workers = workers
        self.distributed = bool(distributed)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        super().__init__(torch.Size(), torch.Size((N,)), validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        """The prior mean broadcast to ``batch_shape + (N,)`` (also the mean of ``y``)."""
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        """Marginal variances ``k(x_i, x_i) + noise`` of ``y``."""
        return (self.kernel.diag(self.X) + self.noise).expand(self.batch_shape + self.event_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HGPMarginal, _instance)
        for name in ("kernel", "X", "noise", "loc", "experts", "jitter", "workers", "distributed", "chunk_size"):
            setattr(new, name, getattr(self, name))
        super(HGPMarginal, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _check_y(self, y, name="y") -> torch.Tensor:
        if not torch.is_tensor(y):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(y).__name__}")
        if y.dim() < 1 or y.shape[-1] != self.X.shape[0]:
            raise ValueError(f"{name}: expected shape (..., {self.X.shape[0]}), got {tuple(y.shape)}")
        check_finite(name, y)
        return y.to(self.X)  # the dtype and device of X: numpy's float64 targets beside float32 inputs

    def log_prob(self, value):
        """Sum of the experts' exact log marginal likelihoods of ``value`` (``y``)."""
        y = self._check_y(value)
        if self._validate_args:
            self._validate_sample(y)
        shape = torch.broadcast_shapes(y.shape[:-1], self.batch_shape)
        y = y.expand(shape + self.event_shape)
        if not (isinstance(self.workers, int) and self.workers == 0):
            from . import parallel
            return parallel.pool_log_prob(self, y)
        if self.distributed:
            from . import parallel
            return parallel.distributed_log_prob(self, y)
        return expert_log_likelihood(self.kernel, self.X, y, self.experts.index, self.noise, self.loc,
                                     jitter=self.jitter, chunk_size=self.chunk_size, tree=self.experts.tree)

    def sample(self, sample_shape=torch.Size()):
        """Draw from the block-independent model; only defined for disjoint experts
        covering every point (otherwise ``NotImplementedError``)."""
        N = self.X.shape[0]
        counts = np.bincount(self.experts.index.ravel(), minlength=N)
        if self.experts.communication is not None or not (counts == 1).all():
            raise NotImplementedError(
                "HGPMarginal.sample: the experts overlap or miss points, so the product of experts is not "
                "a distribution one can draw from; use HGPMarginal.predict for predictions"
            )
        shape = self._extended_shape(sample_shape)
        out = torch.empty(shape, dtype=self.X.dtype, device=self.X.device)
        flat = out.reshape(-1, N)
        index = torch.as_tensor(self.experts.index, device=self.X.device)
        step = _chunk(self.chunk_size, index.shape[1])
        with torch.no_grad():
            for start in range(0, index.shape[0], step):
                idx = index[start:start + step]
                K = self.kernel.gram(self.X[idx])
                K.diagonal(dim1=-2, dim2=-1).add_(self.noise)
                L = _cholesky(K, self.jitter, start)
                eps = torch.randn(idx.shape + (flat.shape[0],), dtype=out.dtype, device=out.device)
                draw = (L @ eps).permute(2, 0, 1) + (self.loc if self.loc.dim() == 0 else self.loc[idx])
                flat[:, idx] = draw
        return out

    def _expert_predictions(self, y, index, X_new, prior_mean, test_chunk, bar):
        """Latent means and variances ``(E, T)`` of the experts ``index (E, n)`` at ``X_new``;
        chunks of experts run over threads (:func:`map_chunks`), each ticking ``bar`` once done."""
        E, n = index.shape
        T = X_new.shape[0]
        means = torch.empty(E, T, dtype=self.X.dtype, device=self.X.device)
        variances = torch.empty_like(means)
        kss = self.kernel.diag(X_new)
        step = _chunk(self.chunk_size, n, E)

        def experts(start):  # fills rows start:start + step
            idx = index[start:start + step]
            Xc = self.X[idx]
            K = self.kernel.gram(Xc)
            K.diagonal(dim1=-2, dim2=-1).add_(self.noise)
            L = _cholesky(K, self.jitter, start)
            resid = y[idx] - (self.loc if self.loc.dim() == 0 else self.loc[idx])
            alpha = torch.cholesky_solve(resid[..., None], L)
            for t in range(0, T, test_chunk):
                Ks = self.kernel.cross(Xc, X_new[t:t + test_chunk])
                means[start:start + step, t:t + test_chunk] = prior_mean[t:t + test_chunk] + (
                    torch.bmm(alpha.transpose(-1, -2), Ks)[:, 0])
                V = torch.linalg.solve_triangular(L, Ks, upper=False)
                variances[start:start + step, t:t + test_chunk] = kss[t:t + test_chunk] - V.mul_(V).sum(-2)
            bar.update(idx.shape[0])

        map_chunks(experts, E, step)
        return means, variances.clamp_min(torch.finfo(variances.dtype).tiny)

    def predict(self, y, X_new, *, combine: str = "rbcm", noiseless: bool = False, mean_new=None,
                progress_bar: bool = False):
        """Predictive distribution at ``X_new`` from the experts conditioned on ``y``.

        Each expert ``k`` predicts the latent ``f(x*)`` exactly from its own data
        (mean ``m_k``, variance ``v_k``); the predictions are combined over the
        expert tree by ``combine`` (:func:`scalegp.combine.combine`):
        ``"poe"``, ``"gpoe"``, ``"bcm"``, ``"rbcm"`` (paper [1] section 3.3) or
        ``"grbcm"`` [2] (needs ``experts.communication``; the prior is then the
        communication expert's prediction). The noise variance is added after
        combining unless ``noiseless``.

        :param y: ``(N,)`` training targets.
        :param X_new: ``(T, d)`` or ``(T,)`` test inputs.
        :param mean_new: prior mean at ``X_new``; required when ``mean`` is a
            per-point vector, else the scalar mean is used.
        :param progress_bar: show a progress bar over the experts (for many test points).
        :returns: ``pyro.distributions.Normal(mean, scale).to_event(1)`` over ``(T,)``.
            Computed without gradients.

        .. note:: Cost: ``O(E n^3 + E n^2 T)`` time; ``O(E T)`` memory plus one
           ``(chunk, n, T_c)`` block of cross-covariances.
        """
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine: unknown rule {combine!r}; use one of {COMBINE_RULES}")
        if combine == "grbcm" and self.experts.communication is None:
            raise ValueError("combine: 'grbcm' needs a communication expert, e.g. "
                             "scalegp.partition(..., communication=True)")
        y = self._check_y(y)
        check_shape("y", y, (self.X.shape[0],))
        if not torch.is_tensor(X_new):
            raise ValueError(f"X_new: expected a torch.Tensor, got {type(X_new).__name__}")
        X_new = X_new.unsqueeze(-1) if X_new.dim() == 1 else X_new
        check_shape("X_new", X_new, (None, self.X.shape[1]))
        check_finite("X_new", X_new)
        X_new = X_new.to(self.X)
        T = X_new.shape[0]
        if mean_new is None:
            if self.loc.dim() != 0:
                raise ValueError("mean_new: the prior mean is a per-point vector; give its values at X_new")
            mean_new = self.loc
        mean_new = torch.as_tensor(mean_new, dtype=self.X.dtype, device=self.X.device)
        check_finite("mean_new", mean_new)
        try:
            prior_mean = mean_new.expand(T)
        except RuntimeError:
            raise ValueError(f"mean_new: expected a scalar or shape ({T},), got {tuple(mean_new.shape)}") from None
        n = self.experts.expert_size
        test_chunk = max(1, _CHUNK_ELEMENTS // (n * _chunk(self.chunk_size, n, self.experts.index.shape[0])))
        index = torch.as_tensor(self.experts.index, device=self.X.device)
        experts = index.shape[0] + (combine == "grbcm")
        with torch.no_grad(), flushing_subnormals(), \
                tqdm(total=experts, desc="HGP predict", unit="expert", disable=not progress_bar) as bar:
            y = y.detach()
            means, variances = self._expert_predictions(y, index, X_new, prior_mean, test_chunk, bar)
            if combine == "grbcm":
                comm = torch.as_tensor(self.experts.communication, device=self.X.device)[None]
                prior_mean, prior_var = (v[0] for v in self._expert_predictions(y, comm, X_new, prior_mean,
                                                                                 test_chunk, bar))
            else:
                prior_var = self.kernel.diag(X_new)
            mean, var = combine_predictions(torch, combine, means, variances, prior_mean, prior_var,
                                            tree=self.experts.tree)
            if not noiseless:
                var = var + self.noise
            return dist.Normal(mean, var.sqrt()).to_event(1)
