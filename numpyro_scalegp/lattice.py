r"""Simplex-GP on the permutohedral lattice for JAX / NumPyro (paper 002 [1]): the kernel operator
and the GP marginal likelihood on it.

:class:`LatticeKernelOperator` is the same operator as
:class:`pyro_scalegp.lattice.LatticeKernelOperator`, with the same maths (:mod:`scalegp.lattice`)
and the same ``kernels_cuda`` builds (the CPU build, or the CUDA one through CuPy for arrays on a GPU):

.. math::

    K \approx \sigma^2 D^{-1/2} W^\top C^\top C W D^{-1/2}.

The operator is a pytree (leaves ``X``, ``lengthscale``, ``variance``) whose products run inside
``jit``, ``grad`` and ``vmap``. Built from concrete values, the lattice is built at once (its
per-point data become leaves of the pytree); built from traced values (inside ``jit``, e.g. in a
NumPyro model under SVI), the lattice is built when the computation runs, by a callback that
writes the per-point lattice data (simplex ranks, remainder-0 points, the barycentric weights and
the diagonal calibration's scales; their shapes depend only on ``N`` and ``d``) and a handle to the
lattice, which the products look up. The filter is a callback into the build wrapped in a
``custom_vjp`` whose backward is the transposed filtering (the operator is symmetric) and the weight
gradient :math:`g_i^\top (BWu)_{a_{ik}} + u_i^\top (BWg)_{a_{ik}}`; the barycentric weights and the
diagonal calibration are differentiated by JAX, with the calibration's local Grams applied by a
callback (``_scaled_weights``). Gradients with respect to ``X`` and the lengthscales hold the
simplices fixed (exact derivatives of the forward map between lattice rebuilds).

The callbacks are ``jax.experimental.buffer_callback``: they get XLA's own buffers (numpy views on
the CPU; on a GPU, CuPy views through the CUDA array interface, with the kernels launched on XLA's
stream) and write their results in place, so no operand or result is copied (except for the CPU
build where JAX's default backend is a GPU: see ``_device_call``). The CUDA side is tested with CuPy
mocked in CI (no GPU) and on a GPU by ``tests/test_lattice_cuda.py``.

:class:`SimplexGPMarginal` is :math:`\mathcal N(m, K + \sigma_n^2 I)` with ``log_prob`` by
preconditioned CG and stochastic Lanczos quadrature (:mod:`scalegp.krylov`).

References: [1] Kapoor, Finzi, Wang, Wilson, ICML 2021. [2] Gardner, Pleiss, Bindel, Weinberger,
Wilson, GPyTorch, NeurIPS 2018. [3] Harbrecht, Peters, Schneider, Appl. Numer. Math. 62, 2012.
[4] Pleiss, Gardner, Weinberger, Wilson, "Constant-time predictive distributions for Gaussian
processes" (LOVE), ICML 2018.

.. note:: Cost: building ``O(N d^2 + M d r)`` plus the diagonal calibration (see
   :mod:`scalegp.lattice`), each product ``O((N d + M d r) c)`` for ``c`` columns, plus a Python
   call per callback.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback
from numpyro.distributions import Distribution, Normal, constraints
from tqdm.auto import tqdm

from kernels_cuda.cpu import aligned_empty
from kernels_cuda.dispatch import array_module, build_lattice, memory_limit
from kernels_cuda.gpu import external_stream
from scalegp import krylov
from scalegp import lattice as sl
from scalegp.domain import DomainError, DomainWarning
from scalegp.neighbors import check_neighbors, neighbor_variances

from . import kernels as nk
from .hgp import _as_loc, _check_finite, _check_positive

__all__ = ["LatticeKernelOperator", "SimplexGPMarginal", "kernel_name"]

_NAMES = ((nk.RBF, "rbf"), (nk.Exponential, "exponential"), (nk.Matern32, "matern32"), (nk.Matern52, "matern52"))


def kernel_name(kernel) -> str:
    """The lattice name of a supported ``numpyro_scalegp.kernels`` kernel; ``ValueError`` otherwise."""
    for cls, name in _NAMES:
        if isinstance(kernel, cls):
            return name
    raise ValueError(
        f"kernel: {type(kernel).__name__} is not supported by the lattice; use RBF, Exponential, Matern32 or Matern52"
    )


class _Lattice:
    """The lattice of concrete ``(X, lengthscale)`` on ``backend`` (``X`` and ``ell`` numpy arrays for
    ``"cpu"``, CuPy arrays for ``"cuda"``), with that side of the products."""

    def __init__(self, X, ell, name: str, order: int, backend: str):
        n, d = X.shape
        limit, where = memory_limit(backend)
        sl.check_memory(n, d, order, 1, X.dtype.itemsize, limit=limit, where=where)
        st = sl.stencil(name, order)
        scale = sl.elevation_scale(d, st)
        self.xp, self.backend, self.dtype = array_module(backend), backend, np.dtype(X.dtype)
        self.impl = build_lattice(self.xp.ascontiguousarray(X / ell), scale.astype(X.dtype), order, backend=backend)
        self.coef = st.coef.astype(X.dtype)

    @functools.cached_property
    def calibration(self):
        return self.impl.calibrate(self.coef)

    def arrays(self, handle: int) -> tuple:
        """The per-point data handed to JAX, all in the inputs' float dtype (so the operator has no
        integer leaves and ``jax.grad`` takes it whole): the handle, the residual ranks, the
        remainder-0 points, and at the build's inputs the barycentric weights and the calibration
        scales :math:`D_{ii}^{-1/2}`."""
        arrays = (self.xp.asarray(handle, self.dtype), self.impl.rank, self.impl.greedy, self.impl.bary,
                  self.calibration.diagonal() ** -0.5)
        return tuple(self._leaf(a) for a in arrays)

    def gram_times(self, out, w):
        """:math:`G_i w_i` (``N x (d+1)``) into ``out``: half the gradient of the calibrated diagonal in the weights."""
        out[...] = self.calibration.gram_times(w)

    def _leaf(self, a):
        """``a`` in the inputs' float dtype; on the host, 64-byte aligned, so that JAX takes it without a copy."""
        if self.xp is not np:
            return a.astype(self.dtype, copy=False)
        if a.dtype == self.dtype and a.ctypes.data % 64 == 0:
            return a
        out = aligned_empty(a.shape, self.dtype)
        out[...] = a
        return out

    def filter(self, out, w, u):
        self.impl.filter(u, self.coef, w, out=out)

    def blur_slice(self, out, w, eps):
        """``W^T C^T`` of the first ``m`` rows of ``eps`` (``N (d+1) x c``, at least ``m`` rows) into ``out``."""
        out[...] = self.impl.blur_slice(eps[: self.impl.m], self.coef, w)

    def weight_grad(self, out, w, u, g):
        """:math:`\\partial (g^\\top W^\\top B W u) / \\partial w_{ik}` (``N x (d+1)``) into ``out``."""
        q = self.impl.splat_blur(u, self.coef, w)[self.impl.vid]
        p = self.impl.splat_blur(g, self.coef, w)[self.impl.vid]
        out[...] = self.xp.einsum("nkc,nc->nk", q, g) + self.xp.einsum("nkc,nc->nk", p, u)


