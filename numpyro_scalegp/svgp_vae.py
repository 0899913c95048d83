"""Scalable GP-VAEs for NumPyro: the amortized sparse-GP guide of SVGP-VAE [1] and the exact
GP-VAE of Pearce [2]; the same names, maths and sites as ``pyro_scalegp.svgp_vae``.

On a minibatch ``b`` of ``N`` points with inducing inputs ``Z`` (``M`` of them) and the
encoder's latent data :math:`(\\tilde y_b, \\tilde\\sigma_b)`, the hybrid estimator (paper eq. 9)

.. math::

    \\Sigma_b = K_{mm} + \\tfrac{N}{b} K_{mb} \\tilde D_b^{-1} K_{bm}, \\quad
    \\mu_b = \\tfrac{N}{b} K_{mm} \\Sigma_b^{-1} K_{mb} \\tilde D_b^{-1} \\tilde y_b, \\quad
    A_b = K_{mm} \\Sigma_b^{-1} K_{mm}

defines :math:`q`, and the batch ELBO of paper eq. 10 (likelihood, minus the closed-form
cross-entropy to the encoder's Gaussians, plus the Hensman bound with the KL scaled by
``b / N``) simplifies exactly, because the cross-entropy equals the data term of the
Hensman bound point by point, to

.. math::

    \\mathcal{L}_b = \\sum_{i \\in b} \\mathbb{E}_{q}[\\log p_\\psi(y_i \\mid z_i)]
      - \\tfrac{b}{N} \\sum_l \\mathrm{KL}(\\mathcal{N}(\\mu_b^l, A_b^l) \\,\\|\\,
      \\mathcal{N}(0, K_{mm})),

computed with Cholesky factors only: :math:`L_m L_m^\\top = K_{mm}`, :math:`V = L_m^{-1}
K_{mb}`, :math:`B = I + \\frac{N}{b} V \\tilde D_b^{-1} V^\\top = L_B L_B^\\top`,
:math:`\\alpha = \\frac{N}{b} B^{-1} V \\tilde D_b^{-1} \\tilde y_b`; then :math:`\\mu_b = L_m
\\alpha`, :math:`A_b = L_m B^{-1} L_m^\\top`, marginal means :math:`V^\\top \\alpha`, variances
:math:`k_{ii} - \\|V_i\\|^2 + \\|L_B^{-1} V_i\\|^2` and :math:`2\\,\\mathrm{KL} =
\\mathrm{tr}(B^{-1}) + \\|\\alpha\\|^2 - M + \\log|B|`.

Sites: the guide samples ``"z"`` of shape ``(b, L)`` (plate ``"data"``) from the marginals of
:math:`q`, reparameterized; the model scores ``z`` under the same marginals (the two cancel
for every sample), adds the GP term with ``numpyro.factor("gp", ...)`` and observes ``"y"``;
so ``SVI(vae.model, vae.guide, optax_optimizer, Trace_ELBO())`` maximizes :math:`\\mathcal{L}_b`.
Parameters: ``Z``, the kernel's leaves (``kernel[i]``, positive, in the kernel's pytree
order), ``encoder$params`` and ``decoder$params`` (the networks' parameters), ``noise`` for the
Gaussian likelihood; the guide's are prefixed ``guide.`` inside :class:`SVGPVAE`, as in Pyro.

Networks are either ``(init_fn, apply_fn)`` pairs, registered with ``numpyro.module`` (e.g.
from ``jax.example_libraries.stax``: ``init_fn(rng_key, input_shape) -> (output_shape,
params)``), or flax linen modules, registered with ``numpyro.contrib.module.flax_module``
(initialized on ``jnp.ones`` of the input's shape; modules with mutable collections or
dropout rngs are not supported). Called on ``Y``, the encoder returns ``(loc, scale)``, each
``(b, latent_dim)``.

Input checks for NaN run only on concrete arrays (not on tracers inside ``jit``).

References:

1. M. Jazbec, M. Ashman, V. Fortuin, M. Pearce, S. Mandt, G. Rätsch. Scalable Gaussian
   process variational autoencoders. AISTATS 2021.
2. M. Pearce. The Gaussian process prior VAE for interpretable latent dynamics from
   pixels. AABI 2020.
3. J. Hensman, N. Fusi, N. D. Lawrence. Gaussian processes for big data. UAI 2013.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve, solve_triangular
from numpyro import handlers
from numpyro.distributions import constraints

from .hgp import _check_finite
from .kernels import Kernel

__all__ = ["SVGPVAEGuide", "SVGPVAE", "ExactGPVAE"]


def _check_data(X, Y, num_data: int | None = None):
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    if X.ndim not in (1, 2):
        raise ValueError(f"X: expected shape (b,) or (b, D), got {X.shape}")
    if Y.ndim < 1:
        raise ValueError(f"Y: expected shape (b, ...), got {Y.shape}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y: has {Y.shape[0]} rows but X has {X.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError("X: empty batch")
    if num_data is not None and X.shape[0] > num_data:
        raise ValueError(f"X: batch of {X.shape[0]} points exceeds num_data={num_data}")
    _check_finite("X", X)
    _check_finite("Y", Y)
    return (X if X.ndim == 2 else X[:, None]), Y


def _check_X(X):
    X = jnp.asarray(X)
    if X.ndim not in (1, 2):
        raise ValueError(f"X_new: expected shape (n,) or (n, D), got {X.shape}")
    _check_finite("X_new", X)
    return X if X.ndim == 2 else X[:, None]


def _is_flax_module(net) -> bool:
    linen = sys.modules.get("flax.linen")  # imported already wherever a flax module exists
    return linen is not None and isinstance(net, linen.Module)


def _check_network(name: str, net):
    pair = isinstance(net, tuple) and len(net) == 2 and all(callable(f) for f in net)
    if not (pair or _is_flax_module(net)):
        raise ValueError(f"{name}: expected an (init_fn, apply_fn) pair or a flax linen module, "
                         f"got {type(net).__name__}")
    return net


def _network(name: str, net, x):
    """``net`` applied to ``x``, its parameters registered as the site ``name + "$params"``."""
    if _is_flax_module(net):
        from numpyro.contrib.module import flax_module

        return flax_module(name, net, input_shape=x.shape)(x)
    return numpyro.module(name, net, input_shape=x.shape)(x)


def _encode(name: str, encoder, Y, latent_dim: int):
    loc, scale = _network(name, encoder, Y)
    shape = (Y.shape[0], latent_dim)
    if loc.shape != shape or scale.shape != shape:
        raise ValueError(f"encoder: must return (loc, scale) of shape {shape}, got {loc.shape} and {scale.shape}")
    return loc, scale


def _kernel_param(name: str, kernel: Kernel) -> Kernel:
    """The kernel rebuilt from positive ``numpyro.param`` sites, one per pytree leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(kernel)
    values = [numpyro.param(name + "".join(f"[{k.key}]" for k in path), jnp.asarray(leaf),
                            constraint=constraints.positive) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, values)


