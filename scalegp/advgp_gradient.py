r"""ADVGP's data term :math:`g_k` with its gradient written out, once for both frontends.

:func:`data_term_and_gradients` is the matrix part, written against an array namespace: NumPyro
runs it on ``jax.numpy`` inside its jitted gradients (the kernel's part by JAX's autodiff), the
Pyro frontend through :func:`rbf_data_term_and_gradients`, which adds Pyro's RBF kernel and its
derivatives: on torch in ``pyro_scalegp.advgp._RBFDataTerm``, on numpy in the workers of one thread
of ``AsyncProximalSVI``. With :math:`a = 1/(2\sigma^2)`, :math:`L = \mathrm{chol}(K_{zz})`
(``Kzz`` with its jitter), :math:`T = L^{-1}K_{zx}K_{xz}L^{-\top}`, :math:`c = L^{-1}K_{zx}y`,
:math:`S` = ``scale_tril`` and :math:`q` the bracket of

.. math::

    g_k = \tfrac{n}{2}\log 2\pi\sigma^2 + \tfrac{q}{2\sigma^2}, \qquad
    q = y^\top y - 2\mu^\top c + \mu^\top T\mu + \mathrm{tr}(S^\top T S) + \textstyle\sum_i k(x_i, x_i)
        - \mathrm{tr}\,T

(the module docstring of :mod:`pyro_scalegp.advgp` derives it), the gradients are

.. math::

    \bar\mu = 2a(T\mu - c), \quad \bar S = 2aTS, \quad
    \bar\sigma^2 = \tfrac{n}{2\sigma^2} - \tfrac{q}{2\sigma^4}, \quad
    \bar k_{xx} = a, \quad \bar y = 2ay + K_{xz}\bar b,

    \bar T = a(\mu\mu^\top + SS^\top - I), \quad \bar b = -2aL^{-\top}\mu, \quad
    \bar L = \mathrm{tril}(-2L^{-\top}\bar T T - \bar b c^\top), \quad
    \bar K_{zz} = \mathrm{sym}\big(L^{-\top}\Phi(L^\top\bar L)L^{-1}\big), \quad
    \bar K_{zx} = 2L^{-\top}\bar T L^{-1} K_{zx} + \bar b y^\top

(:math:`\Phi`: the lower triangle with the diagonal halved, :math:`\mathrm{sym}(B) = (B + B^\top)/2`;
:math:`L^{-1}` is formed, ``M x M``). Checked against autodiff of the plain formula in both
frontends (``tests/test_advgp.py``).

Why written out: autograd records some 190 small operations for :math:`g_k` and its backward,
whose dispatch costs more than their arithmetic at minibatch sizes (torch, M = 50, d = 8, one
thread: 1.14 -> 0.54 ms for 256 rows); JAX's autodiff of the value records the Cholesky's and the
triangular solves' own rules instead, about 1.4x the CPU time. numpy dispatches faster again than
torch (0.89 -> 0.59 ms for the RBF term, M = 50, 256 rows).

.. note:: Cost: ``O(M^3 + n M^2 + n M d)`` time and ``O(n M)`` memory, as the value.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular as _solve_triangular

__all__ = ["data_term_and_gradients", "rbf_data_term_and_gradients"]


def data_term_and_gradients(Kzz, Kzx, kxx, y, loc, scale_tril, noise, *, xp=np, solve_triangular=_solve_triangular):
    r"""The data term :math:`g_k` and its gradients with respect to ``(Kzz, Kzx, kxx, y, loc,
    scale_tril, noise)`` (module docstring), ``kxx`` being :math:`\sum_i k(x_i, x_i)`.

    :param xp: the array namespace: ``numpy``, ``jax.numpy`` or ``torch``.
    :param solve_triangular: ``solve_triangular(L, B, lower=True)`` of that namespace (scipy's
        signature).
    """
    eye = xp.diag(xp.ones_like(xp.diagonal(Kzz)))  # (on Kzz's device)
    L = xp.linalg.cholesky(Kzz)
    Li = solve_triangular(L, eye, lower=True)
    T = Li @ (Kzx @ Kzx.T) @ Li.T
    c = Li @ (Kzx @ y)
    Tmu, TS = T @ loc, T @ scale_tril
    quad = y @ y - 2 * loc @ c + loc @ Tmu + (scale_tril * TS).sum() + kxx - xp.trace(T)
    n = y.shape[0]
    value = 0.5 * n * xp.log(2 * xp.pi * noise) + 0.5 * quad / noise
    a = 0.5 / noise
    G_T = a * (xp.outer(loc, loc) + scale_tril @ scale_tril.T - eye)
    G_b = Li.T @ (-2 * a * loc)
    LtG = Li.T @ G_T  # shared by the Cholesky factor's and K_zx's gradients
    P = L.T @ xp.tril(-2 * LtG @ T - xp.outer(G_b, c))
    P = Li.T @ (xp.tril(P) - 0.5 * xp.diag(xp.diagonal(P))) @ Li
    grads = (0.5 * (P + P.T), 2 * (LtG @ Li) @ Kzx + xp.outer(G_b, y), a, 2 * a * y + Kzx.T @ G_b,
             2 * a * (Tmu - c), 2 * a * TS, 0.5 * n / noise - 0.5 * quad / noise**2)
    return value, grads


def rbf_data_term_and_gradients(variance, lengthscale, Z, noise, loc, scale_tril, X, y, jitter: float, *, xp=np,
                                solve_triangular=_solve_triangular):
    r""":math:`g_k` for Pyro's RBF kernel :math:`k(a, b) = v\exp(-\tfrac12\sum_j (a_j - b_j)^2/\ell_j^2)`
    (``lengthscale`` of shape ``(d,)``, the scalars 0-d; ``xp`` and ``solve_triangular`` as for
    :func:`data_term_and_gradients`) and its gradients with respect to ``(variance, lengthscale, Z,
    noise, loc, scale_tril)``.

    Through the kernel, with :math:`W = \bar K \odot K` (:func:`data_term_and_gradients`' gradients
    of :math:`K_{zz}` and :math:`K_{zx}`): :math:`\bar v = an + \sum W / v` (the jitter excluded)
    and, with :math:`W` zeroed where the squared distance was clamped at 0 (as Pyro's kernel does),
    :math:`\bar z_i \mathrel{+}= -\sum_j W_{ij}(z_i - x_j)/\ell^2`,
    :math:`\bar\ell \mathrel{+}= \sum_{ij} W_{ij}(z_i - x_j)^2/\ell^3` for :math:`K_{zx}` and, with
    :math:`K_{zz}`'s two arguments, twice that for :math:`\bar K_{zz}`.

    .. note:: Cost: ``O(M^3 + n M^2 + n M d)``, as the value.
    """
    inv_l2 = lengthscale**-2
    zs = Z * inv_l2

    def kernel(B):  # K(Z, B) and the mask of unclamped squared distances, as Pyro computes them
        r2 = (Z * zs).sum(1)[:, None] + (B * B * inv_l2).sum(1)[None, :] - 2 * zs @ B.T
        return variance * xp.exp(-0.5 * xp.clip(r2, 0, None)), r2 >= 0

    Kzz, zz_mask = kernel(Z)
    Kzx, zx_mask = kernel(X)
    n = X.shape[0]
    value, (G_zz, G_zx, a, _, g_loc, g_scale, g_noise) = data_term_and_gradients(
        Kzz + jitter * xp.diag(xp.ones_like(xp.diagonal(Kzz))), Kzx, n * variance, y, loc, scale_tril, noise,
        xp=xp, solve_triangular=solve_triangular)
    W_zz, W_zx = G_zz * Kzz, G_zx * Kzx
    g_var = a * n + (W_zz.sum() + W_zx.sum()) / variance
    W_zz, W_zx = W_zz * zz_mask, W_zx * zx_mask  # the squared distances' share
    r_zx, r_zz = W_zx.sum(1), W_zz.sum(1)
    WX, WZ = W_zx @ X, W_zz @ Z
    g_Z = -((Z * r_zx[:, None] - WX) + 2 * (Z * r_zz[:, None] - WZ)) * inv_l2
    g_ell = ((Z * Z * r_zx[:, None]).sum(0) - 2 * (Z * WX).sum(0) + (X * X * W_zx.sum(0)[:, None]).sum(0)
             + 2 * ((Z * Z * r_zz[:, None]).sum(0) - (Z * WZ).sum(0))) / lengthscale**3
    return value, (g_var, g_ell, g_Z, g_noise, g_loc, g_scale)
