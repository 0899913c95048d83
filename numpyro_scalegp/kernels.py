"""Stationary kernels for the NumPyro frontend, matching ``pyro.contrib.gp.kernels``.

Each kernel is a plain pytree holding its hyperparameters (``variance``, ARD
``lengthscale``) as leaves; nothing closes over parameters, so a kernel can be
built inside a model from ``numpyro.sample``/``numpyro.param`` values, passed
through ``jit``, ``grad`` and ``vmap``, and rebuilt with new values by
:func:`jax.tree_util.tree_map`. Values equal Pyro's for the same parameters:

.. math::

    r = \\Big\\|\\frac{x - z}{\\ell}\\Big\\|, \\quad
    k_{\\mathrm{RBF}} = \\sigma^2 e^{-r^2/2}, \\quad
    k_{\\mathrm{Exp}} = \\sigma^2 e^{-r}, \\quad
    k_{3/2} = \\sigma^2 (1 + \\sqrt3 r) e^{-\\sqrt3 r}, \\quad
    k_{5/2} = \\sigma^2 (1 + \\sqrt5 r + \\tfrac53 r^2) e^{-\\sqrt5 r}.

.. note:: Cost: ``O(N M d)`` time and ``O(N M)`` memory for an ``N x M`` block.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from scalegp.kernel_shapes import check_active_columns, check_lengthscale_shape

__all__ = ["Kernel", "Isotropy", "RBF", "Exponential", "Matern32", "Matern52", "Periodic", "Linear", "Product",
           "isotropic_gram", "isotropic_gram_vjp"]


def _safe_sqrt(r2):
    # the gradient of sqrt at 0 is infinite; r = 0 only on the diagonal where k is smooth in r^2
    positive = r2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


class Kernel:
    """Base class: ``kernel(X, Z=None, diag=False)`` returns the ``(..., N, M)`` matrix
    (or its diagonal), batching over any leading axes of ``X`` and ``Z``."""

    def __call__(self, X, Z=None, diag=False):
        raise NotImplementedError

    def columns(self) -> tuple:
        """The input columns the kernel reads (its ``active_dims``; a product's, both factors')."""
        return tuple(getattr(self, "active_dims", ()))

    def check_inputs(self, X, name: str = "X") -> None:
        """``ValueError`` naming ``name`` if the kernel reads a column that ``X`` (``(..., N, d)`` or
        ``(N,)``) lacks: JAX's indexing would read the last one in its place."""
        check_active_columns(self.columns(), 1 if jnp.ndim(X) == 1 else jnp.shape(X)[-1], name)


@jax.tree_util.register_pytree_node_class
class Isotropy(Kernel):
    """A kernel of the scaled distance ``r = ||(x - z) / lengthscale||``.

    :param input_dim: number of input columns the kernel reads.
    :param variance: signal variance ``sigma^2`` (positive).
    :param lengthscale: scalar or ``(input_dim,)`` ARD lengthscales (positive).
    :param active_dims: the input columns used (default ``range(input_dim)``).
    """

    def __init__(self, input_dim: int, variance=1.0, lengthscale=1.0, active_dims=None):
        self.input_dim = int(input_dim)
        self.variance = variance
        self.lengthscale = lengthscale
        self.active_dims = _check_active_dims(self.input_dim, active_dims)
        check_lengthscale_shape(jnp.shape(lengthscale), self.input_dim)

    def tree_flatten(self):
        return (self.variance, self.lengthscale), (self.input_dim, self.active_dims)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.variance, obj.lengthscale = children
        obj.input_dim, obj.active_dims = aux
        return obj

    def __repr__(self):
        return f"{type(self).__name__}(input_dim={self.input_dim}, variance={self.variance}, lengthscale={self.lengthscale})"

    def _slice(self, X):
        X = jnp.asarray(X)
        if X.ndim == 1:
            return X[:, None]
        if self.active_dims == tuple(range(X.shape[-1])):
            return X
        return X[..., jnp.array(self.active_dims)]

    def square_scaled_dist(self, X, Z=None):
        """``||(x - z) / lengthscale||^2`` for every pair, shape ``(..., N, M)``."""
        Xs = self._slice(X) / self.lengthscale
        Zs = Xs if Z is None else self._slice(Z) / self.lengthscale
        X2 = (Xs**2).sum(-1)[..., :, None]
        Z2 = (Zs**2).sum(-1)[..., None, :]
        r2 = X2 - 2.0 * jnp.einsum("...nd,...md->...nm", Xs, Zs) + Z2
        if Z is None:  # exact zeros on the diagonal (the expansion leaves ~1e-16, whose sqrt is ~1e-8)
            r2 = jnp.where(jnp.eye(r2.shape[-1], dtype=bool), 0.0, r2)
        return jnp.clip(r2, 0.0)

    def profile(self, r2):
        """The kernel as a function of the squared scaled distance, with unit variance."""
        raise NotImplementedError

    #: ``dprofile(r2)``: the derivative of :meth:`profile` with respect to ``r2`` (defined by
    #: the kernels below; :func:`isotropic_gram` needs it)
    dprofile = None

    def __call__(self, X, Z=None, diag=False):
        if diag:
            X = self._slice(X)
            return jnp.broadcast_to(jnp.asarray(self.variance, X.dtype), X.shape[:-1])
        return self.variance * self.profile(self.square_scaled_dist(X, Z))


