r"""Stochastic Lanczos quadrature from conjugate-gradient coefficients, written once (numpy / JAX).

The functions take the array namespace ``xp`` (``numpy`` or ``jax.numpy``) and use only
operations both provide, so the JAX frontend runs them inside ``jit`` and the tests check them
against numpy. (The torch frontend gets the same estimator from ``linear_operator``.)

Preconditioned CG on :math:`A x = z` with preconditioner :math:`P` and step sizes
:math:`\alpha_k`, :math:`\beta_k` is the Lanczos process on :math:`P^{-1/2} A P^{-1/2}` started at
:math:`P^{-1/2} z / \|P^{-1/2} z\|` [1]; its tridiagonal matrix is

.. math::

    T_{kk} = \frac{1}{\alpha_k} + \frac{\beta_{k-1}}{\alpha_{k-1}}, \qquad
    T_{k,k+1} = T_{k+1,k} = \frac{\sqrt{\beta_k}}{\alpha_k},

and Gauss quadrature with the eigen-decomposition :math:`T = V \Lambda V^\top` gives [2]

.. math::

    z^\top P^{-1/2} \log(P^{-1/2} A P^{-1/2}) P^{-1/2} z \approx
    \|P^{-1/2} z\|^2 \sum_j V_{0j}^2 \log \lambda_j .

With probes :math:`z_i \sim \mathcal N(0, P)` the average over probes estimates
:math:`\log\det A - \log\det P` without bias as the Lanczos steps grow.

References: [1] Saad, *Iterative Methods for Sparse Linear Systems*, 2003, section 6.7.3.
[2] Ubaru, Chen, Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017. [3] Gardner et al., GPyTorch
(mBCG), NeurIPS 2018.

.. note:: Cost: ``O(p L^3)`` for ``p`` probes and ``L`` recorded Lanczos steps (the
   eigen-decompositions of the tridiagonals); ``L`` is capped by :func:`lanczos_steps`.
"""
from __future__ import annotations

import numbers

__all__ = ["LANCZOS_CAP", "PRECOND_RANK", "check_solver_options", "lanczos_steps", "cg_tridiagonal", "slq_logdet",
           "warn_unconverged"]

#: at most this many Lanczos steps are recorded for the quadrature (as the torch frontend sets
#: ``linear_operator.settings.max_lanczos_quadrature_iterations``)
LANCZOS_CAP = 100
#: rank of the pivoted-Cholesky preconditioner where none is given (at most N)
PRECOND_RANK = 15


def check_solver_options(n: int, *, cg_tol, max_cg_iter, num_probes, precond_rank) -> int:
    """Check the CG / SLQ settings of a marginal on ``n`` points (``ValueError`` naming the one at fault)
    and return the preconditioner's rank: ``precond_rank``, an integer in ``0..n``, or for ``None``
    :data:`PRECOND_RANK` capped at ``n`` (a rank-``n`` factor is already the whole matrix)."""
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, numbers.Real) or not cg_tol > 0:
        raise ValueError(f"cg_tol: must be positive, got {cg_tol!r}")
    for name, val, lo in (("max_cg_iter", max_cg_iter, 1), ("num_probes", num_probes, 1),
                          ("precond_rank", PRECOND_RANK if precond_rank is None else precond_rank, 0)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < lo:
            raise ValueError(f"{name}: must be an integer >= {lo}, got {val!r}")
    if precond_rank is None:
        return min(PRECOND_RANK, int(n))
    if precond_rank > n:
        raise ValueError(f"precond_rank: at most N = {n}, got {precond_rank}")
    return int(precond_rank)


def lanczos_steps(max_cg_iter: int) -> int:
    """Lanczos steps recorded for the log-determinant: ``min(max_cg_iter, LANCZOS_CAP)``."""
    return min(int(max_cg_iter), LANCZOS_CAP)


def cg_tridiagonal(xp, alpha, beta, active):
    """Lanczos tridiagonals (``c x L x L``) from CG coefficients of ``c`` systems.

    :param xp: ``numpy`` or ``jax.numpy``.
    :param alpha: ``(L, c)`` step sizes :math:`\\alpha_k`.
    :param beta: ``(L, c)`` direction updates :math:`\\beta_k` (computed at the end of step ``k``).
    :param active: ``(L, c)`` booleans, whether step ``k`` ran for that system (a system that
        converged stops; its tridiagonal is then padded with an identity block, which has no
        weight on the first Lanczos vector and so leaves the quadrature unchanged).
    """
    one = xp.ones_like(alpha)
    a = xp.where(active, alpha, one)
    prev = xp.concatenate([xp.zeros_like(alpha[:1]), (beta / a)[:-1]], 0)
    diag = xp.where(active, 1.0 / a + prev, one)
    nxt = xp.concatenate([active[1:], xp.zeros_like(active[:1])], 0)
    off = xp.where(active & nxt, xp.sqrt(xp.where(active & nxt, beta, one)) / a, 0.0 * one)[:-1]
    L = alpha.shape[0]
    eye, up = xp.eye(L, dtype=alpha.dtype), xp.eye(L, k=1, dtype=alpha.dtype)
    diag, off = xp.transpose(diag), xp.transpose(off)
    off_full = xp.concatenate([off, xp.zeros_like(off[:, :1])], 1)
    return diag[:, :, None] * eye + off_full[:, :, None] * up + off_full[:, None, :] * xp.transpose(up)


def slq_logdet(xp, T, norms_sq):
    """Average over probes of :math:`\\|P^{-1/2} z_i\\|^2 \\, e_1^\\top \\log(T_i) e_1`.

    :param T: ``(p, L, L)`` tridiagonals (:func:`cg_tridiagonal`).
    :param norms_sq: ``(p,)`` values :math:`z_i^\\top P^{-1} z_i`.
    :returns: the estimate of :math:`\\log\\det A - \\log\\det P` (a scalar).
    """
    evals, evecs = xp.linalg.eigh(T)
    quad = (evecs[:, 0, :] ** 2 * xp.log(evals)).sum(-1)
    return (norms_sq * quad).mean()


def warn_unconverged(what: str, rel_residual, tol: float, max_iter: int) -> None:
    """Warn (``RuntimeWarning``) when CG stopped at ``max_iter`` iterations before every column's
    residual norm fell below ``tol`` times its right-hand side's: ``rel_residual`` holds those ratios
    at the stop (numpy-convertible). Predictions from such a solve can be far off (on the flights, a
    test RMSE of 74 minutes instead of 34 with ``cg_tol=0.01, max_cg_iter=100``)."""
    import warnings

    import numpy as np

    rel = np.asarray(rel_residual, dtype=np.float64)
    bad = rel > tol
    if bad.any():
        warnings.warn(
            f"{what}: CG stopped after max_cg_iter={max_iter} iterations with a relative residual of up to "
            f"{rel.max():.3g} ({int(bad.sum())} of {rel.size} columns above cg_tol={tol:g}); the result may be "
            "inaccurate: raise max_cg_iter (or precond_rank)", RuntimeWarning, stacklevel=3)
