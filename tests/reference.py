"""Dense float64 reference maths for exact GPs, in plain numpy (shared by every test).

Kernels take ARD lengthscales ``ell`` (shape ``(d,)`` or scalar) and a variance;
``r = ||(x - z) / ell||``.
"""
from __future__ import annotations

import numpy as np

KERNELS = ("rbf", "matern32", "matern52", "exponential")


def kernel_matrix(name: str, X, Z, variance, lengthscale) -> np.ndarray:
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    Z = np.atleast_2d(np.asarray(Z, dtype=np.float64))
    ell = np.asarray(lengthscale, dtype=np.float64)
    diff = (X[:, None, :] - Z[None, :, :]) / ell
    r2 = (diff**2).sum(-1)
    r = np.sqrt(r2)
    if name == "rbf":
        k = np.exp(-0.5 * r2)
    elif name == "exponential":
        k = np.exp(-r)
    elif name == "matern32":
        s = np.sqrt(3.0) * r
        k = (1 + s) * np.exp(-s)
    elif name == "matern52":
        s = np.sqrt(5.0) * r
        k = (1 + s + s**2 / 3.0) * np.exp(-s)
    else:
        raise ValueError(name)
    return float(variance) * k


def log_marginal(K: np.ndarray, y, noise: float, mean: float = 0.0) -> float:
    """log N(y | mean, K + noise I), by Cholesky."""
    y = np.asarray(y, dtype=np.float64) - mean
    n = len(y)
    L = np.linalg.cholesky(K + noise * np.eye(n))
    a = np.linalg.solve(L, y)
    return float(-0.5 * a @ a - np.log(np.diag(L)).sum() - 0.5 * n * np.log(2 * np.pi))


def gp_log_marginal(name, X, y, variance, lengthscale, noise, mean=0.0) -> float:
    return log_marginal(kernel_matrix(name, X, X, variance, lengthscale), y, noise, mean)


def gp_predict(name, X, y, Xs, variance, lengthscale, noise, mean=0.0, *, noiseless=True):
    """Exact predictive mean and marginal variance at ``Xs`` (latent f unless ``noiseless=False``)."""
    K = kernel_matrix(name, X, X, variance, lengthscale) + noise * np.eye(len(X))
    Ks = kernel_matrix(name, X, Xs, variance, lengthscale)
    kss = np.full(len(Xs), float(variance))
    L = np.linalg.cholesky(K)
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, np.asarray(y, dtype=np.float64) - mean))
    V = np.linalg.solve(L, Ks)
    mu = mean + Ks.T @ alpha
    var = kss - (V**2).sum(0)
    return mu, (var if noiseless else var + noise)


def hgp_log_marginal(name, X, y, index, variance, lengthscale, noise, mean=0.0) -> float:
    """Sum of the experts' exact log marginal likelihoods (paper eq. 5)."""
    return sum(gp_log_marginal(name, X[idx], y[idx], variance, lengthscale, noise, mean) for idx in index)


def combine_reference(rule, means, variances, prior_mean, prior_var):
    """Expert combination rules written out expert by expert (no shared code with the package)."""
    E = len(means)
    if rule == "poe":
        prec = sum(1 / v for v in variances)
        var = 1 / prec
        return var * sum(m / v for m, v in zip(means, variances)), var
    if rule == "gpoe":
        prec = sum((1 / E) / v for v in variances)
        var = 1 / prec
        return var * sum((1 / E) * m / v for m, v in zip(means, variances)), var
    if rule == "bcm":
        prec = sum(1 / v for v in variances) + (1 - E) / prior_var
        var = 1 / prec
        return var * (sum(m / v for m, v in zip(means, variances)) + (1 - E) * prior_mean / prior_var), var
    if rule in ("rbcm", "grbcm"):
        betas = [0.5 * (np.log(prior_var) - np.log(v)) for v in variances]
        if rule == "grbcm":
            betas[0] = np.ones_like(betas[0])
        sb = sum(betas)
        prec = sum(b / v for b, v in zip(betas, variances)) + (1 - sb) / prior_var
        var = 1 / prec
        return var * (sum(b * m / v for b, m, v in zip(betas, means, variances))
                      + (1 - sb) * prior_mean / prior_var), var
    raise ValueError(rule)