def _channel(V, kdiag, loc, scale, weight):
    """One latent channel of the sparse posterior: ``(mean, var, kl, alpha, L_B)``."""
    M = V.shape[0]
    prec = weight / scale**2
    LB = jnp.linalg.cholesky(jnp.eye(M, dtype=V.dtype) + (V * prec) @ V.T)
    alpha = cho_solve((LB, True), V @ (prec * loc))
    mean, var = _predict_channel(V, kdiag, LB, alpha)
    LBinv = solve_triangular(LB, jnp.eye(M, dtype=V.dtype), lower=True)
    kl = 0.5 * ((LBinv**2).sum() + alpha @ alpha - M + 2.0 * jnp.log(jnp.diagonal(LB)).sum())
    return mean, var, kl, alpha, LB


def _predict_channel(V, kdiag, LB, alpha):
    W = solve_triangular(LB, V, lower=True)
    return V.T @ alpha, jnp.clip(kdiag - (V**2).sum(0), 0.0) + (W**2).sum(0)


# Every latent channel has its own Cholesky factors. The functions below loop over the channels
# with ``lax.map`` so that each factorization and triangular solve is an unbatched LAPACK call:
# under a ``vmap`` they would be batched calls, which jaxlib 0.10 splits into pieces on XLA's
# intra-op thread pool while blocking its own pool thread until the pieces are done; once as
# many such calls run at once as the pool has threads (two on a 2-core machine; XLA runs
# independent operations concurrently) no thread is left for the pieces and the step
# deadlocks. That was the hang of a jitted SVI step with M = 48 on the rotated digits. They are
# jitted module-level functions so that eager calls reuse one compiled loop per shape.

