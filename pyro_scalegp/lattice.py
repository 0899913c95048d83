r"""Simplex-GP kernel operator on the permutohedral lattice, for torch / Pyro (paper 002 [1]).

:class:`LatticeKernelOperator` is the kernel matrix of a stationary ``pyro.contrib.gp`` kernel
(RBF, Exponential = Matern 1/2, Matern32, Matern52) as a :class:`linear_operator.LinearOperator`:

.. math::

    K \approx \sigma^2 D^{-1/2} W^\top C^\top C W D^{-1/2},

exactly symmetric and positive semi-definite, with diagonal :math:`\sigma^2` (exactly where the
exact calibration is the cheaper, small lattices; else up to the probe estimate's error of a few
percent; see :mod:`scalegp.lattice`). The lattice is built once per ``(X, lengthscale)`` by the CPU build of
``kernels_cuda`` (or its CUDA twin for CUDA tensors) and reused by every product, every column and
the backward pass. Gradients with respect to the vector, ``X``, the lengthscales and the variance
are the exact derivatives of this forward map on the fixed lattice: the barycentric weights are
recomputed differentiably in torch (linear in the elevated inputs within a simplex), and the filter's
backward is

.. math::

    \frac{\partial\, g^\top W^\top B W u}{\partial w_{ik}} = g_i^\top (B W u)_{a_{ik}} + u_i^\top (B W g)_{a_{ik}},
    \qquad \frac{\partial}{\partial u} = W^\top B W g .

References: [1] Kapoor, Finzi, Wang, Wilson, ICML 2021.

.. note:: Cost: building ``O(N d^2 + M d r)`` plus the diagonal calibration, ``O(U d^2)`` for the
   ``P`` distinct vertex pairs of the ``U`` distinct simplices, then ``O(M^2 d r)`` exact or
   ``O(S (M d r + P))`` with ``S = 256`` probes (see :mod:`scalegp.lattice`); each product
   ``O((N d + M d r) c)`` for ``c`` columns; memory ``O(N d + U d^2 + M d r + M c)``.
"""
from __future__ import annotations

import functools

import contextlib
import math

import numpy as np
import pyro.distributions as dist
import torch
from linear_operator import LinearOperator, settings
from pyro.contrib.gp import kernels as gp_kernels
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from tqdm.auto import tqdm

from kernels_cuda.dispatch import array_module, build_lattice, memory_limit
from kernels_cuda.gpu import external_stream
from scalegp import lattice as sl
from scalegp.krylov import check_solver_options, warn_unconverged
from scalegp.neighbors import check_neighbors, neighbor_variances

from .kernels import check_finite, check_kernel_inputs, check_positive_scalar

__all__ = ["LatticeKernelOperator", "SimplexGPMarginal", "kernel_name"]

_NAMES = ((gp_kernels.RBF, "rbf"), (gp_kernels.Exponential, "exponential"), (gp_kernels.Matern32, "matern32"),
          (gp_kernels.Matern52, "matern52"))


def kernel_name(kernel) -> str:
    """The lattice name of a supported ``pyro.contrib.gp`` kernel; ``ValueError`` otherwise."""
    for cls, name in _NAMES:
        if isinstance(kernel, cls):
            return name
    raise ValueError(
        f"kernel: {type(kernel).__name__} is not supported by the lattice; use RBF, Exponential, Matern32 or Matern52"
    )


def _to_backend(t: torch.Tensor, backend: str):
    if backend == "cuda":
        return array_module("cuda").from_dlpack(t.detach().contiguous())
    return t.detach().cpu().contiguous().numpy()


def _on_torch_stream(backend: str, device):
    """For the CUDA build, torch's current stream on ``device`` as CuPy's current stream, so that the
    lattice's launches run in order with torch's own work on it; nothing for the CPU build."""
    if backend != "cuda":
        return contextlib.nullcontext()
    return external_stream(torch.cuda.current_stream(device).cuda_stream)


def _from_backend(a, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a).to(like.device)
    return torch.from_dlpack(a)


