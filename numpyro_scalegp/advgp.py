r"""ADVGP: the weight-space variational sparse GP of Peng et al. (2017) [1], for NumPyro.

The same model and closed-form composite loss as :mod:`pyro_scalegp.advgp`:

.. math::

    p(w) = \mathcal N(0, I_M), \quad
    \Phi = K_{xz} L, \quad L = \mathrm{chol}(K_{zz})^{-\top}, \quad
    p(f \mid w) = \mathcal N(\Phi w, K_{xx} - \Phi\Phi^\top), \quad
    p(y \mid f) = \mathcal N(f, \sigma^2 I),

.. math::

    -\mathrm{ELBO} = \sum_k g_k + h, \qquad
    g_k = \tfrac{n_k}{2}\log 2\pi\sigma^2 + \tfrac{1}{2\sigma^2}\Big[
        \|y_k - \Phi_k\mu\|^2 + \|\Phi_k U^\top\|_F^2
        + \textstyle\sum_{i\in k} k(x_i, x_i) - \|\Phi_k\|_F^2 \Big],

.. math::

    h = \tfrac12\big[\mu^\top\mu + \|U\|_F^2 - \textstyle\sum_j \log U_{jj}^2 - M\big].

Each data term is computed from its shard's statistics :math:`K_{zx_k}K_{x_kz}` and
:math:`K_{zx_k}y_k` without forming :math:`\Phi_k` (the identity is in
:mod:`pyro_scalegp.advgp`).

Parameters travel as a flat dict of *unconstrained* arrays named as the Pyro
module's ``named_parameters()`` (``"Z_unconstrained"``, ``"noise_unconstrained"``
(log), ``"kernel.variance_unconstrained"``, ``"kernel.lengthscale_unconstrained"``
(logs), ``"guide.loc_unconstrained"`` and ``"guide.scale_tril_unconstrained"``: the
lower triangle of :math:`U^\top` with the log of its diagonal), so both frontends
share one parametrization and one optimizer state layout. ``model``/``guide`` use
``numpyro.param`` sites with the constrained names (``"Z"``, ``"noise"``,
``"kernel.variance"``, ``"kernel.lengthscale"``, ``"guide.loc"``, ``"guide.scale_tril"``).

[1] H. Peng, S. Zhe, X. Zhang, Y. Qi. Asynchronous Distributed Variational Gaussian
Process for Regression. ICML 2017.

.. note:: Cost: ``O(M^3 + N M^2)`` time and ``O(N M)`` memory for a loss or a
   gradient over ``N`` points; prediction is ``O(M^2)`` per point.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints

from scalegp.advgp_gradient import data_term_and_gradients

from .kernels import Kernel
from .optim import lower_cholesky_from_unconstrained

__all__ = ["ADVGP", "ADVGPGuide", "kl_term"]


def _check_finite(name: str, value) -> None:
    if not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{name}: contains NaN or infinite values")


def _gram_statistics(Lz, A, b):
    r""":math:`(\Phi^\top\Phi, \Phi^\top y) = (L_z^{-1} A L_z^{-\top}, L_z^{-1} b)` from
    :math:`A = K_{zx}K_{xz}` and :math:`b = K_{zx} y` (``Lz`` lower triangular)."""
    half = solve_triangular(Lz, A, lower=True)
    return solve_triangular(Lz, half.T, lower=True), solve_triangular(Lz, b, lower=True)


def _data_term_and_gradients(Kzz, Kzx, kxx, y, loc, scale_tril, noise):
    """:func:`scalegp.advgp_gradient.data_term_and_gradients` on ``jax.numpy``."""
    return data_term_and_gradients(Kzz, Kzx, kxx, y, loc, scale_tril, noise, xp=jnp, solve_triangular=solve_triangular)


@jax.custom_vjp
def _data_term(Kzz, Kzx, kxx, y, loc, scale_tril, noise):
    """:func:`_data_term_and_gradients`' value; its gradients come from the same pass."""
    return _data_term_and_gradients(Kzz, Kzx, kxx, y, loc, scale_tril, noise)[0]


_data_term.defvjp(_data_term_and_gradients, lambda grads, ct: tuple(ct * g for g in grads))