@jax.jit
def _sparse_channels(V, kdiag, loc, scale, weight):
    """:func:`_channel` for every column of ``loc`` and ``scale``, stacked along a leading axis."""
    return jax.lax.map(lambda a: _channel(V, kdiag, a[0], a[1], weight), (loc.T, scale.T))


@jax.jit
def _predict_channels(V, kdiag, LB, alpha):
    """:func:`_predict_channel` for every channel (leading axis of ``LB`` and ``alpha``)."""
    return jax.lax.map(lambda a: _predict_channel(V, kdiag, a[0], a[1]), (LB, alpha))


@jax.jit
def _solve_channels(Ls, B):
    """``L_l^{-1} B`` for every lower-triangular ``L_l`` of ``Ls`` ``(L, n, n)``."""
    return jax.lax.map(lambda L_: solve_triangular(L_, B, lower=True), Ls)


@jax.jit
def _exact_channels(K, ytilde, sigtilde):
    """Per channel ``l`` (rows of ``ytilde``, ``sigtilde``): the Cholesky factor ``L_l`` of
    ``K + diag(sigtilde_l^2)`` and ``(K + diag(sigtilde_l^2))^{-1} ytilde_l``."""
    def one(a):
        L_ = jnp.linalg.cholesky(K + jnp.diag(a[1] ** 2))
        return L_, cho_solve((L_, True), a[0])

    return jax.lax.map(one, (ytilde, sigtilde))


