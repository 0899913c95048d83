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


def titsias_collapsed_bound(name, X, y, Z, variance, lengthscale, noise, *, jitter=0.0) -> float:
    """Titsias (2009) collapsed bound, dense:
    log N(y | 0, Q + noise I) - tr(K - Q) / (2 noise), Q = K_xz (K_zz + jitter I)^-1 K_zx."""
    Kzz = kernel_matrix(name, Z, Z, variance, lengthscale) + jitter * np.eye(len(Z))
    Kxz = kernel_matrix(name, X, Z, variance, lengthscale)
    Q = Kxz @ np.linalg.solve(Kzz, Kxz.T)
    trace = len(X) * float(variance) - np.trace(Q)
    return log_marginal(Q, y, noise) - 0.5 * trace / noise


def advgp_features(name, X, Z, variance, lengthscale, *, jitter=0.0) -> np.ndarray:
    """Phi = K_xz L with L = chol(K_zz + jitter I)^-T (ADVGP features, paper eq. 11)."""
    Kzz = kernel_matrix(name, Z, Z, variance, lengthscale) + jitter * np.eye(len(Z))
    Lz = np.linalg.cholesky(Kzz)
    return np.linalg.solve(Lz, kernel_matrix(name, Z, X, variance, lengthscale)).T


def advgp_elbo(name, X, y, Z, variance, lengthscale, noise, loc, scale_tril, *, jitter=0.0) -> float:
    """ADVGP ELBO written term by term (paper eq. 10): expected log-likelihood of y under
    f ~ N(Phi mu, Phi S Phi^T), the Jensen correction -tr(K - Phi Phi^T)/(2 noise), and
    -KL(N(mu, S) || N(0, I)) with S = scale_tril scale_tril^T, the KL by the textbook formula."""
    Phi = advgp_features(name, X, Z, variance, lengthscale, jitter=jitter)
    y = np.asarray(y, dtype=np.float64)
    mu = np.asarray(loc, dtype=np.float64)
    S = np.asarray(scale_tril, dtype=np.float64) @ np.asarray(scale_tril, dtype=np.float64).T
    m = Phi @ mu
    v = np.einsum("nm,mk,nk->n", Phi, S, Phi)
    ell = np.sum(-0.5 * np.log(2 * np.pi * noise) - 0.5 * ((y - m) ** 2 + v) / noise)
    corr = -0.5 * (len(X) * float(variance) - np.sum(Phi**2)) / noise
    M = len(mu)
    kl = 0.5 * (np.trace(S) + mu @ mu - M - np.linalg.slogdet(S)[1])
    return float(ell + corr - kl)


def advgp_optimal_q(name, X, y, Z, variance, lengthscale, noise, *, jitter=0.0):
    """The (mu, scale_tril) maximizing the ADVGP ELBO for fixed hyperparameters:
    S = (I + Phi^T Phi / noise)^-1, mu = S Phi^T y / noise."""
    Phi = advgp_features(name, X, Z, variance, lengthscale, jitter=jitter)
    P = np.eye(Phi.shape[1]) + Phi.T @ Phi / noise
    S = np.linalg.inv(P)
    mu = S @ Phi.T @ np.asarray(y, dtype=np.float64) / noise
    return mu, np.linalg.cholesky(S)


# --- sparse GPs for GP-VAEs (paper 004), one latent channel at a time, written literally ---

def gaussian_cross_entropy(m, v, mu, s2) -> float:
    """sum_i E_{z ~ N(m_i, v_i)} log N(z | mu_i, s2_i)."""
    m, v, mu, s2 = (np.asarray(a, dtype=np.float64) for a in (m, v, mu, s2))
    return float(np.sum(-0.5 * np.log(2 * np.pi * s2) - ((m - mu) ** 2 + v) / (2 * s2)))


def gauss_kl(mu, A, K) -> float:
    """KL(N(mu, A) || N(0, K)) by dense inverses and determinants."""
    Kinv = np.linalg.inv(K)
    M = len(mu)
    return float(0.5 * (np.trace(Kinv @ A) + mu @ Kinv @ mu - M
                        + np.linalg.slogdet(K)[1] - np.linalg.slogdet(A)[1]))


