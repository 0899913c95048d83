"""Scalable GP-VAEs: the amortized sparse-GP guide of SVGP-VAE [1] and the exact GP-VAE of [2].

Generative model: ``L`` independent latent functions :math:`f^l \\sim \\mathcal{GP}(0, k)`
evaluated at auxiliary inputs :math:`x_i` give latents :math:`z_i = (f^1(x_i), \\dots,
f^L(x_i))`, decoded into :math:`p_\\psi(y_i \\mid z_i)`. An encoder maps each :math:`y_i`
to latent pseudo-observations :math:`(\\tilde y_i^l, \\tilde\\sigma_i^l)`; the approximate
posterior of channel ``l`` is the GP posterior of the regression :math:`\\tilde y^l = f^l(X) +
\\tilde\\sigma^l \\epsilon`. On a minibatch ``b`` of ``N`` points, with inducing inputs
:math:`U` (``Z`` here, ``M`` of them), SVGP-VAE uses the hybrid estimator (paper eq. 9)

.. math::

    \\Sigma_b = K_{mm} + \\tfrac{N}{b} K_{mb} \\tilde D_b^{-1} K_{bm}, \\quad
    \\mu_b = \\tfrac{N}{b} K_{mm} \\Sigma_b^{-1} K_{mb} \\tilde D_b^{-1} \\tilde y_b, \\quad
    A_b = K_{mm} \\Sigma_b^{-1} K_{mm}, \\quad \\tilde D_b = \\mathrm{diag}(\\tilde\\sigma_b^2),

and the batch ELBO (paper eq. 10, with the Hensman bound :math:`L_H` of eq. 7)

.. math::

    \\mathcal{L}_b = \\sum_{i \\in b} \\mathbb{E}_{q}[\\log p_\\psi(y_i \\mid z_i)]
      - \\sum_{i \\in b} \\sum_l \\mathbb{E}_q[\\log \\mathcal{N}(z_i^l \\mid \\tilde y_i^l,
      \\tilde\\sigma_i^{l2})] + \\sum_l L_H^l,

    L_H^l = \\sum_{i \\in b} \\Big[\\log \\mathcal{N}(\\tilde y_i^l \\mid m_i^l, \\tilde\\sigma_i^{l2})
      - \\frac{\\tilde k_{ii} + \\mathrm{tr}(A_b^l \\Lambda_i)}{2 \\tilde\\sigma_i^{l2}}\\Big]
      - \\tfrac{b}{N} \\mathrm{KL}(\\mathcal{N}(\\mu_b^l, A_b^l) \\,\\|\\, \\mathcal{N}(0, K_{mm})).

The marginals of :math:`q` at :math:`x_i` are :math:`m_i = k_i^\\top K_{mm}^{-1} \\mu_b` and
:math:`v_i = k_{ii} - k_i^\\top K_{mm}^{-1} k_i + k_i^\\top \\Sigma_b^{-1} k_i =
\\tilde k_{ii} + \\mathrm{tr}(A_b \\Lambda_i)`, so the closed-form cross-entropy
:math:`\\mathbb{E}_q[\\log \\mathcal{N}(z_i \\mid \\tilde y_i, \\tilde\\sigma_i^2)] =
\\log \\mathcal{N}(\\tilde y_i \\mid m_i, \\tilde\\sigma_i^2) - v_i / (2\\tilde\\sigma_i^2)` equals
the data term of :math:`L_H` point by point, and the batch ELBO is exactly

.. math::

    \\mathcal{L}_b = \\sum_{i \\in b} \\mathbb{E}_{q}[\\log p_\\psi(y_i \\mid z_i)]
      - \\tfrac{b}{N} \\sum_l \\mathrm{KL}(\\mathcal{N}(\\mu_b^l, A_b^l) \\,\\|\\, \\mathcal{N}(0, K_{mm})),

which is what is computed (the tests check it against eq. 10 written out term by term).
With :math:`B = I + \\frac{N}{b} V \\tilde D_b^{-1} V^\\top`, :math:`V = L_m^{-1} K_{mb}`,
:math:`L_m L_m^\\top = K_{mm}`, :math:`\\alpha = \\frac{N}{b} B^{-1} V \\tilde D_b^{-1}\\tilde y_b`:
:math:`\\mu_b = L_m \\alpha`, :math:`A_b = L_m B^{-1} L_m^\\top`, :math:`m = V^\\top \\alpha`,
:math:`v = k_{ii} - \\|V_i\\|^2 + \\|L_B^{-1} V_i\\|^2` and
:math:`2\\,\\mathrm{KL} = \\mathrm{tr}(B^{-1}) + \\|\\alpha\\|^2 - M + \\log|B|`, by Cholesky
factors only.

In Pyro the ELBO is split into sites so that ``SVI(vae.model, vae.guide, optim,
Trace_ELBO())`` optimizes :math:`\\mathcal{L}_b`: the guide samples ``z`` (shape ``(b, L)``)
from the marginals of :math:`q`, reparameterized; the model scores ``z`` under the same
marginals (so the two cancel exactly for every sample), adds the GP term with
``pyro.factor`` and observes ``y``. The loss is the negative batch ELBO, not rescaled to the
whole data set (multiply by ``N / b`` for a full-data estimate).

References:

1. M. Jazbec, M. Ashman, V. Fortuin, M. Pearce, S. Mandt, G. Rätsch. Scalable Gaussian
   process variational autoencoders. AISTATS 2021.
2. M. Pearce. The Gaussian process prior VAE for interpretable latent dynamics from
   pixels. AABI 2020.
3. J. Hensman, N. Fusi, N. D. Lawrence. Gaussian processes for big data. UAI 2013.
4. M. Titsias. Variational learning of inducing variables in sparse Gaussian processes.
   AISTATS 2009.
"""
from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn.module import PyroModule, PyroParam, pyro_method
from torch.distributions import constraints