@jax.tree_util.register_pytree_node_class
class RBF(Isotropy):
    """Squared exponential: ``sigma^2 exp(-r^2 / 2)``."""

    def profile(self, r2):
        return jnp.exp(-0.5 * r2)

    def dprofile(self, r2):
        return -0.5 * jnp.exp(-0.5 * r2)


@jax.tree_util.register_pytree_node_class
class Exponential(Isotropy):
    """Matern 1/2: ``sigma^2 exp(-r)``."""

    def profile(self, r2):
        return jnp.exp(-_safe_sqrt(r2))

    def dprofile(self, r2):  # -exp(-r) / (2 r); 0 at r = 0, as autodiff through _safe_sqrt gives
        r = _safe_sqrt(r2)
        return jnp.where(r > 0, -0.5 * jnp.exp(-r) / jnp.where(r > 0, r, 1.0), 0.0)


@jax.tree_util.register_pytree_node_class
class Matern32(Isotropy):
    """Matern 3/2: ``sigma^2 (1 + sqrt(3) r) exp(-sqrt(3) r)``."""

    def profile(self, r2):
        s = jnp.sqrt(3.0) * _safe_sqrt(r2)
        return (1.0 + s) * jnp.exp(-s)

    def dprofile(self, r2):
        return -1.5 * jnp.exp(-jnp.sqrt(3.0) * _safe_sqrt(r2))


@jax.tree_util.register_pytree_node_class
class Matern52(Isotropy):
    """Matern 5/2: ``sigma^2 (1 + sqrt(5) r + 5 r^2 / 3) exp(-sqrt(5) r)``."""

    def profile(self, r2):
        s = jnp.sqrt(5.0) * _safe_sqrt(r2)
        return (1.0 + s + s**2 / 3.0) * jnp.exp(-s)

    def dprofile(self, r2):
        s = jnp.sqrt(5.0) * _safe_sqrt(r2)
        return -(5.0 / 6.0) * (1.0 + s) * jnp.exp(-s)


def _gram_parts(kernel: Isotropy, X):
    r2 = kernel.square_scaled_dist(X)
    return r2, kernel.profile(r2)


def _symmetric_cotangents(kernel: Isotropy, X, r2, p, G):
    """The cotangents of :func:`isotropic_gram_vjp` for a symmetric ``G``, one per leading index."""
    variance, lengthscale = jnp.asarray(kernel.variance), jnp.asarray(kernel.lengthscale)
    Xs = kernel._slice(X) / lengthscale
    W = variance * G * jnp.where(r2 > 0, kernel.dprofile(r2), 0.0)
    # W is symmetric: one product with [x, 1] gives both W x and the row sums
    WX = W @ jnp.concatenate([Xs, jnp.ones_like(Xs[..., :1])], -1)
    d_Xs = 4.0 * (WX[..., -1:] * Xs - WX[..., :-1])
    batch = G.shape[:-2]
    d_ls = -jnp.sum(d_Xs * Xs, -2) / lengthscale
    d_ls = (d_ls if lengthscale.ndim else d_ls.sum(-1)).astype(lengthscale.dtype).reshape(batch + lengthscale.shape)
    d_var = jnp.sum(G * p, (-2, -1)).astype(variance.dtype).reshape(batch + variance.shape)
    d_cols = d_Xs / lengthscale
    if X.ndim == 1:
        d_X = d_cols[..., 0]
    elif kernel.active_dims == tuple(range(X.shape[-1])):
        d_X = d_cols
    else:
        d_X = jnp.zeros_like(X).at[..., jnp.array(kernel.active_dims)].add(d_cols)
    d_kernel = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(kernel), [d_var, d_ls])
    return d_kernel, d_X.astype(X.dtype)