def titsias_optimum(Kmm, Kmn, ytilde, s2, weight=1.0):
    """Optimal q(u) = N(mu, A) of Titsias (2009), paper eqs. 4-5; with ``weight = N / b`` on a
    batch this is the hybrid estimator of eq. 9."""
    Dinv = np.diag(1.0 / np.asarray(s2, dtype=np.float64))
    Sigma = Kmm + weight * Kmn @ Dinv @ Kmn.T
    Sinv = np.linalg.inv(Sigma)
    mu = weight * Kmm @ Sinv @ Kmn @ Dinv @ ytilde
    A = Kmm @ Sinv @ Kmm
    return mu, A


def sparse_marginals(Kmm, Kmr, krr_diag, mu, A):
    """Marginal means and variances of q_S(f_r) (paper eq. 3)."""
    Kinv = np.linalg.inv(Kmm)
    P = Kmr.T @ Kinv  # (r, m)
    mean = P @ mu
    var = krr_diag - np.einsum("rm,mr->r", P, Kmr) + np.einsum("rm,mn,rn->r", P, A, P)
    return mean, var


def hensman_bound(Kmm, Kmb, kbb_diag, ytilde, s2, mu, A, kl_weight=1.0) -> float:
    """The Hensman et al. (2013) bound of paper eq. 7 on the points given, with the KL term
    multiplied by ``kl_weight`` (``b / N`` on a batch)."""
    Kinv = np.linalg.inv(Kmm)
    total = 0.0
    for i in range(Kmb.shape[1]):
        k = Kmb[:, i]
        ktilde = kbb_diag[i] - k @ Kinv @ k
        Lam = Kinv @ np.outer(k, k) @ Kinv
        mean = k @ Kinv @ mu
        total += (-0.5 * np.log(2 * np.pi * s2[i]) - (ytilde[i] - mean) ** 2 / (2 * s2[i])
                  - (ktilde + np.trace(A @ Lam)) / (2 * s2[i]))
    return float(total - kl_weight * gauss_kl(mu, A, Kmm))


def titsias_bound(Kmm, Kmn, knn_diag, ytilde, s2) -> float:
    """The collapsed bound of Titsias (2009), paper eq. 6."""
    Q = Kmn.T @ np.linalg.inv(Kmm) @ Kmn
    return float(_log_normal(ytilde, Q + np.diag(s2)) - 0.5 * np.sum((knn_diag - np.diag(Q)) / s2))


def _log_normal(y, C) -> float:
    L = np.linalg.cholesky(C)
    a = np.linalg.solve(L, y)
    return float(-0.5 * a @ a - np.log(np.diag(L)).sum() - 0.5 * len(y) * np.log(2 * np.pi))


def svgp_vae_gp_terms(Kmm, Kmb, kbb_diag, ytilde, s2, num_data):
    """One channel of the SVGP-VAE batch ELBO (paper eq. 10) without the likelihood term:
    ``(m, v, term)`` with the marginals of q at the batch points and
    ``term = -cross-entropy + (b / N) L_H`` (the Hensman bound with the hybrid estimator)."""
    b = Kmb.shape[1]
    mu, A = titsias_optimum(Kmm, Kmb, ytilde, s2, weight=num_data / b)
    m, v = sparse_marginals(Kmm, Kmb, kbb_diag, mu, A)
    term = (-gaussian_cross_entropy(m, v, ytilde, s2)
            + hensman_bound(Kmm, Kmb, kbb_diag, ytilde, s2, mu, A, kl_weight=b / num_data))
    return m, v, term


def gpvae_exact_terms(K, ytilde, s2):
    """One channel of the exact GP-VAE ELBO (Pearce 2020) without the likelihood term:
    ``(m, v, term)`` with the exact posterior marginals and ``term = -cross-entropy + log Z``."""
    C = K + np.diag(s2)
    Cinv = np.linalg.inv(C)
    m = K @ Cinv @ ytilde
    v = np.diag(K - K @ Cinv @ K)
    return m, v, -gaussian_cross_entropy(m, v, ytilde, s2) + _log_normal(ytilde, C)


def moving_average(iterates, decay):
    """The averaged parameters of the delayed proximal server after each update, for the
    parameters ``iterates = [theta_0, theta_1, ...]`` (arrays): ``a_0 = theta_0``,
    ``a_t = b_t a_{t-1} + (1 - b_t) theta_t`` with ``b_t = min(decay, (1 + t) / (10 + t))``;
    returns ``[a_1, a_2, ...]``."""
    average, out = np.array(iterates[0], dtype=np.float64), []
    for t, theta in enumerate(iterates[1:], start=1):
        b = min(decay, (1 + t) / (10 + t))
        average = b * average + (1 - b) * np.asarray(theta, dtype=np.float64)
        out.append(average)
    return out