from .kernels import check_finite, check_kernel_inputs

__all__ = ["SVGPVAEGuide", "SVGPVAE", "ExactGPVAE"]


def _check_data(X, Y, num_data: int | None = None):
    if not isinstance(X, torch.Tensor) or X.dim() not in (1, 2):
        raise ValueError(f"X: expected a tensor of shape (b,) or (b, D), got {getattr(X, 'shape', type(X))}")
    if not isinstance(Y, torch.Tensor) or Y.dim() < 1:
        raise ValueError(f"Y: expected a tensor of shape (b, ...), got {getattr(Y, 'shape', type(Y))}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y: has {Y.shape[0]} rows but X has {X.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError("X: empty batch")
    if num_data is not None and X.shape[0] > num_data:
        raise ValueError(f"X: batch of {X.shape[0]} points exceeds num_data={num_data}")
    check_finite("X", X)
    check_finite("Y", Y)
    return X if X.dim() == 2 else X.unsqueeze(-1)


def _check_X(X):
    if not isinstance(X, torch.Tensor) or X.dim() not in (1, 2):
        raise ValueError(f"X_new: expected a tensor of shape (n,) or (n, D), got {getattr(X, 'shape', type(X))}")
    check_finite("X_new", X)
    return X if X.dim() == 2 else X.unsqueeze(-1)


def _encode(encoder, Y, latent_dim: int, dtype: torch.dtype | None = None):
    """The encoder's ``(loc, scale)`` of ``Y``, checked to be ``(b, latent_dim)`` and, given ``dtype``,
    of the GP's dtype (``loc`` meets the kernel matrices, and the decoder takes the latents)."""
    loc, scale = encoder(Y)
    shape = (Y.shape[0], latent_dim)
    if tuple(loc.shape) != shape or tuple(scale.shape) != shape:
        raise ValueError(f"encoder: must return (loc, scale) of shape {shape}, got "
                         f"{tuple(loc.shape)} and {tuple(scale.shape)}")
    if dtype is not None and (loc.dtype != dtype or scale.dtype != dtype):
        raise ValueError(f"encoder: returns (loc, scale) in {loc.dtype} and {scale.dtype} but the inducing inputs "
                         f"Z are {dtype}; build the networks and Z in one dtype")
    return loc, scale


def _eye_like(A, n):
    return torch.eye(n, dtype=A.dtype, device=A.device)


class SVGPVAEGuide(PyroModule):
    """Amortized sparse-GP guide of SVGP-VAE [1] (see the module docstring for the maths).

    :param encoder: a ``torch.nn.Module`` mapping ``Y`` of shape ``(b, ...)`` to
        ``(loc, scale)``, each ``(b, latent_dim)``: the latent pseudo-observations
        :math:`\\tilde y` and their standard deviations :math:`\\tilde\\sigma` (positive).
    :param kernel: a ``pyro.contrib.gp.kernels`` kernel (or any ``PyroModule`` with
        ``forward(X, Z=None, diag=False)``), shared by the latent channels.
    :param Z: ``(M, D)`` initial inducing inputs (learned).
    :param num_data: ``N``, the size of the data set the minibatches are drawn from.
    :param latent_dim: ``L``, the number of latent channels.
    :param jitter: added to the diagonal of :math:`K_{mm}`.

    ``forward(X, Y)`` samples the site ``"z"`` of shape ``(b, L)`` inside the plate
    ``"data"`` and returns ``{"z": z}``.

    .. note:: Cost: ``O(b M^2 L + M^3 L)`` time and ``O(b M + M^2 L)`` memory per batch.
    """

    def __init__(self, encoder: torch.nn.Module, kernel, Z: torch.Tensor, *, num_data: int,
                 latent_dim: int, jitter: float = 1e-6):
        super().__init__()
        if int(num_data) != num_data or num_data < 1:
            raise ValueError(f"num_data: must be a positive integer, got {num_data!r}")
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim: must be a positive integer, got {latent_dim!r}")
        if not isinstance(Z, torch.Tensor) or Z.dim() not in (1, 2):
            raise ValueError(f"Z: expected a tensor of shape (M,) or (M, D), got {getattr(Z, 'shape', type(Z))}")
        if torch.isnan(Z).any():
            raise ValueError("Z: contains NaN")
        check_kernel_inputs(kernel, 1 if Z.dim() == 1 else Z.shape[1], "Z")
        self.encoder = encoder
        self.kernel = kernel
        self.Z = PyroParam(Z if Z.dim() == 2 else Z.unsqueeze(-1))
        self.num_data = int(num_data)
        self.latent_dim = int(latent_dim)
        self.jitter = float(jitter)

    def _latent(self, X, Y, num_data: int | None):
        """The latent data set of a batch, ``(X, loc, scale)`` with ``loc``, ``scale`` of shape
        ``(b, L)``, after checking the inputs (a batch may not exceed ``num_data``)."""
        X = _check_data(X, Y, num_data).to(self.Z)  # e.g. float64 times beside float32 networks and Z
        pyro.module(self._pyro_get_fullname("encoder"), self.encoder)
        loc, scale = _encode(self.encoder, Y, self.latent_dim, self.Z.dtype)
        return X, loc, scale

    def _factors(self, X, loc, scale, weight: float):
        """Cholesky pieces of the sparse posterior from the latent data ``(X, loc, scale)`` with
        data weight ``weight`` (``N / b`` for eq. 9): ``(L_m, V, L_B, alpha)``."""
        Zi = self.Z
        M = Zi.shape[0]
        Kmm = self.kernel(Zi) + self.jitter * _eye_like(Zi, M)
        Lm = torch.linalg.cholesky(Kmm)
        V = torch.linalg.solve_triangular(Lm, self.kernel(Zi, X), upper=False)  # (M, b)
        prec = weight / scale.T**2  # (L, b)
        B = _eye_like(Zi, M) + (V * prec.unsqueeze(-2)) @ V.T  # (L, M, M)
        LB = torch.linalg.cholesky(B)
        beta = V @ (prec * loc.T).unsqueeze(-1)  # (L, M, 1)
        alpha = torch.cholesky_solve(beta, LB)
        return Lm, V, LB, alpha

    @staticmethod
    def _predict(kdiag, V, LB, alpha):
        """Marginal means and variances ``(L, n)`` at points with whitened cross-covariance ``V``."""
        mean = (V.T @ alpha).squeeze(-1)  # (L, n)
        W = torch.linalg.solve_triangular(LB, V.expand(LB.shape[0], -1, -1), upper=False)
        var = (kdiag - (V**2).sum(0)).clamp_min(0.0) + (W**2).sum(-2)
        return mean, var

    @staticmethod
    def _kl(LB, alpha):
        """``KL(N(mu, A) || N(0, K_mm))`` per channel, shape ``(L,)``."""
        M = LB.shape[-1]
        LBinv = torch.linalg.solve_triangular(LB, _eye_like(LB, M).expand_as(LB), upper=False)
        return 0.5 * ((LBinv**2).sum((-1, -2)) + (alpha**2).sum((-1, -2)) - M
                      + 2.0 * torch.log(torch.diagonal(LB, dim1=-2, dim2=-1)).sum(-1))

    @pyro_method
    def hybrid_posterior(self, X_b, Y_b):
        """The hybrid estimator (paper eq. 9) of the inducing-point posterior on a batch.

        :returns: ``(mu_b, A_b)`` of shapes ``(L, M)`` and ``(L, M, M)``.
        """
        X, loc, scale = self._latent(X_b, Y_b, self.num_data)
        Lm, V, LB, alpha = self._factors(X, loc, scale, self.num_data / X.shape[0])
        R = torch.linalg.solve_triangular(LB, Lm.T.expand_as(LB), upper=False)  # L_B^-1 L_m^T
        return (Lm @ alpha).squeeze(-1), R.transpose(-1, -2) @ R

    @pyro_method
    def marginals(self, X, Y):
        """Marginals of :math:`q` at the batch points and the KL terms.

        :returns: ``(loc, scale, kl)``: ``loc``, ``scale`` of shape ``(b, L)`` (mean and standard
            deviation of :math:`z_i`) and ``kl`` of shape ``(L,)``, the
            :math:`\\mathrm{KL}(\\mathcal{N}(\\mu_b^l, A_b^l) \\| \\mathcal{N}(0, K_{mm}))`.
        """
        X, ytilde, sigtilde = self._latent(X, Y, self.num_data)
        Lm, V, LB, alpha = self._factors(X, ytilde, sigtilde, self.num_data / X.shape[0])
        mean, var = self._predict(self.kernel(X, diag=True), V, LB, alpha)
        return mean.T, var.sqrt().T, self._kl(LB, alpha)

    def forward(self, X, Y):
        loc, scale, _ = self.marginals(X, Y)
        with pyro.plate("data", loc.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return {"z": z}


class _GPVAE(PyroModule):
    """Decoder and likelihood shared by :class:`SVGPVAE` and :class:`ExactGPVAE`."""

    def __init__(self, decoder: torch.nn.Module, latent_dim: int, likelihood, noise: float):
        super().__init__()
        if not (likelihood in ("bernoulli", "gaussian") or callable(likelihood)):
            raise ValueError(f"likelihood: expected 'bernoulli', 'gaussian' or a callable, got {likelihood!r}")
        self.decoder = decoder
        self.latent_dim = int(latent_dim)
        self.likelihood = likelihood
        if likelihood == "gaussian":
            self.noise = PyroParam(torch.tensor(float(noise)), constraints.positive)

    @pyro_method
    def observation(self, z, event_dim: int):
        """The distribution of ``y`` given latents ``z`` of shape ``(n, L)``, with ``event_dim``
        trailing event dimensions."""
        pyro.module(self._pyro_get_fullname("decoder"), self.decoder)
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            d = dist.Bernoulli(logits=out)
        elif self.likelihood == "gaussian":
            d = dist.Normal(out, self.noise.sqrt())
        else:
            d = self.likelihood(out)
        return d.to_event(event_dim)

    def _elbo(self, loc, scale, gp_term, Y):
        z = dist.Normal(loc, scale).rsample()
        return self.observation(z, Y.dim() - 1).log_prob(Y).sum() + gp_term

    def _model(self, loc, scale, gp_term, Y):
        data = pyro.plate("data", Y.shape[0], dim=-1)
        with data:
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        pyro.factor("gp", gp_term)
        with data:
            pyro.sample("y", self.observation(z, Y.dim() - 1), obs=Y)

    @pyro_method
    def generate(self, X_new):
        """Decode the posterior mean latents at new auxiliary inputs (after :meth:`condition`):
        the distribution of ``y`` at ``X_new``, batch shape ``(n,)``."""
        latent = self.latent(X_new)
        return self.observation(latent.mean, self._event_dim)


class SVGPVAE(_GPVAE):
    """SVGP-VAE [1]: a GP-VAE with the amortized sparse-GP guide :class:`SVGPVAEGuide`.

    :param encoder: ``Y (b, ...) -> (loc, scale)``, each ``(b, latent_dim)``.
    :param decoder: ``z (n, latent_dim) -> `` the likelihood's parameter, shape ``(n, ...)`` as
        ``Y``: logits for ``"bernoulli"``, the mean for ``"gaussian"``.
    :param kernel: a ``pyro.contrib.gp.kernels`` kernel over the auxiliary inputs.
    :param Z: ``(M, D)`` initial inducing inputs.
    :param num_data: ``N``; ``latent_dim``: ``L``.
    :param likelihood: ``"bernoulli"``, ``"gaussian"`` (learned variance ``noise``) or a callable
        mapping the decoder output to a distribution with batch shape ``Y.shape``.
    :param noise: initial variance of the Gaussian likelihood.
    :param jitter: added to the diagonal of :math:`K_{mm}`.

    ``SVI(vae.model, vae.guide, optim, Trace_ELBO())`` on minibatches ``(X_b, Y_b)``
    maximizes the batch ELBO (paper eq. 10); :meth:`elbo` computes it directly. After
    training, :meth:`condition` encodes the training data (all of it, weight 1) and
    :meth:`latent` / :meth:`generate` predict at new auxiliary inputs.

    .. note:: Cost: ``O(b M^2 L + M^3 L)`` time per batch plus the networks; conditioning on
        ``N`` points costs ``O(N M^2 L)``.
    """

    def __init__(self, encoder, decoder, kernel, Z, *, num_data: int, latent_dim: int,
                 likelihood: str | Callable = "bernoulli", noise: float = 0.1, jitter: float = 1e-6):
        super().__init__(decoder, latent_dim, likelihood, noise)
        self.guide = SVGPVAEGuide(encoder, kernel, Z, num_data=num_data, latent_dim=latent_dim,
                                  jitter=jitter)
        self._conditioned = None

    def _gp_term(self, X, Y):
        loc, scale, kl = self.guide.marginals(X, Y)
        return loc, scale, -(X.shape[0] / self.guide.num_data) * kl.sum()

    @pyro_method
    def model(self, X, Y):
        """The model of the Pyro split of the batch ELBO (see the module docstring)."""
        self._model(*self._gp_term(X, Y), Y)

    @pyro_method
    def elbo(self, X, Y):
        """The batch ELBO (paper eq. 10) with one reparameterized sample of ``z``."""
        return self._elbo(*self._gp_term(X, Y), Y)

    @pyro_method
    def condition(self, X_train, Y_train):
        """Encode a whole data set (weight 1, i.e. ``b = N``) into the inducing-point posterior
        used by :meth:`latent` and :meth:`generate`; returns ``self``."""
        g = self.guide
        X, loc, scale = g._latent(X_train, Y_train, None)
        self._conditioned = g._factors(X, loc, scale, 1.0)
        self._event_dim = Y_train.dim() - 1
        return self

    @pyro_method
    def latent(self, X_new):
        """Posterior marginals of the latents at ``X_new``: ``Normal`` of batch shape ``(n,)`` and
        event shape ``(L,)``."""
        if self._conditioned is None:
            raise ValueError("condition: call condition(X_train, Y_train) before predicting")
        X = _check_X(X_new).to(self.guide.Z)
        Lm, _, LB, alpha = self._conditioned
        V = torch.linalg.solve_triangular(Lm, self.guide.kernel(self.guide.Z, X), upper=False)
        mean, var = SVGPVAEGuide._predict(self.guide.kernel(X, diag=True), V, LB, alpha)
        return dist.Normal(mean.T, var.sqrt().T).to_event(1)


class ExactGPVAE(_GPVAE):
    """The exact GP-VAE of Pearce [2]: the full GP posterior of each latent channel given the
    latent data set, for small data sets (every call uses the whole set it is given).

    .. math::

        \\mathcal{L} = \\sum_i \\mathbb{E}_q[\\log p_\\psi(y_i \\mid z_i)
          - \\log \\mathcal{N}(z_i \\mid \\tilde y_i, \\tilde\\sigma_i^2)]
          + \\sum_l \\log \\mathcal{N}(\\tilde y^l \\mid 0, K + \\mathrm{diag}(\\tilde\\sigma^{l2})),

    the cross-entropy in closed form from the posterior marginals. Same parameters and
    methods as :class:`SVGPVAE` without ``Z`` and ``num_data``; ``guide`` samples ``"z"``.

    .. note:: Cost: ``O(N^3 L)`` time and ``O(N^2 L)`` memory.
    """

    def __init__(self, encoder, decoder, kernel, *, latent_dim: int,
                 likelihood: str | Callable = "bernoulli", noise: float = 0.1):
        super().__init__(decoder, latent_dim, likelihood, noise)
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim: must be a positive integer, got {latent_dim!r}")
        self.encoder = encoder
        self.kernel = kernel
        self._conditioned = None

    def _posterior(self, X, Y):
        X = _check_data(X, Y)
        check_kernel_inputs(self.kernel, 1 if X.dim() == 1 else X.shape[1])
        pyro.module(self._pyro_get_fullname("encoder"), self.encoder)
        ytilde, sigtilde = _encode(self.encoder, Y, self.latent_dim)
        X = X.to(ytilde)  # the GP in the encoder's dtype, as the latents it gives the decoder
        K = self.kernel(X)
        Ly = torch.linalg.cholesky(K + torch.diag_embed(sigtilde.T**2))  # (L, b, b)
        return X, ytilde.T, sigtilde.T, K, Ly

    def _gp_term(self, X, Y):
        X, yt, st, K, Ly = self._posterior(X, Y)
        a = torch.cholesky_solve(yt.unsqueeze(-1), Ly)  # (L, b, 1)
        mean = (K @ a).squeeze(-1)
        W = torch.linalg.solve_triangular(Ly, K.expand_as(Ly), upper=False)
        var = (self.kernel(X, diag=True) - (W**2).sum(-2)).clamp_min(0.0)
        b = X.shape[0]
        log_z = (-0.5 * (yt.unsqueeze(-1) * a).sum((-1, -2))
                 - torch.log(torch.diagonal(Ly, dim1=-2, dim2=-1)).sum(-1) - 0.5 * b * math.log(2 * math.pi))
        cross = (-0.5 * torch.log(2 * math.pi * st**2) - ((mean - yt) ** 2 + var) / (2 * st**2)).sum()
        return mean.T, var.sqrt().T, log_z.sum() - cross

    @pyro_method
    def model(self, X, Y):
        """The model of the Pyro split of the ELBO (z scored under the guide's marginals)."""
        self._model(*self._gp_term(X, Y), Y)

    @pyro_method
    def guide(self, X, Y):
        """Samples ``"z"`` of shape ``(b, L)`` from the exact posterior marginals."""
        loc, scale, _ = self._gp_term(X, Y)
        with pyro.plate("data", loc.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return {"z": z}

    @pyro_method
    def elbo(self, X, Y):
        """The GP-VAE ELBO with one reparameterized sample of ``z``."""
        return self._elbo(*self._gp_term(X, Y), Y)

    @pyro_method
    def condition(self, X_train, Y_train):
        """Encode the training set for :meth:`latent` and :meth:`generate`; returns ``self``."""
        X, yt, _, _, Ly = self._posterior(X_train, Y_train)
        self._conditioned = (X, Ly, torch.cholesky_solve(yt.unsqueeze(-1), Ly))
        self._event_dim = Y_train.dim() - 1
        return self

    @pyro_method
    def latent(self, X_new):
        """Exact posterior marginals of the latents at ``X_new`` (``Normal``, event shape ``(L,)``)."""
        if self._conditioned is None:
            raise ValueError("condition: call condition(X_train, Y_train) before predicting")
        X, Ly, a = self._conditioned
        Xs = _check_X(X_new).to(X)
        Ks = self.kernel(X, Xs)  # (N, n)
        mean = (Ks.T @ a).squeeze(-1)  # (L, n)
        W = torch.linalg.solve_triangular(Ly, Ks.expand(Ly.shape[0], -1, -1), upper=False)
        var = (self.kernel(Xs, diag=True) - (W**2).sum(-2)).clamp_min(0.0)
        return dist.Normal(mean.T, var.sqrt().T).to_event(1)