def kl_term(loc, scale_tril):
    r"""The KL term :math:`h(\mu, U) = \mathrm{KL}(\mathcal N(\mu, U^\top U) \| \mathcal N(0, I))`
    with ``scale_tril`` :math:`= U^\top`.

    .. math:: h = \tfrac12\big[\mu^\top\mu + \|U\|_F^2 - \textstyle\sum_j \log U_{jj}^2 - M\big]

    .. note:: Cost: ``O(M^2)``.
    """
    diag = jnp.diagonal(scale_tril, axis1=-2, axis2=-1)
    return 0.5 * ((loc**2).sum(-1) + (jnp.tril(scale_tril) ** 2).sum((-2, -1))
                  - 2.0 * jnp.log(diag).sum(-1) - loc.shape[-1])


class ADVGPGuide:
    r"""The variational posterior :math:`q(w) = \mathcal N(\mu, U^\top U)`: ``numpyro.param``
    sites ``prefix + "loc"`` (:math:`\mu`) and ``prefix + "scale_tril"`` (:math:`U^\top`,
    lower triangular, positive diagonal), and the sample site ``w``.

    :param M: number of weights (inducing points).
    :param init_scale: initial ``scale_tril`` is ``init_scale * I``.
    :param prefix: prefix of the parameter names.

    .. note:: Cost: ``O(M^2)`` time per sample and ``O(M^2)`` memory.
    """

    def __init__(self, M: int, *, init_scale: float = 1.0, prefix: str = ""):
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"M: expected a positive integer, got {M!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        self.M = M
        self.init_scale = float(init_scale)
        self.prefix = prefix

    def get_posterior(self, params: dict | None = None) -> dist.MultivariateNormal:
        """``q(w)``; from ``params`` (constrained values keyed by site name) when given."""
        if params is None:
            loc = numpyro.param(self.prefix + "loc", jnp.zeros(self.M))
            scale_tril = numpyro.param(self.prefix + "scale_tril", self.init_scale * jnp.eye(self.M),
                                       constraint=constraints.lower_cholesky)
        else:
            loc, scale_tril = params[self.prefix + "loc"], params[self.prefix + "scale_tril"]
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    def __call__(self, *args, **kwargs) -> dict:
        return {"w": numpyro.sample("w", self.get_posterior())}

    def sample_posterior(self, rng_key, params: dict, *args, sample_shape=(), **kwargs) -> dict:
        """Draws of ``w`` from ``q(w)`` under constrained ``params`` (as from ``SVI.get_params``)."""
        return {"w": self.get_posterior(params).sample(rng_key, sample_shape)}

    def median(self, params: dict) -> dict:
        """The posterior median (= mean) of ``w``."""
        return {"w": params[self.prefix + "loc"]}