class SVGPVAEGuide:
    """Amortized sparse-GP guide of SVGP-VAE [1] (maths in the module docstring).

    :param encoder: an ``(init_fn, apply_fn)`` pair or a flax linen module; applied to ``Y`` it
        returns ``(loc, scale)``, each ``(b, latent_dim)``, the latent pseudo-observations and
        their standard deviations.
    :param kernel: a :mod:`numpyro_scalegp.kernels` kernel; its leaves are the initial values
        of positive parameters.
    :param Z: ``(M, D)`` initial inducing inputs (learned).
    :param num_data: ``N``; ``latent_dim``: ``L``.
    :param jitter: added to the diagonal of :math:`K_{mm}`.
    :param prefix: prepended to the parameter names.

    Calling ``guide(X, Y)`` samples ``"z"`` of shape ``(b, L)`` and returns ``{"z": z}``.

    .. note:: Cost: ``O(b M^2 L + M^3 L)`` time and ``O(b M + M^2 L)`` memory per batch.
    """

    def __init__(self, encoder, kernel: Kernel, Z, *, num_data: int, latent_dim: int,
                 jitter: float = 1e-6, prefix: str = ""):
        if int(num_data) != num_data or num_data < 1:
            raise ValueError(f"num_data: must be a positive integer, got {num_data!r}")
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim: must be a positive integer, got {latent_dim!r}")
        Z = jnp.asarray(Z)
        if Z.ndim not in (1, 2):
            raise ValueError(f"Z: expected shape (M,) or (M, D), got {Z.shape}")
        if bool(jnp.isnan(Z).any()):
            raise ValueError("Z: contains NaN")
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel: expected a numpyro_scalegp.kernels.Kernel, got {type(kernel).__name__}")
        self.encoder, self.kernel = _check_network("encoder", encoder), kernel
        self.Z = Z if Z.ndim == 2 else Z[:, None]
        kernel.check_inputs(self.Z, "Z")
        self.num_data, self.latent_dim = int(num_data), int(latent_dim)
        self.jitter, self.prefix = float(jitter), prefix

    def _params(self):
        return (numpyro.param(self.prefix + "Z", self.Z),
                _kernel_param(self.prefix + "kernel", self.kernel))

    def _latent(self, X, Y, num_data):
        X, Y = _check_data(X, Y, num_data)
        loc, scale = _encode(self.prefix + "encoder", self.encoder, Y, self.latent_dim)
        return X, loc, scale

    def _factors(self, Zi, kernel, X, loc, scale, weight):
        M = Zi.shape[0]
        Lm = jnp.linalg.cholesky(kernel(Zi) + self.jitter * jnp.eye(M, dtype=Zi.dtype))
        V = solve_triangular(Lm, kernel(Zi, X), lower=True)
        mean, var, kl, alpha, LB = _sparse_channels(V, kernel(X, diag=True), loc, scale, weight)
        return Lm, mean, var, kl, alpha, LB

    def hybrid_posterior(self, X_b, Y_b):
        """The hybrid estimator (paper eq. 9): ``(mu_b, A_b)`` of shapes ``(L, M)`` and ``(L, M, M)``."""
        Zi, kernel = self._params()
        X, loc, scale = self._latent(X_b, Y_b, self.num_data)
        Lm, _, _, _, alpha, LB = self._factors(Zi, kernel, X, loc, scale, self.num_data / X.shape[0])
        R = _solve_channels(LB, Lm.T)
        return alpha @ Lm.T, jnp.swapaxes(R, -1, -2) @ R

    def marginals(self, X, Y):
        """``(loc, scale, kl)``: marginal means and standard deviations of ``z`` at the batch
        points, shape ``(b, L)``, and the per-channel KL terms, shape ``(L,)``."""
        Zi, kernel = self._params()
        X, ytilde, sigtilde = self._latent(X, Y, self.num_data)
        _, mean, var, kl, _, _ = self._factors(Zi, kernel, X, ytilde, sigtilde, self.num_data / X.shape[0])
        return mean.T, jnp.sqrt(var).T, kl

    def __call__(self, X, Y):
        loc, scale, _ = self.marginals(X, Y)
        with numpyro.plate("data", loc.shape[0], dim=-1):
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return {"z": z}


