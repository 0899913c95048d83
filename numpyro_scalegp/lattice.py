r"""Simplex-GP kernel operator on the permutohedral lattice, for JAX / NumPyro (paper 002 [1]).

The same operator as :class:`pyro_scalegp.lattice.LatticeKernelOperator`, with the same maths
(:mod:`scalegp.lattice`) and the same CPU build of ``kernels_cuda``:

.. math::

    K \approx \sigma^2 D^{-1/2} W^\top C^\top C W D^{-1/2}.

The lattice is built eagerly, outside ``jit``, from concrete ``X`` and lengthscales (its size is
data-dependent); the operator is then a pytree (leaves ``X``, ``lengthscale``, ``variance``; the
lattice is static) whose products run inside ``jit``, ``grad`` and ``vmap``. The filter is a
``jax.pure_callback`` into the CPU build wrapped in a ``custom_vjp`` whose backward is the
transposed filtering (the operator is symmetric) and the weight gradient
:math:`g_i^\top (BWu)_{a_{ik}} + u_i^\top (BWg)_{a_{ik}}`; the barycentric weights and the diagonal
calibration are differentiated by JAX. Gradients with respect to ``X`` and the lengthscales hold
the lattice fixed (exact derivatives of the forward map between lattice rebuilds).

References: [1] Kapoor, Finzi, Wang, Wilson, ICML 2021.

.. note:: Cost: as the torch operator: build ``O(N d^2 + M d r)`` plus the exact diagonal, each
   product ``O((N d + M d r) c)`` for ``c`` columns, plus a host round trip per callback.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cuda.dispatch import build_lattice
from scalegp import lattice as sl

from . import kernels as nk

__all__ = ["LatticeKernelOperator", "kernel_name"]

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
    """The lattice of one concrete ``(X, lengthscale)`` (host arrays) and its filter with gradients."""

    def __init__(self, X: np.ndarray, ell: np.ndarray, name: str, order: int):
        n, d = X.shape
        sl.check_memory(n, d, order, 1, X.dtype.itemsize)
        st = sl.stencil(name, order)
        scale = sl.elevation_scale(d, st)
        self.proj = sl.elevation_matrix(d) * scale[None, :]
        self.impl = build_lattice(np.ascontiguousarray(X / ell), scale.astype(X.dtype), order, backend="cpu")
        self.coef = st.coef.astype(X.dtype)
        self.vid, self.rank, self.greedy = self.impl.vid, self.impl.rank, self.impl.greedy.astype(X.dtype)
        self.gram = self.impl.local_gram(self.coef)
        self.n, self.d = n, d
        self.filter = self._make_filter()

    def _host(self, method):
        def call(w, u):
            return getattr(self.impl, method)(np.asarray(u), self.coef, np.asarray(w)).astype(u.dtype)

        return call

    def _make_filter(self):
        filt, sblur = self._host("filter"), self._host("splat_blur")
        m = self.impl.m

        def run(fn, shape, w, u):
            return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, u.dtype), w, u, vmap_method="sequential")

        @jax.custom_vjp
        def f(w, u):
            return run(filt, u.shape, w, u)

        def fwd(w, u):
            return f(w, u), (w, u)

        def bwd(res, g):
            w, u = res
            q = run(sblur, (m, u.shape[1]), w, u)[self.vid]  # N x (d+1) x c
            p = run(sblur, (m, g.shape[1]), w, g)[self.vid]
            grad_w = (g[:, None, :] * q).sum(-1) + (u[:, None, :] * p).sum(-1)
            return grad_w, run(filt, g.shape, w, g)

        f.defvjp(fwd, bwd)
        return f

    def weights(self, X, ell):
        d = self.d
        el = (X / ell) @ jnp.asarray(self.proj, X.dtype).T
        delta = (el - self.greedy) / (d + 1)
        rows = jnp.arange(X.shape[0])[:, None]
        b = jnp.zeros((X.shape[0], d + 2), X.dtype)
        b = b.at[rows, d - self.rank].add(delta).at[rows, d + 1 - self.rank].add(-delta)
        return b[:, : d + 1].at[:, 0].add(1 + b[:, d + 1])


@jax.tree_util.register_pytree_node_class
class LatticeKernelOperator:
    r"""The kernel matrix :math:`K_{XX}` of ``kernel`` as a lattice operator (JAX).

    :param X: ``(N, d)`` inputs (concrete: the lattice is built here, outside ``jit``).
    :param kernel: a ``numpyro_scalegp.kernels`` RBF, Exponential, Matern32 or Matern52.
    :param order: stencil order ``r`` (``2r+1`` taps per lattice direction).
    :param backend: ``"auto"`` or ``"cpu"`` (the JAX frontend calls the CPU build).

    ``op @ v`` with ``v`` of shape ``(N,)`` or ``(N, c)``; works under ``jit``, ``grad``
    (``v``, ``X``, ``lengthscale``, ``variance``) and ``vmap``.

    .. note:: Cost: see the module note.
    """

    def __init__(self, X, kernel, *, order: int = 1, backend: str = "auto"):
        if backend not in ("auto", "cpu"):
            raise ValueError(f"backend: the JAX frontend runs the CPU build ('auto' or 'cpu'), got {backend!r}")
        name = kernel_name(kernel)
        try:
            Xh = np.asarray(kernel._slice(X))
            ellh, varh = np.asarray(kernel.lengthscale), np.asarray(kernel.variance)
        except jax.errors.TracerArrayConversionError as err:
            raise ValueError("X: the lattice is built from concrete values; construct the operator outside jit") from err
        Xh, ellh = sl.validate_inputs(Xh, ellh, varh, name, order)
        self.X = jnp.asarray(Xh)
        self.lengthscale = jnp.asarray(ellh, self.X.dtype)
        self.variance = jnp.asarray(varh, self.X.dtype)
        self.order, self.kernel_name = int(order), name
        self.lattice = _Lattice(Xh, ellh.astype(Xh.dtype), name, self.order)

    def tree_flatten(self):
        return (self.X, self.lengthscale, self.variance), (self.lattice, self.order, self.kernel_name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.X, obj.lengthscale, obj.variance = children
        obj.lattice, obj.order, obj.kernel_name = aux
        return obj

    @property
    def shape(self):
        return (self.X.shape[0], self.X.shape[0])

    def diagonal(self):
        """The exact diagonal: the variance, by construction."""
        return jnp.full(self.X.shape[0], self.variance, self.X.dtype)

    def matmul(self, v):
        v = jnp.asarray(v, self.X.dtype)
        n = self.X.shape[0]
        if v.shape[0] != n or v.ndim not in (1, 2):
            raise ValueError(f"v: expected shape ({n},) or ({n}, c), got {v.shape}")
        u = v[:, None] if v.ndim == 1 else v
        lat = self.lattice
        w = lat.weights(self.X, self.lengthscale)
        s = jax.lax.rsqrt(jnp.einsum("nk,nkl,nl->n", w, jnp.asarray(lat.gram), w))
        out = self.variance * s[:, None] * lat.filter(w, s[:, None] * u)
        return out[:, 0] if v.ndim == 1 else out

    __matmul__ = matmul