def isotropic_gram_vjp(kernel: Isotropy, X):
    r"""``(kernel(X), vjp)`` for an :class:`Isotropy` kernel with :meth:`~Isotropy.dprofile`
    and inputs ``X (..., n, d)``: ``vjp(G)`` takes a **symmetric** cotangent ``G (..., n, n)``
    and returns the kernel's cotangent (leaves ``(...,) + leaf shape``: one per leading index,
    not summed) and that of ``X``.

    With :math:`\tilde x = x / \ell`, :math:`K = \sigma^2 p(r^2)` and
    :math:`W = \sigma^2 G \circ p'(r^2)` (zero where :math:`r^2 = 0`), symmetric as ``G`` is:

    .. math::

        \bar\sigma^2 = \textstyle\sum G \circ p, \quad
        \bar{\tilde x}_i = 4 \big((\textstyle\sum_j W_{ij})\, \tilde x_i - (W \tilde x)_i\big), \quad
        \bar\ell = -\textstyle\sum_i \bar{\tilde x}_i \circ \tilde x_i / \ell, \quad
        \bar x = \bar{\tilde x} / \ell.

    :class:`~numpyro_scalegp.HGPMarginal` uses it directly, its ``G`` being symmetric
    (``1/2 (a a^T - K^-1)``); :func:`isotropic_gram` symmetrizes any ``G`` first.

    .. note:: Cost: ``O(n^2 d)`` flops, as the forward pass; ``W`` is read once.
    """
    r2, p = _gram_parts(kernel, X)
    return kernel.variance * p, partial(_symmetric_cotangents, kernel, X, r2, p)


@jax.custom_vjp
def isotropic_gram(kernel: Isotropy, X):
    r"""``kernel(X)`` for an :class:`Isotropy` kernel with :meth:`~Isotropy.dprofile`, whose
    reverse-mode derivative is written out instead of traced (reverse mode only; no ``jvp``):
    :func:`isotropic_gram_vjp` applied to the symmetric part of the cotangent (``K`` is
    symmetric, so only that part counts), summed over the leading axes of ``X``.

    The same values as autodiff of ``kernel(X)``, in fewer passes over the ``n x n`` entries.

    .. note:: Cost: ``O(n^2 d)`` flops, as the forward pass.
    """
    return kernel(X)


def _isotropic_gram_fwd(kernel, X):
    r2, p = _gram_parts(kernel, X)
    return kernel.variance * p, (kernel, X, r2, p)


def _isotropic_gram_bwd(res, G):
    kernel, X, r2, p = res
    d_kernel, d_X = _symmetric_cotangents(kernel, X, r2, p, 0.5 * (G + jnp.swapaxes(G, -1, -2)))
    batch = tuple(range(G.ndim - 2))
    return jax.tree_util.tree_map(lambda t: t.sum(batch), d_kernel), d_X


isotropic_gram.defvjp(_isotropic_gram_fwd, _isotropic_gram_bwd)


def _columns(X, active_dims):
    X = jnp.asarray(X)
    if X.ndim == 1:
        return X[:, None]
    if active_dims == tuple(range(X.shape[-1])):
        return X
    return X[..., jnp.array(active_dims)]


def _check_active_dims(input_dim, active_dims):
    active_dims = tuple(range(input_dim)) if active_dims is None else tuple(active_dims)
    if len(active_dims) != input_dim:
        raise ValueError(f"active_dims: expected {input_dim} columns, got {len(active_dims)}")
    return active_dims