class _GPVAE:
    """Decoder and likelihood shared by :class:`SVGPVAE` and :class:`ExactGPVAE`."""

    def __init__(self, decoder, latent_dim: int, likelihood, noise: float):
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim: must be a positive integer, got {latent_dim!r}")
        if not (likelihood in ("bernoulli", "gaussian") or callable(likelihood)):
            raise ValueError(f"likelihood: expected 'bernoulli', 'gaussian' or a callable, got {likelihood!r}")
        self.decoder, self.latent_dim = _check_network("decoder", decoder), int(latent_dim)
        self.likelihood, self.noise = likelihood, float(noise)
        self._conditioned = None

    def observation(self, z, event_dim: int):
        """The distribution of ``y`` given latents ``z`` of shape ``(n, L)``."""
        out = _network("decoder", self.decoder, z)
        if self.likelihood == "bernoulli":
            d = dist.Bernoulli(logits=out)
        elif self.likelihood == "gaussian":
            d = dist.Normal(out, jnp.sqrt(numpyro.param("noise", self.noise, constraint=constraints.positive)))
        else:
            d = self.likelihood(out)
        return d.to_event(event_dim)

    def _model(self, loc, scale, gp_term, Y):
        data = numpyro.plate("data", Y.shape[0], dim=-1)
        with data:
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
        numpyro.factor("gp", gp_term)
        with data:
            numpyro.sample("y", self.observation(z, Y.ndim - 1), obs=Y)

    def model(self, X, Y):
        """The model of the NumPyro split of the ELBO (see the module docstring)."""
        self._model(*self._gp_term(X, Y), jnp.asarray(Y))

    def elbo(self, X, Y, *, rng_key=None):
        """The (batch) ELBO with one reparameterized sample of ``z`` drawn with ``rng_key``
        (default: ``numpyro.prng_key()`` of an enclosing ``seed`` handler)."""
        key = numpyro.prng_key() if rng_key is None else rng_key
        if key is None:
            raise ValueError("rng_key: pass one or run under numpyro.handlers.seed")
        loc, scale, gp_term = self._gp_term(X, Y)
        Y = jnp.asarray(Y)
        z = dist.Normal(loc, scale).rsample(key)
        return self.observation(z, Y.ndim - 1).log_prob(Y).sum() + gp_term

    def condition(self, X_train, Y_train, *, params: dict | None = None):
        """Encode a whole data set (weight 1, i.e. ``b = N``) for :meth:`latent` and
        :meth:`generate`, with parameter values ``params`` (e.g. ``svi.get_params(state)``;
        default: the initial values); returns ``self``."""
        params = {} if params is None else dict(params)
        with handlers.substitute(data=params):
            self._conditioned = (params, self._condition(X_train, Y_train))
        self._event_dim = jnp.asarray(Y_train).ndim - 1
        return self

    def latent(self, X_new):
        """Posterior marginals of the latents at ``X_new``: ``Normal`` of batch shape ``(n,)``
        and event shape ``(L,)``."""
        if self._conditioned is None:
            raise ValueError("condition: call condition(X_train, Y_train) before predicting")
        mean, var = self._latent_at(_check_X(X_new), self._conditioned[1])
        return dist.Normal(mean.T, jnp.sqrt(var).T).to_event(1)

    def generate(self, X_new):
        """The distribution of ``y`` decoded from the posterior mean latents at ``X_new``."""
        latent = self.latent(X_new)
        with handlers.substitute(data=self._conditioned[0]):
            return self.observation(latent.mean, self._event_dim)


class SVGPVAE(_GPVAE):
    """SVGP-VAE [1] with the amortized sparse-GP guide :class:`SVGPVAEGuide`.

    :param encoder: an ``(init_fn, apply_fn)`` pair or a flax linen module returning
        ``(loc, scale)``, each ``(b, latent_dim)``.
    :param decoder: an ``(init_fn, apply_fn)`` pair or a flax linen module mapping ``z (n, L)``
        to the likelihood's parameter of shape ``(n, ...)`` as ``Y`` (logits for
        ``"bernoulli"``, the mean for ``"gaussian"``).
    :param kernel: a :mod:`numpyro_scalegp.kernels` kernel over the auxiliary inputs.
    :param Z: ``(M, D)`` initial inducing inputs.
    :param num_data: ``N``; ``latent_dim``: ``L``.
    :param likelihood: ``"bernoulli"``, ``"gaussian"`` (learned variance ``noise``) or a callable
        mapping the decoder output to a distribution with batch shape ``Y.shape``.
    :param noise: initial variance of the Gaussian likelihood.
    :param jitter: added to the diagonal of :math:`K_{mm}`.

    .. note:: Cost: ``O(b M^2 L + M^3 L)`` time per batch plus the networks; conditioning on
        ``N`` points costs ``O(N M^2 L)``.
    """

    def __init__(self, encoder, decoder, kernel: Kernel, Z, *, num_data: int, latent_dim: int,
                 likelihood: str | Callable = "bernoulli", noise: float = 0.1, jitter: float = 1e-6):
        super().__init__(decoder, latent_dim, likelihood, noise)
        self.guide = SVGPVAEGuide(encoder, kernel, Z, num_data=num_data, latent_dim=latent_dim,
                                  jitter=jitter, prefix="guide.")

    def _gp_term(self, X, Y):
        loc, scale, kl = self.guide.marginals(X, Y)
        return loc, scale, -(loc.shape[0] / self.guide.num_data) * kl.sum()

    def _condition(self, X_train, Y_train):
        g = self.guide
        Zi, kernel = g._params()
        X, loc, scale = g._latent(X_train, Y_train, None)
        Lm, _, _, _, alpha, LB = g._factors(Zi, kernel, X, loc, scale, 1.0)
        return Zi, kernel, Lm, alpha, LB

    def _latent_at(self, X, state):
        Zi, kernel, Lm, alpha, LB = state
        V = solve_triangular(Lm, kernel(Zi, X), lower=True)
        return _predict_channels(V, kernel(X, diag=True), LB, alpha)