class _Registry:
    """Lattices by handle (an integer below :math:`2^{24}`, exact in float32): those of
    operators built from concrete values live as long as their operator (weak references; the
    operator holds the lattice); those built inside traced computations are kept for the ``keep``
    most recent builds. A lattice looked up after it was dropped is rebuilt from the same
    ``(X, lengthscale)``: the data handed to JAX is a deterministic function of them (on the CPU
    build; the GPU build's probe estimate is the same in distribution)."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._weak: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._ids = itertools.count()

    def add(self, lat: _Lattice, *, keep: bool, handle: int | None = None) -> int:
        handle = next(self._ids) % 2**24 if handle is None else handle
        self._weak[handle] = lat
        if keep:
            self._recent[handle] = lat
            self._recent.move_to_end(handle)
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return handle

    def get(self, handle, X, ell, name: str, order: int, backend: str) -> _Lattice:
        handle = int(handle)
        lat = self._weak.get(handle)
        if lat is None:
            lat = _Lattice(X, ell, name, order, backend)
            self.add(lat, keep=True, handle=handle)
        return lat


_REGISTRY = _Registry()
#: the handle of a traced build that met a :class:`scalegp.domain.DomainError` (no lattice)
_NO_LATTICE = -1


def _build(name: str, order: int, backend: str, X, ell, variance, *, keep: bool = True):
    """Validate (on host copies where the values are on a GPU), build and register a lattice; returns
    it and its data for JAX (arrays of the backend)."""
    xp = array_module(backend)
    host = np.asarray if xp is np else xp.asnumpy
    Xh, ellh = sl.validate_inputs(host(X), host(ell), host(variance), name, order)
    if xp is np:
        X, ell = Xh, ellh.astype(Xh.dtype)
    else:
        X, ell = xp.asarray(X).reshape(Xh.shape), xp.asarray(ellh, Xh.dtype)
    lat = _Lattice(X, ell, name, order, backend)
    return lat, lat.arrays(_REGISTRY.add(lat, keep=keep))


def _xla_stream(ctx):
    """XLA's CUDA stream of a ``buffer_callback`` as CuPy's current stream (the launches and
    allocations of the callback go on it, in order with XLA's own work)."""
    stream = ctx.stream  # a property in jax 0.9.2 (the version pinned), a method in some other versions
    return external_stream(stream() if callable(stream) else stream)


def _device_call(fn, backend: str, shapes: tuple, *args):
    """``fn(outs, *ins)`` on the buffers XLA holds (``jax.experimental.buffer_callback``): numpy views
    of them on the CPU, CuPy views on a GPU (on XLA's stream), so no operand or result is copied;
    ``fn`` writes each result into its ``outs`` array. Runs inside ``jit``; ``vmap`` calls it per batch
    element. The CPU build where JAX's default backend is an accelerator (``backend="cpu"`` on a GPU
    machine) goes through ``jax.pure_callback`` instead, which copies the operands to the host and
    the results back."""
    xp = array_module(backend)
    if xp is np and jax.default_backend() != "cpu":
        def host(*ins):
            outs = tuple(np.empty(s.shape, s.dtype) for s in shapes)
            fn(outs, *(np.asarray(a) for a in ins))
            return outs

        return jax.pure_callback(host, shapes, *args, vmap_method="sequential")

    def run(ctx, outs, *ins):
        with contextlib.nullcontext() if xp is np else _xla_stream(ctx):
            fn(tuple(xp.asarray(o) for o in outs), *(xp.asarray(a) for a in ins))

    return buffer_callback(run, shapes, vmap_method="sequential")(*args)


def _lattice_call(name: str, order: int, backend: str, method: str, out_like, *args):
    """``method(out, w, *cols)`` of the lattice that ``args = (handle, X, lengthscale, w, *cols)`` identify,
    by a callback inside the computation; returns ``out`` (shaped as ``out_like``)."""
    def run(outs, handle, X, ell, w, *cols):
        if handle == _NO_LATTICE:
            outs[0][...] = np.nan
        else:
            getattr(_REGISTRY.get(handle, X, ell, name, order, backend), method)(outs[0], w, *cols)

    shape = (jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),)
    return _device_call(run, backend, shape, *args)[0]