@jax.tree_util.register_pytree_node_class
class Periodic(Kernel):
    """Periodic (exp-sine-squared) kernel, as ``pyro.contrib.gp.kernels.Periodic``:

    .. math::

        k(x, z) = \\sigma^2 \\exp\\Big(-2 \\sum_j
            \\frac{\\sin^2(\\pi (x_j - z_j) / p)}{\\ell_j^2}\\Big).

    :param input_dim: number of input columns the kernel reads.
    :param variance: ``sigma^2`` (positive).
    :param lengthscale: scalar or ``(input_dim,)`` lengthscales ``ell`` (positive).
    :param period: the period ``p`` (positive).
    :param active_dims: the input columns used (default ``range(input_dim)``).

    .. note:: Cost: ``O(N M d)`` time and memory for an ``N x M`` block.
    """

    def __init__(self, input_dim: int, variance=1.0, lengthscale=1.0, period=1.0, active_dims=None):
        self.input_dim = int(input_dim)
        self.variance, self.lengthscale, self.period = variance, lengthscale, period
        self.active_dims = _check_active_dims(self.input_dim, active_dims)
        check_lengthscale_shape(jnp.shape(lengthscale), self.input_dim)

    def tree_flatten(self):
        return (self.variance, self.lengthscale, self.period), (self.input_dim, self.active_dims)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.variance, obj.lengthscale, obj.period = children
        obj.input_dim, obj.active_dims = aux
        return obj

    def __call__(self, X, Z=None, diag=False):
        X = _columns(X, self.active_dims)
        if diag:
            return jnp.broadcast_to(jnp.asarray(self.variance, X.dtype), X.shape[:-1])
        Z = X if Z is None else _columns(Z, self.active_dims)
        d = X[..., :, None, :] - Z[..., None, :, :]
        s = jnp.sin(jnp.pi * d / self.period) / self.lengthscale
        return self.variance * jnp.exp(-2.0 * (s**2).sum(-1))


@jax.tree_util.register_pytree_node_class
class Linear(Kernel):
    """Homogeneous linear kernel, as ``pyro.contrib.gp.kernels.Linear``:
    :math:`k(x, z) = \\sigma^2 x^\\top z`.

    :param input_dim: number of input columns the kernel reads.
    :param variance: ``sigma^2`` (positive).
    :param active_dims: the input columns used (default ``range(input_dim)``).

    .. note:: Cost: ``O(N M d)`` time and ``O(N M)`` memory for an ``N x M`` block.
    """

    def __init__(self, input_dim: int, variance=1.0, active_dims=None):
        self.input_dim = int(input_dim)
        self.variance = variance
        self.active_dims = _check_active_dims(self.input_dim, active_dims)

    def tree_flatten(self):
        return (self.variance,), (self.input_dim, self.active_dims)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        (obj.variance,) = children
        obj.input_dim, obj.active_dims = aux
        return obj

    def __call__(self, X, Z=None, diag=False):
        X = _columns(X, self.active_dims)
        if diag:
            return self.variance * (X**2).sum(-1)
        Z = X if Z is None else _columns(Z, self.active_dims)
        return self.variance * jnp.einsum("...nd,...md->...nm", X, Z)


@jax.tree_util.register_pytree_node_class
class Product(Kernel):
    """Product of two kernels, as ``pyro.contrib.gp.kernels.Product``:
    :math:`k(x, z) = k_0(x, z)\\, k_1(x, z)`; each factor reads its own ``active_dims``.

    .. note:: Cost: the sum of the factors' costs.
    """

    def __init__(self, kern0: Kernel, kern1: Kernel):
        for name, k in (("kern0", kern0), ("kern1", kern1)):
            if not isinstance(k, Kernel):
                raise ValueError(f"{name}: expected a Kernel, got {type(k).__name__}")
        self.kern0, self.kern1 = kern0, kern1

    def tree_flatten(self):
        return (self.kern0, self.kern1), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.kern0, obj.kern1 = children
        return obj

    def columns(self) -> tuple:
        return tuple(sorted(set(self.kern0.columns()) | set(self.kern1.columns())))

    def __call__(self, X, Z=None, diag=False):
        return self.kern0(X, Z, diag=diag) * self.kern1(X, Z, diag=diag)