class ADVGP:
    r"""Weight-space sparse GP regression (ADVGP [1]) with a closed-form composite loss.

    :param kernel: a :mod:`numpyro_scalegp.kernels` kernel; its pytree leaves are
        ``(variance, lengthscale)``, read as initial values (learned).
    :param Z: ``(M, d)`` initial inducing inputs (learned).
    :param noise: initial observation noise variance :math:`\sigma^2 > 0` (learned).
    :param jitter: added to the diagonal of :math:`K_{zz}` before its Cholesky.
    :param init_scale: initial ``scale_tril`` of the guide is ``init_scale * I``.

    .. note:: Cost: ``O(M^3 + N M^2)`` time, ``O(N M)`` memory per loss evaluation.
    """

    def __init__(self, kernel, Z, noise: float = 1.0, *, jitter: float = 1e-6,
                 init_scale: float = 1.0):
        Z = jnp.asarray(Z)
        if Z.ndim != 2 or Z.shape[0] < 1:
            raise ValueError(f"Z: expected a 2-D array (M, d) with M >= 1, got shape {Z.shape}")
        _check_finite("Z", Z)
        noise_arr = np.asarray(noise, dtype=np.float64)
        if noise_arr.ndim != 0 or not np.isfinite(noise_arr) or noise_arr <= 0:
            raise ValueError(f"noise: expected a positive finite scalar, got {noise}")
        if not (math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter: expected a non-negative number, got {jitter!r}")
        if isinstance(kernel, Kernel):
            kernel.check_inputs(Z, "Z")
        leaves, self._kernel_def = jax.tree_util.tree_flatten(kernel)
        if len(leaves) != 2:
            raise ValueError(f"kernel: expected pytree leaves (variance, lengthscale), got {len(leaves)} leaves")
        self.kernel = kernel
        self.Z = Z
        self.noise = float(noise_arr)
        self.jitter = float(jitter)
        self.guide = ADVGPGuide(int(Z.shape[0]), init_scale=init_scale, prefix="guide.")

    @property
    def num_inducing(self) -> int:
        return self.guide.M

    # ---- parameters -------------------------------------------------------------------------
    def init_params(self) -> dict:
        """The initial unconstrained parameters (names as Pyro's ``named_parameters()``). Computed
        by numpy: each eager JAX operation compiles on its first use, and the dozen here added
        half a second to the start of :class:`~numpyro_scalegp.async_svi.AsyncProximalSVI`."""
        variance, lengthscale = jax.tree_util.tree_leaves(self.kernel)
        dtype = self.Z.dtype
        M = self.num_inducing
        # 0-d arrays, not numpy scalars, which JAX converts by an (eager, compiled) operation
        log = lambda v: np.asarray(np.log(np.asarray(v, dtype)))  # noqa: E731
        return {
            "Z_unconstrained": self.Z,
            "noise_unconstrained": jnp.asarray(log(self.noise)),
            "kernel.variance_unconstrained": jnp.asarray(log(variance)),
            "kernel.lengthscale_unconstrained": jnp.asarray(log(lengthscale)),
            "guide.loc_unconstrained": jnp.asarray(np.zeros(M, dtype)),
            # lower_cholesky_to_unconstrained(init_scale I): log on the diagonal, nothing below it
            "guide.scale_tril_unconstrained": jnp.asarray(log(self.guide.init_scale) * np.eye(M, dtype=dtype)),
        }

    def constrain(self, params: dict) -> dict:
        """Constrained values ``{"kernel", "Z", "noise", "loc", "scale_tril"}`` of ``params``."""
        kernel = jax.tree_util.tree_unflatten(
            self._kernel_def, [jnp.exp(params["kernel.variance_unconstrained"]),
                               jnp.exp(params["kernel.lengthscale_unconstrained"])])
        return {
            "kernel": kernel,
            "Z": params["Z_unconstrained"],
            "noise": jnp.exp(params["noise_unconstrained"]),
            "loc": params["guide.loc_unconstrained"],
            "scale_tril": lower_cholesky_from_unconstrained(params["guide.scale_tril_unconstrained"]),
        }

    # ---- maths --------------------------------------------------------------------------------
    def _check_data(self, X, y):
        X = jnp.asarray(X, dtype=self.Z.dtype)
        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-D array (N, d), got shape {X.shape}")
        if X.shape[1] != self.Z.shape[1]:
            raise ValueError(f"X: expected {self.Z.shape[1]} columns (as Z), got {X.shape[1]}")
        if not isinstance(X, jax.core.Tracer):
            _check_finite("X", X)
        if y is not None:
            y = jnp.asarray(y, dtype=self.Z.dtype)
            if y.shape != (X.shape[0],):
                raise ValueError(f"y: expected shape ({X.shape[0]},) to match X, got {y.shape}")
            if not isinstance(y, jax.core.Tracer):
                _check_finite("y", y)
            if self.num_inducing > X.shape[0]:
                raise ValueError(f"Z: M={self.num_inducing} inducing points exceed the N={X.shape[0]} rows of X")
        return X, y

    def _kzz(self, kernel, Z):
        return kernel(Z) + self.jitter * jnp.eye(Z.shape[0], dtype=Z.dtype)

    def _chol_zz(self, kernel, Z):
        return jnp.linalg.cholesky(self._kzz(kernel, Z))

    def _features(self, kernel, Z, X, chol_zz):
        return solve_triangular(chol_zz, kernel(Z, X), lower=True).T

    def features(self, X, *, params: dict | None = None):
        r"""The ``(N, M)`` feature matrix :math:`\Phi = K_{xz}L`, :math:`L = \mathrm{chol}(K_{zz})^{-\top}`."""
        c = self.constrain(self.init_params() if params is None else params)
        X, _ = self._check_data(X, None)
        return self._features(c["kernel"], c["Z"], X, self._chol_zz(c["kernel"], c["Z"]))

    def _shard_term(self, c, X, y, chol_zz):
        # from the shard's statistics K_zx K_xz and K_zx y, never forming Phi (module docstring of the Pyro twin)
        Kzx = c["kernel"](c["Z"], X)
        T, proj = _gram_statistics(chol_zz, Kzx @ Kzx.T, Kzx @ y)
        loc, scale_tril = c["loc"], c["scale_tril"]
        quad = (y @ y - 2 * loc @ proj + loc @ T @ loc + (scale_tril * (T @ scale_tril)).sum()
                + c["kernel"](X, diag=True).sum() - jnp.trace(T))
        return 0.5 * X.shape[0] * jnp.log(2 * jnp.pi * c["noise"]) + 0.5 * quad / c["noise"]

    def data_term(self, X, y, *, params: dict | None = None):
        r"""The data term :math:`g_k` of the rows ``(X, y)`` (differentiable in ``params``,
        ``X`` and ``y``; reverse mode only, as ``jax.grad``: the gradient of its matrix part is
        written out, :func:`_data_term_and_gradients`, and computed with the value; the kernel's
        and the parametrization's by autodiff)."""
        X, y = self._check_data(X, y)
        c = self.constrain(self.init_params() if params is None else params)
        kernel, Z = c["kernel"], c["Z"]
        return _data_term(self._kzz(kernel, Z), kernel(Z, X), kernel(X, diag=True).sum(), y, c["loc"],
                          c["scale_tril"], c["noise"])

    def kl(self, *, params: dict | None = None):
        """The KL term ``h`` (see :func:`kl_term`)."""
        c = self.constrain(self.init_params() if params is None else params)
        return kl_term(c["loc"], c["scale_tril"])

    def loss_terms(self, X, y, shards: Sequence | None = None, *, params: dict | None = None):
        """``(g, h)``: the data terms (shape ``(K,)``, one per shard of row indices; one shard
        of all rows by default) and the KL term. ``g.sum() + h`` is the negative ELBO."""
        X, y = self._check_data(X, y)
        c = self.constrain(self.init_params() if params is None else params)
        Lz = self._chol_zz(c["kernel"], c["Z"])
        if shards is None:
            shards = [np.arange(X.shape[0])]
        g = jnp.stack([self._shard_term(c, X[np.asarray(s)], y[np.asarray(s)], Lz) for s in shards])
        return g, kl_term(c["loc"], c["scale_tril"])

    def loss(self, X, y, *, params: dict | None = None):
        """The closed-form negative ELBO ``sum_k g_k + h`` (no sampling)."""
        g, h = self.loss_terms(X, y, params=params)
        return g.sum() + h

    # ---- NumPyro model / guide / prediction -----------------------------------------------------
    def model(self, X, y=None):
        """NumPyro model: ``w ~ N(0, I_M)`` and the Jensen-bound likelihood as a factor."""
        X, y = self._check_data(X, y)
        variance, lengthscale = jax.tree_util.tree_leaves(self.kernel)
        kernel = jax.tree_util.tree_unflatten(self._kernel_def, [
            numpyro.param("kernel.variance", jnp.asarray(variance, X.dtype), constraint=constraints.positive),
            numpyro.param("kernel.lengthscale", jnp.asarray(lengthscale, X.dtype),
                          constraint=constraints.positive)])
        Z = numpyro.param("Z", self.Z)
        s2 = numpyro.param("noise", jnp.asarray(self.noise, X.dtype), constraint=constraints.positive)
        M = self.num_inducing
        w = numpyro.sample("w", dist.Normal(jnp.zeros(M, X.dtype), 1.0).to_event(1))
        Phi = self._features(kernel, Z, X, self._chol_zz(kernel, Z))
        f = w @ Phi.T
        excess = kernel(X, diag=True) - (Phi**2).sum(-1)
        if y is None:
            return numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2 + jnp.clip(excess, 0.0))).to_event(1))
        bound = dist.Normal(f, jnp.sqrt(s2)).log_prob(y).sum(-1) - 0.5 * excess.sum() / s2
        numpyro.factor("y", bound)
        return y

    def predict(self, X_new, *, params: dict | None = None) -> dist.Independent:
        r"""The predictive distribution of ``y`` at ``X_new`` under ``q(w)``: independent
        normals with mean :math:`\phi_*^\top\mu` and variance
        :math:`\sigma^2 + k_{**} - \phi_*^\top\phi_* + \|U\phi_*\|^2`."""
        X_new, _ = self._check_data(X_new, None)
        c = self.constrain(self.init_params() if params is None else params)
        Phi = self._features(c["kernel"], c["Z"], X_new, self._chol_zz(c["kernel"], c["Z"]))
        mean = Phi @ c["loc"]
        var = (c["noise"] + c["kernel"](X_new, diag=True) - (Phi**2).sum(-1)
               + ((Phi @ c["scale_tril"]) ** 2).sum(-1))
        return dist.Normal(mean, jnp.sqrt(jnp.clip(var, jnp.finfo(var.dtype).tiny))).to_event(1)