@functools.lru_cache(maxsize=None)
def _filter(name: str, order: int, backend: str):
    """``W^T C^T C W u`` as a ``custom_vjp`` of ``(handle, X, lengthscale, w, u)``; the handle, ``X``
    and the lengthscale only identify the lattice (their cotangents are zero: the simplices are fixed)."""
    call = functools.partial(_lattice_call, name, order, backend)

    @jax.custom_vjp
    def f(handle, X, ell, w, u):
        return call("filter", u, handle, X, ell, w, u)

    def fwd(handle, X, ell, w, u):
        return f(handle, X, ell, w, u), (handle, X, ell, w, u)

    def bwd(res, g):
        handle, X, ell, w, u = res
        grad_w = call("weight_grad", w, handle, X, ell, w, u, g)
        grad_u = call("filter", g, handle, X, ell, w, g)
        return jnp.zeros_like(handle), jnp.zeros_like(X), jnp.zeros_like(ell), grad_w, grad_u

    f.defvjp(fwd, bwd)
    return f


def _resolve_backend(X, backend: str) -> str:
    """``"cpu"`` or ``"cuda"``: ``backend`` itself, or for ``"auto"`` the platform of a concrete
    ``X``'s device (of JAX's default backend for traced or host values)."""
    if backend not in ("auto", "cpu", "cuda"):
        raise ValueError(f"backend: must be 'auto', 'cpu' or 'cuda', got {backend!r}")
    if backend != "auto":
        return backend
    if isinstance(X, jax.Array) and not _is_traced(X):
        platform = next(iter(X.devices())).platform
    else:
        platform = jax.default_backend()
    return "cuda" if platform in ("gpu", "cuda") else "cpu"


def _weights(X, ell, proj, rank, greedy):
    """Barycentric weights, differentiable in ``X`` and ``ell`` (simplices held fixed)."""
    n, d = X.shape
    el = (X / ell) @ jnp.asarray(proj, X.dtype).T
    delta = (el - greedy) / (d + 1)
    rows = jnp.arange(n)[:, None]
    b = jnp.zeros((n, d + 2), X.dtype)
    b = b.at[rows, d - rank].add(delta).at[rows, d + 1 - rank].add(-delta)
    return b[:, : d + 1].at[:, 0].add(1 + b[:, d + 1])


@functools.lru_cache(maxsize=None)
def _scaled_weights(name: str, order: int, backend: str):
    r"""The barycentric weights ``w`` and calibration scales :math:`s_i = (w_i^\top G_i w_i)^{-1/2}` as a
    ``custom_jvp`` of ``(handle, X, lengthscale, proj, rank, greedy, w0, s0)``, differentiable in ``X`` and
    the lengthscale. At the lattice's own inputs they are the build's ``w0`` and ``s0``, which products that
    are not differentiated take as they are (on all flights rows a product took 65 ms with the weights'
    scatter and the Gram contraction of every point, 8 ms without). Differentiated, the weights are
    recomputed by JAX and :math:`G_i w_i` by a callback from the calibration's vertex pairs (the Grams are
    never formed: ``N (d+1)^2`` values, 158 MB on all flights rows):
    :math:`\mathrm{d}s_i = -s_i^3 (G_i w_i)^\top \mathrm{d}w_i`, with :math:`G_i` fixed with the simplices."""

    @jax.custom_jvp
    def f(handle, X, ell, proj, rank, greedy, w0, s0):
        return w0, s0

    @f.defjvp
    def jvp(primals, tangents):
        handle, X, ell, proj, rank, greedy = primals[:6]
        w, dw = jax.jvp(lambda X_, ell_: _weights(X_, ell_, proj, rank, greedy), (X, ell), tangents[1:3])
        gw = _lattice_call(name, order, backend, "gram_times", w, handle, X, ell, w)
        s = jax.lax.rsqrt(jnp.sum(w * gw, axis=-1))
        return (w, s), (dw, -s**3 * jnp.sum(gw * dw, axis=-1))

    return f


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