class ExactGPVAE(_GPVAE):
    """The exact GP-VAE of Pearce [2] (full GP posterior per latent channel; every call uses the
    whole set it is given):

    .. math::

        \\mathcal{L} = \\sum_i \\mathbb{E}_q[\\log p_\\psi(y_i \\mid z_i)
          - \\log \\mathcal{N}(z_i \\mid \\tilde y_i, \\tilde\\sigma_i^2)]
          + \\sum_l \\log \\mathcal{N}(\\tilde y^l \\mid 0, K + \\mathrm{diag}(\\tilde\\sigma^{l2})).

    Parameters ``kernel[i]``, ``encoder$params``, ``decoder$params`` (and ``noise``).

    .. note:: Cost: ``O(N^3 L)`` time and ``O(N^2 L)`` memory.
    """

    def __init__(self, encoder, decoder, kernel: Kernel, *, latent_dim: int,
                 likelihood: str | Callable = "bernoulli", noise: float = 0.1):
        super().__init__(decoder, latent_dim, likelihood, noise)
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel: expected a numpyro_scalegp.kernels.Kernel, got {type(kernel).__name__}")
        self.encoder, self.kernel = _check_network("encoder", encoder), kernel

    def _posterior(self, X, Y):
        X, Y = _check_data(X, Y)
        self.kernel.check_inputs(X)
        kernel = _kernel_param("kernel", self.kernel)
        ytilde, sigtilde = _encode("encoder", self.encoder, Y, self.latent_dim)
        K = kernel(X)
        Ly, a = _exact_channels(K, ytilde.T, sigtilde.T)  # (L, b, b), (L, b)
        return X, kernel, ytilde.T, sigtilde.T, K, Ly, a

    def _gp_term(self, X, Y):
        X, kernel, yt, st, K, Ly, a = self._posterior(X, Y)
        mean = a @ K  # K symmetric: rows are K a_l
        var = self._var(kernel(X, diag=True), K, Ly)
        b = X.shape[0]
        log_z = (-0.5 * (yt * a).sum(-1) - jnp.log(jnp.diagonal(Ly, axis1=-2, axis2=-1)).sum(-1)
                 - 0.5 * b * math.log(2 * math.pi))
        cross = (-0.5 * jnp.log(2 * math.pi * st**2) - ((mean - yt) ** 2 + var) / (2 * st**2)).sum()
        return mean.T, jnp.sqrt(var).T, log_z.sum() - cross

    @staticmethod
    def _var(kdiag, Kxs, Ly):
        return jnp.clip(kdiag - (_solve_channels(Ly, Kxs) ** 2).sum(-2), 0.0)

    def guide(self, X, Y):
        """Samples ``"z"`` of shape ``(b, L)`` from the exact posterior marginals."""
        loc, scale, _ = self._gp_term(X, Y)
        with numpyro.plate("data", loc.shape[0], dim=-1):
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return {"z": z}

    def _condition(self, X_train, Y_train):
        X, kernel, _, _, _, Ly, a = self._posterior(X_train, Y_train)
        return X, kernel, Ly, a

    def _latent_at(self, Xs, state):
        X, kernel, Ly, a = state
        Ks = kernel(X, Xs)  # (N, n)
        return a @ Ks, self._var(kernel(Xs, diag=True), Ks, Ly)