class _Lattice:
    """The lattice of one ``(X, lengthscale)`` (already validated) plus the constants of the differentiable
    weights, converted to torch on their first use: products without a gradient in the weights need none."""

    def __init__(self, X: torch.Tensor, lengthscale: torch.Tensor, name: str, order: int, backend: str):
        n, d = X.shape
        limit, where = memory_limit(backend)
        sl.check_memory(n, d, order, 1, X.element_size(), limit=limit, where=where)
        self.st = sl.stencil(name, order)
        self.backend = backend
        scale = sl.elevation_scale(d, self.st)
        self.proj = torch.as_tensor(sl.elevation_matrix(d) * scale[None, :], dtype=X.dtype, device=X.device)
        z = _to_backend(X.detach() / lengthscale.detach(), backend)
        self.device, self.dtype = X.device, X.dtype
        with _on_torch_stream(backend, self.device):
            self.impl = build_lattice(z, scale.astype(z.dtype), order, backend=backend)
            self.coef = np.asarray(self.st.coef, dtype=self.impl.dtype)
            self.calibration = self.impl.calibrate(self.coef)
            # the weights and the calibration at the build's (X, lengthscale), for products that need no gradient
            self.w0 = _from_backend(self.impl.bary, X)
            self.s0 = _from_backend(self.calibration.diagonal(), X).rsqrt()
        self.n, self.d = n, d

    def _tensor(self, a) -> torch.Tensor:
        with _on_torch_stream(self.backend, self.device):
            return _from_backend(a, self.w0)

    @functools.cached_property
    def vid(self) -> torch.Tensor:
        return self._tensor(self.impl.vid).long()

    @functools.cached_property
    def rank(self) -> torch.Tensor:
        return self._tensor(self.impl.rank).long()

    @functools.cached_property
    def greedy(self) -> torch.Tensor:
        return self._tensor(self.impl.greedy).to(self.dtype)

    def gram_times(self, w: torch.Tensor) -> torch.Tensor:
        """:math:`G_i w_i` (``N x (d+1)``) from the calibration's vertex pairs, without forming the local Grams."""
        with _on_torch_stream(self.backend, self.device):
            return _from_backend(self.calibration.gram_times(_to_backend(w, self.backend)), w)

    def weights(self, X: torch.Tensor, lengthscale: torch.Tensor) -> torch.Tensor:
        """Barycentric weights, differentiable in ``X`` and ``lengthscale`` (simplices held fixed)."""
        d = self.d
        el = (X / lengthscale) @ self.proj.T
        delta = (el - self.greedy) / (d + 1)
        b = torch.zeros(X.shape[0], d + 2, dtype=X.dtype, device=X.device)
        b = b.scatter_add(1, d - self.rank, delta).scatter_add(1, d + 1 - self.rank, -delta)
        return b[:, : d + 1] + torch.nn.functional.pad((1 + b[:, d + 1 :]), (0, d))

    def filter(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with _on_torch_stream(self.backend, self.device):
            return _from_backend(self.impl.filter(_to_backend(u, self.backend), self.coef,
                                                  _to_backend(w, self.backend)), u)

    def blur_slice(self, eps: torch.Tensor) -> torch.Tensor:
        """``W^T C^T eps`` (``N x c``) for vertex values ``eps`` (``M x c``), at the build's weights."""
        with _on_torch_stream(self.backend, self.device):
            return _from_backend(self.impl.blur_slice(_to_backend(eps, self.backend), self.coef), self.w0)

    def splat_blur(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with _on_torch_stream(self.backend, self.device):
            return _from_backend(self.impl.splat_blur(_to_backend(u, self.backend), self.coef,
                                                      _to_backend(w, self.backend)), u)


class _GramTimes(torch.autograd.Function):
    r""":math:`w_i \mapsto G_i w_i` for the calibration's local Grams; the Grams are symmetric, so the
    backward is the same map (itself differentiable)."""

    @staticmethod
    def forward(ctx, w, lat):
        ctx.lat = lat
        return lat.gram_times(w)

    @staticmethod
    def backward(ctx, g):
        return _GramTimes.apply(g.contiguous(), ctx.lat), None


class _Filter(torch.autograd.Function):
    """``W^T C^T C W u`` for weights ``w`` (``N x (d+1)``) and columns ``u`` (``N x c``)."""

    @staticmethod
    def forward(ctx, w, u, lat):
        ctx.save_for_backward(w, u)
        ctx.lat = lat
        return lat.filter(u, w)

    @staticmethod
    def backward(ctx, g):
        w, u = ctx.saved_tensors
        lat = ctx.lat
        g = g.contiguous()
        grad_w = grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = lat.filter(g, w)
        if ctx.needs_input_grad[0]:
            q = lat.splat_blur(u, w)[lat.vid]  # N x (d+1) x c
            p = lat.splat_blur(g, w)[lat.vid]
            grad_w = (g[:, None, :] * q).sum(-1) + (u[:, None, :] * p).sum(-1)
        return grad_w, grad_u, None


class LatticeKernelOperator(LinearOperator):
    r"""The kernel matrix :math:`K_{XX}` of ``kernel`` as a lattice operator.

    :param X: inputs ``(N, d)`` (float32 or float64; CPU, or CUDA with CuPy installed).
    :param kernel: a ``pyro.contrib.gp.kernels`` RBF, Exponential, Matern32 or Matern52 (its
        ``variance`` and ARD ``lengthscale`` are read, and stay differentiable).
    :param order: stencil order ``r`` (``2r+1`` taps per lattice direction).
    :param backend: ``"auto"`` (the device of ``X``), ``"cpu"`` or ``"cuda"``.

    ``op @ v`` / ``op.matmul(v)`` take ``(N,)`` or ``(N, c)``; with ``linear_operator`` functions
    (``inv_quad_logdet``, CG solves) it behaves as any operator. Cross-covariances:
    :meth:`cross_matmul`.

    .. note:: Cost: see the module note; the lattice is built once here and reused by all products.
    """

    def __init__(self, X: torch.Tensor, kernel=None, *, order: int = 1, backend: str = "auto",
                 lengthscale: torch.Tensor | None = None, variance: torch.Tensor | None = None,
                 kernel_name_: str | None = None, lattice: _Lattice | None = None):
        if kernel is not None:
            kernel_name_ = kernel_name(kernel)
            if torch.is_tensor(X) and X.dim() == 2:
                check_kernel_inputs(kernel, X.shape[1])
                if list(kernel.active_dims) != list(range(X.shape[1])):
                    X = kernel._slice_input(X)  # a copy: not made when the kernel takes every column in order
            lengthscale, variance = kernel.lengthscale, kernel.variance
        if not torch.is_tensor(X) or X.dim() != 2:
            raise ValueError(f"X: expected a 2-D (N, d) tensor, got {type(X).__name__} of shape {getattr(X, 'shape', None)}")
        if backend not in ("auto", "cpu", "cuda"):
            raise ValueError(f"backend: must be 'auto', 'cpu' or 'cuda', got {backend!r}")
        lengthscale = torch.as_tensor(lengthscale, dtype=X.dtype, device=X.device).reshape(-1)
        variance = torch.as_tensor(variance, dtype=X.dtype, device=X.device).reshape(())
        if lattice is None:
            sl.validate_inputs(X.detach().cpu().numpy(), lengthscale.detach().cpu().numpy(),
                               variance.detach().cpu().numpy(), kernel_name_, order)
            lengthscale = lengthscale.expand(X.shape[1]) if lengthscale.numel() == 1 else lengthscale
            use = ("cuda" if X.is_cuda else "cpu") if backend == "auto" else backend
            lattice = _Lattice(X, lengthscale, kernel_name_, order, use)
        super().__init__(X, lengthscale=lengthscale, variance=variance, order=order, backend=backend,
                         kernel_name_=kernel_name_, lattice=lattice)
        self.X, self.lengthscale, self.variance = X, lengthscale, variance
        self.order, self.kernel_name, self.lattice, self.backend = order, kernel_name_, lattice, backend

    def _scaled_weights(self):
        if not (torch.is_grad_enabled() and (self.X.requires_grad or self.lengthscale.requires_grad)):
            return self.lattice.w0, self.lattice.s0  # computed once per build (CG and SLQ run here)
        w = self.lattice.weights(self.X, self.lengthscale)
        diag = (w * _GramTimes.apply(w, self.lattice)).sum(-1)
        return w, diag.rsqrt()

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        n = self.X.shape[0]
        vec = rhs.dim() == 1
        r = rhs.unsqueeze(-1) if vec else rhs
        if r.shape[-2] != n:
            raise ValueError(f"rhs: expected {n} rows, got {r.shape[-2]}")
        batch = r.shape[:-2]
        flat = r.movedim(-2, 0).reshape(n, -1)
        w, s = self._scaled_weights()
        out = self.variance * s[:, None] * _Filter.apply(w, (s[:, None] * flat).contiguous(), self.lattice)
        out = out.reshape((n,) + batch + r.shape[-1:]).movedim(0, -2)
        return out.squeeze(-1) if vec else out

    def _size(self) -> torch.Size:
        n = self.X.shape[0]
        return torch.Size((n, n))

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> torch.Tensor:
        # the calibrated diagonal: exact where the exact calibration is the cheaper, else up to the probe
        # estimate's error (see scalegp.lattice)
        return self.variance * torch.ones(self.X.shape[0], dtype=self.X.dtype, device=self.X.device)

    def _get_indices(self, row_index, col_index, *batch_indices):
        # entries K[i, j]: on the diagonal _diagonal's, with no product (GPyTorch's predictive variances ask
        # for the diagonal of a block of test rows; the products' own diagonal is the same up to the probe
        # calibration's error); off it one product column per distinct row or per distinct column, whichever
        # are fewer (K is symmetric): the pivoted-Cholesky preconditioner asks for k rows, its backward for
        # all N rows of k columns
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape)
        rows, cols = row_index.expand(shape).reshape(-1), col_index.expand(shape).reshape(-1)
        entries = self._diagonal()[rows]
        off = torch.nonzero(rows != cols).squeeze(-1)
        if off.numel() == 0:
            return entries.reshape(shape)
        rows, cols = rows[off], cols[off]
        picked, inv = torch.unique(rows, return_inverse=True)
        picked_cols, inv_cols = torch.unique(cols, return_inverse=True)
        if picked_cols.numel() < picked.numel():
            rows, cols, picked, inv = cols, rows, picked_cols, inv_cols
        onehot = torch.zeros(self.X.shape[0], picked.numel(), dtype=self.X.dtype, device=self.X.device)
        onehot[picked, torch.arange(picked.numel(), device=picked.device)] = 1
        block = self._matmul(onehot)  # column r is K[:, picked[r]] = K[picked[r], :]
        return entries.index_put((off,), block[cols, inv]).reshape(shape)

    def cross_matmul(self, X_new: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``K(X_new, X) @ rhs`` from the joint lattice of ``[X; X_new]`` (its calibration and
        symmetry hold for the joint matrix; the ``X``-block of the joint operator can differ slightly
        from ``self``, whose lattice holds only ``X``).

        .. note:: Cost: one joint lattice build and one product of ``rhs.shape[-1]`` columns.
        """
        joint = self.joint(X_new)
        n = self.X.shape[0]
        r = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
        pad = torch.cat([r, torch.zeros(X_new.shape[0], r.shape[-1], dtype=r.dtype, device=r.device)], 0)
        out = (joint @ pad)[n:]
        return out.squeeze(-1) if rhs.dim() == 1 else out

    @torch.no_grad()
    def prior_samples(self, num_samples: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""``num_samples`` draws of :math:`\mathcal N(0, K)` for this operator's :math:`K` (``num_samples x N``),
        exact: :math:`K = \sigma^2 D^{-1/2} W^\top C^\top C W D^{-1/2}` is :math:`R^\top R` with
        :math:`R = \sigma C W D^{-1/2}`, so :math:`R^\top \epsilon` for standard normal values :math:`\epsilon` at the
        ``M`` vertices is such a draw. Not differentiable (for ``SimplexGPMarginal.sample`` and Pyro's
        ``Predictive``; linear_operator's ``zero_mean_mvn_samples`` stays its differentiable Lanczos root).

        .. note:: Cost: half a product, ``O((N d + M d r) S)`` for ``S`` draws.
        """
        eps = torch.randn(self.lattice.impl.m, int(num_samples), dtype=self.X.dtype, device=self.X.device,
                          generator=generator)
        return (self.variance.sqrt() * self.lattice.s0[:, None] * self.lattice.blur_slice(eps)).T

    def joint(self, X_new: torch.Tensor) -> "LatticeKernelOperator":
        """The operator of the same kernel on ``[X; X_new]`` (a new lattice)."""
        if not torch.is_tensor(X_new) or X_new.dim() != 2 or X_new.shape[1] != self.X.shape[1]:
            raise ValueError(f"X_new: expected a (T, {self.X.shape[1]}) tensor, got shape {getattr(X_new, 'shape', None)}")
        return LatticeKernelOperator(torch.cat([self.X, X_new.to(self.X)], 0), lengthscale=self.lengthscale,
                                     variance=self.variance, kernel_name_=self.kernel_name, order=self.order,
                                     backend=self.backend)


def _pivoted_cholesky(column, diag: torch.Tensor, rank: int) -> torch.Tensor:
    r"""Rank-``rank`` pivoted Cholesky factor ``L`` (``N x rank``) of a PSD matrix given its
    diagonal and a function returning its column ``i``: greedy pivots on the largest remaining
    diagonal entry (stops early, zero columns, once the remaining diagonal is not positive).

    .. note:: Cost: ``rank`` columns (operator products) and ``O(N rank^2)``.
    """
    L = diag.new_zeros(diag.shape[0], rank)
    d = diag.clone()
    for m in range(rank):
        i = int(torch.argmax(d))
        if not d[i] > 0:
            break
        L[:, m] = (column(i) - L @ L[i]) / d[i].sqrt()
        d = d - L[:, m] ** 2
    return L


def _woodbury_solve(L: torch.Tensor, noise: torch.Tensor):
    r"""``v -> (L L^T + \sigma_n^2 I)^{-1} v`` by Woodbury, through the ``k x k`` capacitance
    :math:`\sigma_n^2 I + L^\top L` (the preconditioner of the CG solves)."""
    if L.shape[1] == 0:
        return lambda v: v / noise
    chol = torch.linalg.cholesky(noise * torch.eye(L.shape[1], dtype=L.dtype, device=L.device) + L.T @ L)
    return lambda v: (v - L @ torch.cholesky_solve(L.T @ v, chol)) / noise


def _lanczos(A, b: torch.Tensor, rank: int):
    r"""``rank`` Lanczos steps with full reorthogonalization on the SPD map ``A`` from ``b``:
    :math:`A \approx Q T Q^\top`, returning ``Q`` (``N x rank``) and ``T`` (``rank x rank``). After a
    breakdown (the Krylov space exhausted) the remaining steps are identity rows of ``T`` with zero
    Lanczos vectors, so :math:`k^\top Q T^{-1} Q^\top k \le k^\top A^{-1} k` still holds.

    .. note:: Cost: ``rank`` products with ``A`` and ``O(N rank^2)``.
    """
    n = b.shape[0]
    Q = b.new_zeros(n, rank)
    alpha, beta = b.new_ones(rank), b.new_zeros(rank)
    q, q_prev, b_prev = b / b.norm(), torch.zeros_like(b), 0.0
    for j in range(rank):
        Q[:, j] = q
        v = A(q[:, None])[:, 0] - b_prev * q_prev
        a = q @ v
        v = v - a * q
        for _ in range(2):
            v = v - Q @ (Q.T @ v)
        alpha[j], nv = a, v.norm()
        if not nv > 1e-10 * a.abs():
            break
        beta[j] = nv
        q, q_prev, b_prev = v / nv, q, nv
    T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    return Q, T


def _pcg(matvec, psolve, B: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Preconditioned CG on :math:`A X = B` for all columns at once, each stopping when its
    residual falls below ``tol`` times its right-hand side's norm (or after ``max_iter`` steps); the
    NumPyro frontend's solver, without the Lanczos record. Returns ``X`` and each column's relative
    residual norm at the stop. (``linear_operator``'s ``linear_cg``
    zeroes steps whose :math:`p^\top A p` falls below ``1e-10``, which stalls it near a relative
    residual of ``1e-5``.)

    .. note:: Cost: one product with ``A`` and one preconditioner solve per iteration.
    """
    bnorm = B.norm(dim=0)
    X, R = torch.zeros_like(B), B.clone()
    Z = psolve(R)
    P, rz = Z, (R * Z).sum(0)
    active = bnorm > 0
    for _ in range(max_iter):
        if not active.any():
            break
        AP = matvec(P)
        alpha = torch.where(active, rz / torch.where(active, (P * AP).sum(0), 1.0), 0.0)
        X = X + alpha * P
        R = R - alpha * AP
        Z = psolve(R)
        rz_new = (R * Z).sum(0)
        P = torch.where(active, Z + torch.where(active, rz_new / rz, 0.0) * P, P)
        rz = torch.where(active, rz_new, rz)
        active = active & (R.norm(dim=0) > tol * bnorm)
    return X, R.norm(dim=0) / torch.where(bnorm > 0, bnorm, 1.0)


class SimplexGPMarginal(TorchDistribution):
    r"""Marginal distribution of the targets under a GP whose kernel matrix is the lattice operator:
    :math:`y \sim \mathcal N(m, K_{\text{lattice}} + \sigma_n^2 I)`.

    ``log_prob(y)`` runs preconditioned CG for :math:`(K + \sigma_n^2 I)^{-1} y` and stochastic
    Lanczos quadrature with ``num_probes`` Rademacher probes for the log-determinant (through
    ``linear_operator.inv_quad_logdet``; pivoted-Cholesky preconditioner of rank ``precond_rank``),
    and is differentiable in the kernel hyperparameters, ``X``, the noise and the mean. The value
    and its gradient are stochastic estimates (unbiased for the log-determinant's gradient).
    Use it as ``pyro.sample("y", SimplexGPMarginal(kernel, X, noise), obs=y)``.

    :param kernel: ``pyro.contrib.gp.kernels`` RBF, Exponential, Matern32 or Matern52.
    :param X: ``(N, d)`` training inputs.
    :param noise: positive scalar noise variance.
    :param order: stencil order of the lattice.
    :param mean: ``None`` (zero), a scalar or an ``(N,)`` tensor (held as ``loc``).
    :param cg_tol: CG residual tolerance; :param max_cg_iter: CG iteration cap;
    :param num_probes: SLQ probe vectors; :param precond_rank: preconditioner rank, ``0..N`` (0: none;
        ``None``: 15, at most ``N``).

    .. note:: Cost: one lattice build, then ``O(I (N d + M d r)(1 + p))`` per ``log_prob`` for
       ``I`` CG/Lanczos iterations and ``p`` probes; memory ``O((N + M)(1 + p))``.
    """

    arg_constraints = {"noise": constraints.positive, "loc": constraints.real}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, kernel, X, noise, *, order: int = 1, mean=None, cg_tol: float = 1e-3,
                 max_cg_iter: int = 1000, num_probes: int = 16, precond_rank: int | None = None,
                 backend: str = "auto", validate_args=None):
        if not torch.is_tensor(X):
            raise ValueError(f"X: expected a torch.Tensor, got {type(X).__name__}")
        X = X.unsqueeze(-1) if X.dim() == 1 else X
        precond_rank = check_solver_options(X.shape[0], cg_tol=cg_tol, max_cg_iter=max_cg_iter, num_probes=num_probes,
                                            precond_rank=precond_rank)
        self.op = LatticeKernelOperator(X, kernel, order=order, backend=backend)
        self.X = self.op.X
        self.noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
        check_positive_scalar("noise", self.noise)
        self.loc = torch.zeros((), dtype=X.dtype, device=X.device) if mean is None else torch.as_tensor(
            mean, dtype=X.dtype, device=X.device)
        self.cg_tol, self.max_cg_iter, self.num_probes = float(cg_tol), int(max_cg_iter), int(num_probes)
        self.precond_rank = precond_rank
        super().__init__(torch.Size(), torch.Size((X.shape[0],)), validate_args=validate_args)

    def _settings(self):
        return (settings.cg_tolerance(self.cg_tol), settings.max_cg_iterations(self.max_cg_iter),
                settings.num_trace_samples(self.num_probes), settings.max_cholesky_size(0),
                settings.max_preconditioner_size(self.precond_rank), settings.max_lanczos_quadrature_iterations(
                    min(self.max_cg_iter, 100)))

    def log_prob(self, y):
        y = torch.as_tensor(y, dtype=self.X.dtype, device=self.X.device)
        if y.shape != self.event_shape:
            raise ValueError(f"y: expected shape {tuple(self.event_shape)}, got {tuple(y.shape)}")
        check_finite("y", y)
        r = (y - self.loc)[:, None]
        with contextlib.ExitStack() as stack:
            for ctx in self._settings():
                stack.enter_context(ctx)
            inv_quad, logdet = self.op.add_diagonal(self.noise).inv_quad_logdet(r, logdet=True)
        n = self.X.shape[0]
        return -0.5 * (inv_quad + logdet + n * math.log(2 * math.pi))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""Draws of :math:`y \sim \mathcal N(m, K + \sigma_n^2 I)`, exact for the lattice operator :math:`K`
        (:meth:`LatticeKernelOperator.prior_samples`), shape ``sample_shape + (N,)``: what Pyro's
        ``Predictive`` draws at an unobserved site. Not reparametrized. Cost: half a product per draw."""
        shape = torch.Size(sample_shape)
        n = self.X.shape[0]
        f = self.op.prior_samples(shape.numel())
        e = self.noise.sqrt() * torch.randn(f.shape, dtype=f.dtype, device=f.device)
        return (self.loc + f + e).reshape(shape + (n,))

    @torch.no_grad()
    def predict(self, y, X_new, *, noiseless: bool = False, chunk: int = 256, variance_rank: int | None = None,
                neighbors: int | None = None, progress_bar: bool = False):
        r"""Predictive distribution at ``X_new`` given ``y``, from one lattice on ``[X; X_new]``:
        with :math:`A = K_{XX} + \sigma_n^2 I` (blocks of the joint operator, so the joint prior is
        PSD and variances are non-negative), mean :math:`m + K_{*X} A^{-1}(y - m)` by CG
        preconditioned with the rank-``precond_rank`` pivoted Cholesky factor of :math:`K_{XX}`, and
        variance :math:`\sigma^2 - \operatorname{diag}(K_{*X} A^{-1} K_{X*})` (plus the noise unless
        ``noiseless``). Same arguments and maths as the NumPyro frontend's ``predict``.

        :param chunk: with ``variance_rank=None``, the variances come from CG solves of ``chunk``
            test columns at a time.
        :param variance_rank: an integer ``k`` replaces those solves by ``k`` Lanczos steps on
            :math:`A` started at :math:`K_{X*} 1` (LOVE, Pleiss et al. 2018):
            :math:`K_{*X} A^{-1} K_{X*} \approx K_{*X} Q T^{-1} Q^\top K_{X*}`, which never exceeds
            the exact term, so the variances err on the large (conservative) side.
        :param neighbors: an integer ``k`` takes each test point's variance from its ``k`` nearest
            training points under the exact kernel (:mod:`scalegp.neighbors`): never below the
            exact GP's variance, equal to it with ``k = N``, and close to it with a few hundred on
            data much larger than the lengthscales (the fast choice for large ``N``).
        :param progress_bar: show a progress bar over the test points while their variances are
            computed (by chunks of CG solves, or by neighbours).
        :returns: ``pyro.distributions.Normal(mean, scale).to_event(1)`` over ``(T,)``.

        .. note:: Cost: a joint build, ``precond_rank`` single-column products for the
           preconditioner and one CG solve for the mean; variances by ``O(T / chunk)`` CG solves of
           ``chunk`` columns, or with ``variance_rank = k`` by ``k`` single-column products,
           ``O(N k^2)`` reorthogonalization and one product of ``k`` columns, whatever ``T``, or
           with ``neighbors = k`` by ``O(T k^3)`` (see :mod:`scalegp.neighbors`).
        """
        y = torch.as_tensor(y, dtype=self.X.dtype, device=self.X.device)
        if y.shape != self.event_shape:
            raise ValueError(f"y: expected shape {tuple(self.event_shape)}, got {tuple(y.shape)}")
        X_new = X_new.unsqueeze(-1) if torch.is_tensor(X_new) and X_new.dim() == 1 else X_new
        n = self.X.shape[0]
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"chunk: must be a positive integer, got {chunk!r}")
        if variance_rank is not None and (not isinstance(variance_rank, (int, np.integer))
                                          or not 1 <= variance_rank <= n):
            raise ValueError(f"variance_rank: must be None or an integer in [1, {n}], got {variance_rank!r}")
        check_neighbors(neighbors, variance_rank, n)
        joint = self.op.joint(X_new)
        t = X_new.shape[0]

        def block(v, rows, cols):  # K_joint[rows, cols] @ v
            full = v.new_zeros(n + t, v.shape[-1])
            full[cols] = v
            return (joint @ full)[rows]

        train, test = slice(0, n), slice(n, n + t)
        A = lambda v: block(v, train, train) + self.noise * v  # noqa: E731

        def column(i):  # K_XX[:, i]
            e = self.X.new_zeros(n, 1)
            e[i] = 1
            return block(e, train, train)[:, 0]

        psolve = _woodbury_solve(_pivoted_cholesky(column, self.op.variance.expand(n), self.precond_rank), self.noise)

        def solve(rhs):
            x, rel = _pcg(A, psolve, rhs, self.cg_tol, self.max_cg_iter)
            warn_unconverged("SimplexGPMarginal.predict", rel.cpu(), self.cg_tol, self.max_cg_iter)
            return x

        alpha = solve((y - self.loc)[:, None])
        mean = self.loc + block(alpha, test, train)[:, 0]
        if neighbors is not None:
            host = lambda v: torch.as_tensor(v).detach().cpu().numpy()  # noqa: E731
            var = torch.as_tensor(neighbor_variances(
                host(self.X), host(X_new), neighbors, kernel=self.op.kernel_name, lengthscale=host(self.op.lengthscale),
                variance=host(self.op.variance), noise=host(self.noise), progress_bar=progress_bar)).to(self.X)
            return dist.Normal(mean, (var if noiseless else var + self.noise).sqrt()).to_event(1)
        if variance_rank is not None:
            start = block(self.X.new_ones(t, 1), train, test)[:, 0]
            Q, T = _lanczos(A, start, int(variance_rank))
            cross = block(Q, test, train)  # K_{*X} Q
            reduction = (torch.linalg.solve_triangular(torch.linalg.cholesky(T), cross.T, upper=False) ** 2).sum(0)
        else:
            reduction = self.X.new_empty(t)
            with tqdm(total=t, desc="Simplex-GP variances", unit="point", disable=not progress_bar) as bar:
                for s in range(0, t, chunk):
                    e = min(t, s + chunk)
                    onehot = self.X.new_zeros(t, e - s)
                    onehot[torch.arange(s, e), torch.arange(e - s)] = 1
                    kx = block(onehot, train, test)  # N x chunk: K_{X, *}
                    reduction[s:e] = (kx * solve(kx)).sum(0)
                    bar.update(e - s)
        var = (self.op.variance - reduction).clamp_min(0)
        var = var if noiseless else var + self.noise
        return dist.Normal(mean, var.sqrt()).to_event(1)

    @property
    def mean(self):
        return self.loc.expand(self.event_shape)

    @property
    def variance(self):
        return self.op.variance + self.noise.expand(self.event_shape)