@jax.tree_util.register_pytree_node_class
class LatticeKernelOperator:
    r"""The kernel matrix :math:`K_{XX}` of ``kernel`` as a lattice operator (JAX).

    :param X: ``(N, d)`` inputs.
    :param kernel: a ``numpyro_scalegp.kernels`` RBF, Exponential, Matern32 or Matern52.
    :param order: stencil order ``r`` (``2r+1`` taps per lattice direction).
    :param backend: ``"cpu"``, ``"cuda"`` (the CUDA build through CuPy, on GPU buffers) or ``"auto"``:
        the platform of ``X``'s device, or of JAX's default backend for traced or host values.

    ``op @ v`` with ``v`` of shape ``(N,)`` or ``(N, c)``; works under ``jit``, ``grad``
    (``v``, ``X``, ``lengthscale``, ``variance``; the lattice data, a private leaf, gets a zero
    cotangent) and ``vmap``. Constructed from concrete values, bad values raise ``ValueError``
    here; constructed inside ``jit`` (traced inputs), shapes, the kernel and ``order`` are checked
    here and the values by the build (a callback) when the computation runs, which then fails with the
    same message, except for hyperparameters the lattice cannot represent
    (:class:`scalegp.domain.DomainError`: met by NUTS far in a prior's tail), where the products are
    NaN (so is ``log_prob``: NUTS rejects the step) and the message comes as a
    :class:`scalegp.domain.DomainWarning`. Cross-covariances: :meth:`cross_matmul`.

    .. note:: Cost: see the module note. Inside ``jit`` the lattice is built once per execution of
       the computation that constructs the operator.
    """

    def __init__(self, X, kernel, *, order: int = 1, backend: str = "auto"):
        backend = _resolve_backend(X, backend)
        name = kernel_name(kernel)
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order: must be a positive integer, got {order!r}")
        kernel.check_inputs(X)
        X = kernel._slice(X)
        ell, var = kernel.lengthscale, kernel.variance
        self.order, self.kernel_name, self.backend = int(order), name, backend
        if _is_traced(X, ell, var):
            if X.ndim != 2 or 0 in X.shape:
                raise ValueError(f"X: expected a 2-D (N, d) array with N, d > 0, got shape {X.shape}")
            n, d = X.shape
            if jnp.ndim(ell) > 1 or jnp.size(ell) not in (1, d):
                raise ValueError(f"lengthscale: expected a scalar or shape ({d},), got shape {jnp.shape(ell)}")
            dtype = jnp.result_type(X, float)
            self.X = jnp.asarray(X, dtype)
            self.lengthscale = jnp.broadcast_to(jnp.asarray(ell, dtype).reshape(-1), (d,))
            self.variance = jnp.asarray(var, dtype).reshape(())
            shapes = tuple(jax.ShapeDtypeStruct(s, dtype) for s in ((), (n, d + 1), (n, d + 1), (n, d + 1), (n,)))
            stop = jax.lax.stop_gradient

            def build(outs, *values):
                try:
                    arrays = _build(name, self.order, backend, *values)[1]
                except DomainError as e:  # a sampler far in a prior's tail: NaN, not a failed run
                    warnings.warn(f"{e} (the lattice operator's products are NaN here)", DomainWarning,
                                  stacklevel=2)
                    arrays = (_NO_LATTICE,) + (np.nan,) * (len(outs) - 1)
                for out, a in zip(outs, arrays):
                    out[...] = a

            self._lattice = _device_call(build, backend, shapes, stop(self.X), stop(self.lengthscale),
                                         stop(self.variance))
        else:
            lat, arrays = _build(name, self.order, backend, X, ell, var, keep=False)
            self._keepalive = lat
            self.X = jnp.asarray(X, lat.dtype)
            self.lengthscale = jnp.broadcast_to(jnp.asarray(ell, lat.dtype).reshape(-1), (self.X.shape[1],))
            self.variance = jnp.asarray(var, lat.dtype)
            self._lattice = tuple(jnp.asarray(a) if backend == "cpu" else jax.dlpack.from_dlpack(a) for a in arrays)

    def tree_flatten(self):
        return (self.X, self.lengthscale, self.variance, self._lattice), (self.order, self.kernel_name, self.backend)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.X, obj.lengthscale, obj.variance, obj._lattice = children
        obj.order, obj.kernel_name, obj.backend = aux
        return obj

    @property
    def shape(self):
        return (self.X.shape[0], self.X.shape[0])

    def diagonal(self):
        """The exact diagonal: the variance, by construction."""
        return jnp.full(self.X.shape[0], self.variance, self.X.dtype)

    def matmul(self, v):
        v = jnp.asarray(v, self.X.dtype)
        n, d = self.X.shape
        if v.shape[0] != n or v.ndim not in (1, 2):
            raise ValueError(f"v: expected shape ({n},) or ({n}, c), got {v.shape}")
        u = v[:, None] if v.ndim == 1 else v
        handle, rank, greedy, w0, s0 = jax.lax.stop_gradient(self._lattice)
        proj = sl.elevation_matrix(d) * sl.elevation_scale(d, sl.stencil(self.kernel_name, self.order))[None, :]
        w, s = _scaled_weights(self.kernel_name, self.order, self.backend)(
            handle, self.X, self.lengthscale, jnp.asarray(proj, self.X.dtype), rank.astype(jnp.int32), greedy, w0, s0)
        filt = _filter(self.kernel_name, self.order, self.backend)
        out = self.variance * s[:, None] * filt(handle, self.X, self.lengthscale, w, s[:, None] * u)
        return out[:, 0] if v.ndim == 1 else out

    __matmul__ = matmul

    def prior_samples(self, key, num_samples: int = 1):
        r"""``num_samples`` draws of :math:`\mathcal N(0, K)` for this operator's :math:`K` (``num_samples x N``),
        exact: :math:`K = \sigma^2 D^{-1/2} W^\top C^\top C W D^{-1/2}` is :math:`R^\top R` with
        :math:`R = \sigma C W D^{-1/2}`, so :math:`R^\top \epsilon` for standard normal values :math:`\epsilon` at the
        ``M`` vertices is such a draw. ``M`` is known only once the lattice is built (inside ``jit``, when the
        computation runs), so ``key`` draws ``N (d+1) >= M`` values per sample and the vertices take the first
        ``M``. Works under ``jit`` and ``vmap``; not differentiable.

        .. note:: Cost: half a product, ``O((N d + M d r) S)`` for ``S`` draws, and ``N (d+1) S`` normal draws.
        """
        n, d = self.X.shape
        eps = jax.random.normal(key, (n * (d + 1), int(num_samples)), self.X.dtype)
        handle, _, _, w0, s0 = jax.lax.stop_gradient(self._lattice)
        out = _lattice_call(self.kernel_name, self.order, self.backend, "blur_slice",
                            jax.ShapeDtypeStruct((n, int(num_samples)), self.X.dtype), handle,
                            jax.lax.stop_gradient(self.X), jax.lax.stop_gradient(self.lengthscale), w0, eps)
        return (jnp.sqrt(jax.lax.stop_gradient(self.variance)) * s0[:, None] * out).T

    def joint(self, X_new) -> "LatticeKernelOperator":
        """The operator of the same kernel on ``[X; X_new]`` (a new lattice)."""
        X_new = jnp.asarray(X_new, self.X.dtype)
        d = self.X.shape[1]
        if X_new.ndim != 2 or X_new.shape[1] != d:
            raise ValueError(f"X_new: expected a (T, {d}) array, got shape {X_new.shape}")
        cls = {name: c for c, name in _NAMES}[self.kernel_name]
        return LatticeKernelOperator(jnp.concatenate([self.X, X_new]),
                                     cls(d, variance=self.variance, lengthscale=self.lengthscale),
                                     order=self.order, backend=self.backend)

    def cross_matmul(self, X_new, rhs):
        """``K(X_new, X) @ rhs`` from the joint lattice of ``[X; X_new]`` (its calibration and
        symmetry hold for the joint matrix; the ``X``-block of the joint operator can differ slightly
        from ``self``, whose lattice holds only ``X``).

        .. note:: Cost: one joint lattice build and one product of ``rhs.shape[-1]`` columns.
        """
        return _test_block(self.joint(X_new), self.X.shape[0])(jnp.asarray(rhs, self.X.dtype))


# --------------------------------------------------------------------------------------------
# CG, Lanczos and the preconditioner (JAX, inside jit)
# --------------------------------------------------------------------------------------------

class _Preconditioner:
    r""":math:`P = L L^\top + \sigma_n^2 I` from a rank-``k`` pivoted Cholesky factor ``L`` of ``K``:
    solves by Woodbury, :math:`\log\det P` by the ``k x k`` capacitance
    :math:`C = \sigma_n^2 I + L^\top L`, samples :math:`z = L\epsilon_1 + \sigma_n \epsilon_2 \sim \mathcal N(0, P)`."""

    def __init__(self, L, noise):
        self.L, self.noise = L, noise
        n, k = L.shape
        self.chol = jnp.linalg.cholesky(noise * jnp.eye(k, dtype=L.dtype) + L.T @ L) if k else None
        logdet_c = 2 * jnp.log(jnp.diagonal(self.chol)).sum() if k else 0.0
        self.logdet = logdet_c + (n - k) * jnp.log(noise)

    def solve(self, v):
        if self.chol is None:
            return v / self.noise
        c = jax.scipy.linalg.cho_solve((self.chol, True), self.L.T @ v)
        return (v - self.L @ c) / self.noise

    def sample(self, eps):
        k = self.L.shape[1]
        return self.L @ eps[:k] + jnp.sqrt(self.noise) * eps[k:]


def _pivoted_cholesky(column, diag, rank: int):
    r"""Rank-``rank`` pivoted Cholesky factor of a PSD matrix given its diagonal and a function
    returning its column ``i`` [3]: greedy pivots on the largest remaining diagonal entry.

    .. note:: Cost: ``rank`` columns (operator products) and ``O(N rank^2)``.
    """
    n = diag.shape[0]
    if rank == 0:
        return jnp.zeros((n, 0), diag.dtype)

    def body(m, state):
        L, d = state
        i = jnp.argmax(d)
        piv = d[i]
        ok = piv > 0
        col = (column(i) - L @ L[i]) / jnp.sqrt(jnp.where(ok, piv, 1.0))
        col = jnp.where(ok, col, 0.0)
        return L.at[:, m].set(col), d - col**2

    L, _ = jax.lax.fori_loop(0, rank, body, (jnp.zeros((n, rank), diag.dtype), diag))
    return L


def _pcg(matvec, psolve, B, tol: float, max_iter: int, steps: int):
    r"""Preconditioned CG on :math:`A X = B` for all columns at once, each stopping when its
    residual falls below ``tol`` times its right-hand side's norm (or after ``max_iter`` steps),
    recording the coefficients of the first ``steps`` steps for the Lanczos tridiagonals.

    :returns: ``X``, ``alpha``, ``beta``, ``active`` (these three ``(steps, c)``) and each column's
        relative residual norm at the stop.
    """
    c = B.shape[1]
    bnorm = jnp.linalg.norm(B, axis=0)
    zt = psolve(B)
    rz = (B * zt).sum(0)
    rec = jnp.zeros((steps, c), B.dtype)
    init = (0, jnp.zeros_like(B), B, zt, rz, bnorm > 0, rec, rec, jnp.zeros((steps, c), bool))

    def cond(state):
        return (state[0] < max_iter) & jnp.any(state[5])

    def body(state):
        k, x, r, p, rz, active, alphas, betas, acts = state
        Ap = matvec(p)
        pAp = (p * Ap).sum(0)
        alpha = jnp.where(active, rz / jnp.where(active, pAp, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        zt = psolve(r)
        rz_new = (r * zt).sum(0)
        beta = jnp.where(active, rz_new / jnp.where(active, rz, 1.0), 0.0)
        p = jnp.where(active, zt + beta * p, p)
        kk = jnp.minimum(k, steps - 1)
        keep = k < steps
        alphas = alphas.at[kk].set(jnp.where(keep, alpha, alphas[kk]))
        betas = betas.at[kk].set(jnp.where(keep, beta, betas[kk]))
        acts = acts.at[kk].set(jnp.where(keep, active, acts[kk]))
        rz = jnp.where(active, rz_new, rz)
        active = active & (jnp.linalg.norm(r, axis=0) > tol * bnorm)
        return k + 1, x, r, p, rz, active, alphas, betas, acts

    _, x, r, _, _, _, alphas, betas, acts = jax.lax.while_loop(cond, body, init)
    return x, alphas, betas, acts, jnp.linalg.norm(r, axis=0) / jnp.where(bnorm > 0, bnorm, 1.0)


def _from_training(op, n: int, v):
    """``K[:, :n] v``: ``op`` (over training and test points) times ``v`` padded with zeros for the test points."""
    return op @ jnp.concatenate([v, jnp.zeros((op.shape[0] - n,) + v.shape[1:], v.dtype)])


def _train_block(op, n: int):
    """``v -> K[:n, :n] v`` (the training block of an operator over training and test points)."""
    if op.shape[0] == n:
        return op.matmul
    return lambda v: _from_training(op, n, v)[:n]


def _test_block(op, n: int):
    """``v -> K[n:, :n] v`` (the test-by-training block of an operator over training and test points)."""
    return lambda v: _from_training(op, n, v)[n:]


def _preconditioner(op, n: int, noise, rank: int) -> _Preconditioner:
    K = _train_block(op, n)
    column = lambda i: K(jax.nn.one_hot(i, n, dtype=op.X.dtype))  # noqa: E731
    return _Preconditioner(_pivoted_cholesky(column, jnp.full(n, op.variance, op.X.dtype), rank), noise)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _solve(op, noise, B, n: int, cfg: tuple):
    """:math:`(K_{[:n,:n]} + \\sigma_n^2 I)^{-1} B` by preconditioned CG, and each column's relative
    residual norm at the stop."""
    tol, max_iter, rank = cfg
    K = _train_block(op, n)
    prec = _preconditioner(op, n, noise, rank)
    x, _, _, _, rel = _pcg(lambda v: K(v) + noise * v, prec.solve, B, tol, max_iter, 1)
    return x, rel


@functools.partial(jax.jit, static_argnums=(3, 4))
def _lanczos_cross(joint, noise, b, n: int, rank: int):
    r"""Lanczos with full reorthogonalization, ``rank`` steps on :math:`A = K_{XX} + \sigma_n^2 I` from
    ``b``: :math:`A \approx Q T Q^\top`. Returns :math:`L_T^{-1} Q^\top K_{X*}` (``rank x T``) with
    :math:`T = L_T L_T^\top`, whose column norms squared are
    :math:`k_*^\top Q T^{-1} Q^\top k_* \le k_*^\top A^{-1} k_*` (LOVE [4]). After a breakdown (the
    Krylov space exhausted) the remaining steps are identity rows with zero Lanczos vectors."""
    K = _train_block(joint, n)
    dtype = b.dtype

    def body(j, state):
        Q, alpha, beta, q, q_prev, b_prev, live = state
        Q = Q.at[:, j].set(q)
        v = K(q) + noise * q - b_prev * q_prev
        a = q @ v
        v = v - a * q
        v = v - Q @ (Q.T @ v)
        v = v - Q @ (Q.T @ v)
        nv = jnp.linalg.norm(v)
        live_next = live & (nv > 1e-10 * jnp.abs(a))
        q_next = jnp.where(live_next, v / jnp.where(live_next, nv, 1.0), 0.0)
        alpha = alpha.at[j].set(jnp.where(live, a, 1.0))
        beta = beta.at[j].set(jnp.where(live_next, nv, 0.0))
        return Q, alpha, beta, q_next, q, jnp.where(live_next, nv, 0.0), live_next

    init = (jnp.zeros((n, rank), dtype), jnp.ones(rank, dtype), jnp.zeros(rank, dtype), b / jnp.linalg.norm(b),
            jnp.zeros(n, dtype), jnp.zeros((), dtype), jnp.ones((), bool))
    Q, alpha, beta, *_ = jax.lax.fori_loop(0, rank, body, init)
    T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    cross = _test_block(joint, n)(Q)  # K_{*X} Q
    return jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(T), cross.T, lower=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _log_prob(op, noise, r, eps, cfg):
    return _log_prob_fwd(op, noise, r, eps, cfg)[0]


def _log_prob_fwd(op, noise, r, eps, cfg):
    tol, max_iter, rank = cfg
    n = r.shape[0]
    prec = _preconditioner(op, n, noise, rank)
    z = prec.sample(eps)
    x, alpha, beta, active, rel = _pcg(lambda v: op @ v + noise * v, prec.solve, jnp.concatenate([r[:, None], z], 1),
                                       tol, max_iter, krylov.lanczos_steps(max_iter))
    # a RuntimeWarning from the host where CG stopped short of its tolerance (as linear_operator warns in Pyro)
    jax.debug.callback(functools.partial(krylov.warn_unconverged, "SimplexGPMarginal.log_prob", tol=tol,
                                         max_iter=max_iter), rel)
    a, solves = x[:, 0], x[:, 1:]
    pz = prec.solve(z)
    T = krylov.cg_tridiagonal(jnp, alpha[:, 1:], beta[:, 1:], active[:, 1:])
    logdet = prec.logdet + krylov.slq_logdet(jnp, T, (z * pz).sum(0))
    value = -0.5 * (r @ a + logdet + n * math.log(2 * math.pi))
    return value, (op, a, solves, pz, eps)


def _log_prob_bwd(cfg, res, g):
    op, a, solves, pz, eps = res
    p = solves.shape[1]
    V = jnp.concatenate([a[:, None], pz], 1)
    C = g * jnp.concatenate([0.5 * a[:, None], (-0.5 / p) * solves], 1)
    g_op = jax.vjp(lambda o: o @ V, op)[1](C)[0]
    g_noise = g * (0.5 * a @ a - (0.5 / p) * (solves * pz).sum())
    return g_op, g_noise, -g * a, jnp.zeros_like(eps)


_log_prob.defvjp(_log_prob_fwd, _log_prob_bwd)
_log_prob_jit = jax.jit(_log_prob, static_argnums=4)


class SimplexGPMarginal(Distribution):
    r"""Marginal distribution of the targets under a GP whose kernel matrix is the lattice operator:
    :math:`y \sim \mathcal N(m, K_{\text{lattice}} + \sigma_n^2 I)` (JAX / NumPyro).

    ``log_prob(y)`` runs preconditioned CG on :math:`A = K + \sigma_n^2 I` for :math:`a = A^{-1}(y - m)`
    and for ``num_probes`` probes :math:`z_i \sim \mathcal N(0, P)` at once, with
    :math:`P = L L^\top + \sigma_n^2 I` and :math:`L` the rank-``precond_rank`` pivoted Cholesky
    factor of :math:`K`; the log-determinant is :math:`\log\det P` plus stochastic Lanczos
    quadrature of :math:`\log\det P^{-1/2} A P^{-1/2}` from the CG coefficients
    (:mod:`scalegp.krylov`; mBCG [2]). Its gradient (a ``custom_vjp``) is the standard estimator

    .. math::

        \frac{\partial \log p}{\partial\theta} = \tfrac12 a^\top \frac{\partial K}{\partial\theta} a
        - \tfrac12 \frac1p \sum_i (A^{-1} z_i)^\top \frac{\partial K}{\partial\theta} (P^{-1} z_i),
        \qquad \frac{\partial \log p}{\partial \sigma_n^2} = \tfrac12 a^\top a
        - \tfrac12 \frac1p \sum_i (A^{-1} z_i)^\top P^{-1} z_i,

    whose probe terms estimate :math:`-\tfrac12 \operatorname{tr}(A^{-1}\partial A)` without bias, with the
    :math:`\partial K` products taken from the operator's own vector-Jacobian product (one product
    of ``1 + num_probes`` columns) and :math:`\partial \log p / \partial m = a`. The value and the
    gradient are estimates: exact up to the CG tolerance for the quadratic term, stochastic for the
    log-determinant. Use it as ``numpyro.sample("y", SimplexGPMarginal(kernel, X, noise), obs=y)``
    under ``SVI`` with ``jit`` (the lattice is then rebuilt inside the jitted step, see
    :class:`LatticeKernelOperator`).

    :param kernel: ``numpyro_scalegp.kernels`` RBF, Exponential, Matern32 or Matern52.
    :param X: ``(N, d)`` training inputs.
    :param noise: positive scalar noise variance.
    :param order: stencil order of the lattice.
    :param mean: ``None`` (zero), a scalar or an ``(N,)`` array (held as ``loc``).
    :param cg_tol: CG tolerance on each column's relative residual norm.
    :param max_cg_iter: CG iteration cap (the first ``min(max_cg_iter, 100)`` steps make the
        Lanczos tridiagonals).
    :param num_probes: probe vectors of the log-determinant.
    :param precond_rank: rank of the pivoted-Cholesky preconditioner, ``0..N`` (``0``:
        :math:`P = \sigma_n^2 I`; ``None``: 15, at most ``N``).
    :param key: ``jax.random`` key of the probes; ``None`` uses ``PRNGKey(0)``, so the objective is
        a fixed (deterministic) function of the parameters. Pass ``key=numpyro.prng_key()`` inside
        a model for fresh probes at every step.
    :param backend: as :class:`LatticeKernelOperator`.

    .. note:: Cost: one lattice build, ``precond_rank`` single-column products, then
       ``O(I (N d + M d r)(1 + p))`` for ``I`` CG iterations and ``p`` probes, the eigen-decompositions
       of ``p`` tridiagonals of size at most 100, and one vector-Jacobian product of ``1 + p``
       columns for the gradient; memory ``O((N + M)(1 + p) + N\, \mathrm{precond\_rank})``.
    """

    arg_constraints = {"noise": constraints.positive, "loc": constraints.real}
    support = constraints.real_vector
    reparametrized_params = ["noise", "loc"]
    pytree_data_fields = ("kernel", "op", "noise", "loc", "key")
    pytree_aux_fields = ("order", "cg_tol", "max_cg_iter", "num_probes", "precond_rank")

    def __init__(self, kernel, X, noise, *, order: int = 1, mean=None, cg_tol: float = 1e-3,
                 max_cg_iter: int = 1000, num_probes: int = 16, precond_rank: int | None = None, key=None,
                 backend: str = "auto", validate_args: bool | None = None):
        X = jnp.asarray(X)
        X = X[:, None] if X.ndim == 1 else X
        precond_rank = krylov.check_solver_options(X.shape[0], cg_tol=cg_tol, max_cg_iter=max_cg_iter,
                                                   num_probes=num_probes, precond_rank=precond_rank)
        if jnp.ndim(noise) != 0:
            raise ValueError(f"noise: expected a scalar, got shape {jnp.shape(noise)}")
        noise = _check_positive("noise", noise)
        self.op = LatticeKernelOperator(X, kernel, order=order, backend=backend)
        n = self.op.shape[0]
        self.kernel, self.order = kernel, int(order)
        dtype = self.op.X.dtype
        self.noise = jnp.asarray(noise, dtype)
        self.loc = jnp.asarray(_as_loc(mean, n, dtype), dtype)
        self.key = jax.random.PRNGKey(0) if key is None else key
        self.cg_tol, self.max_cg_iter, self.num_probes = float(cg_tol), int(max_cg_iter), int(num_probes)
        self.precond_rank = precond_rank
        super().__init__(batch_shape=(), event_shape=(n,), validate_args=validate_args)

    @property
    def X(self):
        return self.op.X

    def _cfg(self) -> tuple:
        return (self.cg_tol, self.max_cg_iter, self.precond_rank)

    def _check_y(self, y, name: str):
        y = jnp.asarray(y, self.X.dtype)
        if y.shape != self.event_shape:
            raise ValueError(f"{name}: expected shape {tuple(self.event_shape)}, got {tuple(y.shape)}")
        _check_finite(name, y)
        return y

    def probes(self):
        """The standard-normal draws behind the probes, ``(N + precond_rank, num_probes)``
        (:math:`z = L\\epsilon_{:k} + \\sigma_n \\epsilon_{k:}`)."""
        n = self.event_shape[0]
        return jax.random.normal(self.key, (n + self.precond_rank, self.num_probes), self.X.dtype)

    def log_prob(self, value):
        """The estimate of :math:`\\log \\mathcal N(y \\mid m, K + \\sigma_n^2 I)` (a scalar)."""
        y = self._check_y(value, "y")
        return _log_prob_jit(self.op, self.noise, y - self.loc, self.probes(), self._cfg())

    def sample(self, key, sample_shape=()):
        """Draws of :math:`y \\sim \\mathcal N(m, K + \\sigma_n^2 I)`, exact for the lattice operator :math:`K`
        (:meth:`LatticeKernelOperator.prior_samples`), shape ``sample_shape + (N,)``: what NumPyro's
        ``Predictive`` draws at an unobserved site. Not differentiable. Cost: half a product per draw."""
        n = self.event_shape[0]
        num = math.prod(sample_shape)
        kf, ke = jax.random.split(key)
        f = self.op.prior_samples(kf, num)
        e = jnp.sqrt(self.noise) * jax.random.normal(ke, (num, n), self.X.dtype)
        return jax.lax.stop_gradient(self.loc + f + e).reshape(tuple(sample_shape) + (n,))

    def predict(self, y, X_new, *, noiseless: bool = False, chunk: int = 256, variance_rank: int | None = None,
                neighbors: int | None = None, progress_bar: bool = False):
        r"""Predictive distribution at ``X_new`` given ``y``, from one lattice on ``[X; X_new]``:
        with :math:`A = K_{XX} + \sigma_n^2 I` (blocks of the joint operator, so the joint prior is
        PSD and variances are non-negative), mean :math:`m + K_{*X} A^{-1}(y - m)` by preconditioned
        CG and variance :math:`\sigma^2 - \operatorname{diag}(K_{*X} A^{-1} K_{X*})` (plus the noise
        unless ``noiseless``). Needs concrete hyperparameters (call it outside ``jit``) and a constant
        mean.

        :param chunk: with ``variance_rank=None``, the variances come from CG solves of ``chunk``
            test columns at a time (as the Pyro frontend computes them).
        :param variance_rank: an integer ``k`` replaces those solves by ``k`` Lanczos steps on
            :math:`A` started at :math:`K_{X*} 1` (LOVE [4]):
            :math:`K_{*X} A^{-1} K_{X*} \approx K_{*X} Q T^{-1} Q^\top K_{X*}`, which never exceeds
            the exact term, so the variances err on the large (conservative) side.
        :param neighbors: an integer ``k`` takes each test point's variance from its ``k`` nearest
            training points under the exact kernel (:mod:`scalegp.neighbors`): never below the
            exact GP's variance, equal to it with ``k = N``, and close to it with a few hundred on
            data much larger than the lengthscales (the fast choice for large ``N``; on flights
            LOVE's variances are far too large).
        :param progress_bar: show a progress bar over the test points while their variances are
            computed (by chunks of CG solves, or by neighbours).
        :returns: ``numpyro.distributions.Normal(mean, scale).to_event(1)`` over ``(T,)``.

        .. note:: Cost: a joint build and one CG solve for the mean; variances by ``O(T / chunk)`` CG
           solves of ``chunk`` columns, or with ``variance_rank = k`` by ``k`` single-column products,
           ``O(N k^2)`` reorthogonalization and one product of ``k`` columns, whatever ``T``, or with
           ``neighbors = k`` by ``O(T k^3)`` (see :mod:`scalegp.neighbors`).
        """
        y = self._check_y(y, "y")
        X_new = jnp.asarray(X_new, self.X.dtype)
        X_new = X_new[:, None] if X_new.ndim == 1 else X_new
        n = self.X.shape[0]  # (X_new's shape: checked by the joint operator below)
        if jnp.ndim(self.loc) != 0:
            raise ValueError("mean: predict needs a constant (scalar) mean")
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"chunk: must be a positive integer, got {chunk!r}")
        if variance_rank is not None and (not isinstance(variance_rank, (int, np.integer))
                                          or not 1 <= variance_rank <= n):
            raise ValueError(f"variance_rank: must be None or an integer in [1, {n}], got {variance_rank!r}")
        check_neighbors(neighbors, variance_rank, n)
        joint = self.op.joint(X_new)
        t = X_new.shape[0]
        cfg = self._cfg()
        alpha = self._solve(joint, (y - self.loc)[:, None], n, cfg)
        mean = self.loc + _test_block(joint, n)(alpha)[:, 0]
        if neighbors is not None:
            var = jnp.asarray(neighbor_variances(self.X, X_new, neighbors, kernel=self.op.kernel_name,
                                                 lengthscale=self.op.lengthscale, variance=self.op.variance,
                                                 noise=self.noise, progress_bar=progress_bar), self.X.dtype)
            return Normal(mean, jnp.sqrt(var if noiseless else var + self.noise)).to_event(1)
        if variance_rank is not None:
            start = (joint @ jnp.concatenate([jnp.zeros(n, self.X.dtype), jnp.ones(t, self.X.dtype)]))[:n]
            reduction = (_lanczos_cross(joint, self.noise, start, n, int(variance_rank)) ** 2).sum(0)
        else:
            width = min(chunk, t)
            reduction = []
            with tqdm(total=t, desc="Simplex-GP variances", unit="point", disable=not progress_bar) as bar:
                for s in range(0, t, width):
                    cols = jnp.minimum(jnp.arange(s, s + width), t - 1)  # the last chunk repeats a column: one shape
                    onehot = jnp.zeros((n + t, width), self.X.dtype).at[n + cols, jnp.arange(width)].set(1)
                    kx = (joint @ onehot)[:n]  # N x width: K_{X, *}
                    reduction.append((kx * self._solve(joint, kx, n, cfg)).sum(0))
                    bar.update(min(width, t - s))
            reduction = jnp.concatenate(reduction)[:t]
        var = (self.op.variance - reduction).clip(0)
        var = var if noiseless else var + self.noise
        return Normal(mean, jnp.sqrt(var)).to_event(1)

    def _solve(self, joint, B, n: int, cfg: tuple):
        x, rel = _solve(joint, self.noise, B, n, cfg)
        krylov.warn_unconverged("SimplexGPMarginal.predict", rel, self.cg_tol, self.max_cg_iter)
        return x

    @property
    def mean(self):
        return jnp.broadcast_to(self.loc, self.event_shape)

    @property
    def variance(self):
        return jnp.broadcast_to(self.op.variance + self.noise, self.event_shape)
