r"""ADVGP: the weight-space variational sparse GP of Peng et al. (2017) [1], for Pyro.

The GP prior is augmented with a weight vector :math:`w \in \mathbb{R}^M` and
features built from ``M`` inducing inputs :math:`Z`:

.. math::

    p(w) = \mathcal N(0, I_M), \quad
    \phi(x) = L^\top k(Z, x), \quad L L^\top = K_{zz}^{-1}, \quad
    p(f \mid w) = \mathcal N(\Phi w, K_{xx} - \Phi\Phi^\top), \quad
    p(y \mid f) = \mathcal N(f, \sigma^2 I).

We take :math:`L = \mathrm{chol}(K_{zz})^{-\top}`, so that
:math:`\Phi = (\mathrm{chol}(K_{zz})^{-1} K_{zx})^\top` is one triangular solve
(never an explicit inverse). With :math:`q(w) = \mathcal N(\mu, U^\top U)` the
negative ELBO is the paper's composite loss, data terms over shards plus a
convex, separable KL term:

.. math::

    -\mathrm{ELBO} = \sum_k g_k + h, \qquad
    g_k = \tfrac{n_k}{2}\log 2\pi\sigma^2 + \tfrac{1}{2\sigma^2}\Big[
        \|y_k - \Phi_k\mu\|^2 + \|\Phi_k U^\top\|_F^2
        + \textstyle\sum_{i\in k} k(x_i, x_i) - \|\Phi_k\|_F^2 \Big],

.. math::

    h = \tfrac12\big[\mu^\top\mu + \|U\|_F^2 - \textstyle\sum_j \log U_{jj}^2 - M\big]
      = \mathrm{KL}(q(w)\,\|\,p(w)).

A shard enters only through :math:`A_k = K_{zx_k}K_{x_kz}`, :math:`b_k = K_{zx_k}y_k`,
:math:`y_k^\top y_k` and :math:`\sum_{i\in k} k(x_i, x_i)`: with
:math:`T_k = \Phi_k^\top\Phi_k = L_z^{-1}A_kL_z^{-\top}` (:math:`L_z = \mathrm{chol}(K_{zz})`),

.. math::

    \|y_k - \Phi_k\mu\|^2 + \|\Phi_k U^\top\|_F^2 - \|\Phi_k\|_F^2
    = y_k^\top y_k - 2\mu^\top L_z^{-1}b_k + \mu^\top T_k\mu
      + \mathrm{tr}(U T_k U^\top) - \mathrm{tr}\,T_k,

so a gradient costs two ``N M^2`` matrix products (forming :math:`A_k` and its backward) and no
``N x M`` triangular solve (value and gradient 1.5-1.8x faster than through :math:`\Phi` on
61,000 flights rows with M = 50 and 100, in both frontends).

The guide holds :math:`\mu` as ``loc`` and :math:`U^\top` as ``scale_tril``
(lower triangular, positive diagonal), as in Pyro's ``MultivariateNormal``.
Prediction:
:math:`y_* \sim \mathcal N(\phi_*^\top\mu,\ \sigma^2 + k_{**} - \phi_*^\top\phi_* + \|U\phi_*\|^2)`.

[1] H. Peng, S. Zhe, X. Zhang, Y. Qi. Asynchronous Distributed Variational Gaussian
Process for Regression. ICML 2017.

.. note:: Cost: ``O(M^3 + N M^2)`` time and ``O(N M)`` memory for a loss or a
   gradient over ``N`` points (one Cholesky of ``K_zz``, the product ``K_zx K_xz`` and
   ``M x M`` triangular solves); prediction is ``O(M^2)`` per point.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.gp.kernels import RBF
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch.autograd.function import once_differentiable

from scalegp.advgp_gradient import rbf_data_term_and_gradients
from scalegp.async_server import unflatten

from .kernels import check_kernel_inputs

__all__ = ["ADVGP", "ADVGPGuide", "kl_term"]


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or infinite values")


def _check_inputs(X, y, Z) -> tuple[torch.Tensor, torch.Tensor | None]:
    X = torch.as_tensor(X, dtype=Z.dtype)
    if X.dim() != 2:
        raise ValueError(f"X: expected a 2-D tensor (N, d), got shape {tuple(X.shape)}")
    if X.shape[1] != Z.shape[1]:
        raise ValueError(f"X: expected {Z.shape[1]} columns (as Z), got {X.shape[1]}")
    _check_finite("X", X)
    if y is not None:
        y = torch.as_tensor(y, dtype=Z.dtype)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y: expected shape ({X.shape[0]},) to match X, got {tuple(y.shape)}")
        _check_finite("y", y)
    return X, y


def kl_term(loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    r"""The KL term :math:`h(\mu, U) = \mathrm{KL}(\mathcal N(\mu, U^\top U) \| \mathcal N(0, I))`
    with ``scale_tril`` :math:`= U^\top`.

    .. math:: h = \tfrac12\big[\mu^\top\mu + \|U\|_F^2 - \textstyle\sum_j \log U_{jj}^2 - M\big]

    .. note:: Cost: ``O(M^2)``.
    """
    diag = scale_tril.diagonal(dim1=-2, dim2=-1)
    return 0.5 * ((loc**2).sum(-1) + (scale_tril.tril() ** 2).sum((-2, -1))
                  - 2.0 * diag.log().sum(-1) - loc.shape[-1])


def _gram_statistics(Lz: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\Phi^\top\Phi, \Phi^\top y) = (L_z^{-1} A L_z^{-\top}, L_z^{-1} b)` from
    :math:`A = K_{zx}K_{xz}` and :math:`b = K_{zx} y` (``Lz`` lower triangular)."""
    half = torch.linalg.solve_triangular(Lz, A, upper=False)
    return (torch.linalg.solve_triangular(Lz, half.T, upper=False),
            torch.linalg.solve_triangular(Lz, b[:, None], upper=False)[:, 0])


def _solve_triangular(L: torch.Tensor, B: torch.Tensor, lower: bool) -> torch.Tensor:
    return torch.linalg.solve_triangular(L, B, upper=not lower)


class _RBFDataTerm(torch.autograd.Function):
    r""":math:`g_k` for Pyro's RBF kernel, its gradient written out and computed with the value
    (:func:`scalegp.advgp_gradient.rbf_data_term_and_gradients` on torch, which has the formulas;
    ``backward`` only scales the saved gradients). Checked against autograd in ``tests/test_advgp.py``.

    .. note:: Cost: ``O(M^3 + n M^2 + n M d)``, as the value.
    """

    @staticmethod
    def forward(ctx, variance, lengthscale, Z, noise, loc, scale_tril, X, y, jitter):
        value, grads = rbf_data_term_and_gradients(variance, lengthscale, Z, noise, loc, scale_tril, X, y, jitter,
                                                   xp=torch, solve_triangular=_solve_triangular)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    @once_differentiable  # the saved gradients are constants: a second derivative must not pass through them
    def backward(ctx, grad):
        return tuple(grad * g for g in ctx.saved_tensors) + (None, None, None)


class ADVGPGuide(PyroModule):
    r"""The variational posterior :math:`q(w) = \mathcal N(\mu, U^\top U)` of ADVGP.

    Parameters: ``loc`` (:math:`\mu`, shape ``(M,)``) and ``scale_tril``
    (:math:`U^\top`, lower triangular with positive diagonal). Calling the guide
    samples the site ``w`` and returns ``{"w": w}``, so it works with plain
    ``SVI``/``Trace_ELBO`` and ``Predictive``.

    :param M: number of weights (inducing points).
    :param init_scale: initial ``scale_tril`` is ``init_scale * I``.
    :param dtype: dtype of the parameters (default: torch's default dtype).

    .. note:: Cost: ``O(M^2)`` time per sample and ``O(M^2)`` memory.
    """

    def __init__(self, M: int, *, init_scale: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"M: expected a positive integer, got {M!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.M = M
        self.loc = PyroParam(torch.zeros(M, dtype=dtype))
        self.scale_tril = PyroParam(init_scale * torch.eye(M, dtype=dtype),
                                    constraint=constraints.lower_cholesky)

    def get_posterior(self) -> dist.MultivariateNormal:
        """``q(w)`` as a ``MultivariateNormal``."""
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        w = pyro.sample("w", self.get_posterior())
        return {"w": w}


class ADVGP(PyroModule):
    r"""Weight-space sparse GP regression (ADVGP [1]) with a closed-form composite loss.

    :param kernel: a ``pyro.contrib.gp.kernels`` kernel (or anything with
        ``forward(X, Z=None, diag=False)``).
    :param Z: ``(M, d)`` initial inducing inputs (learned).
    :param noise: initial observation noise variance :math:`\sigma^2 > 0` (learned).
    :param jitter: added to the diagonal of :math:`K_{zz}` before its Cholesky.
    :param init_scale: initial ``scale_tril`` of the guide is ``init_scale * I``.

    ``model(X, y)`` samples ``w ~ N(0, I_M)`` and adds the Jensen bound of the
    likelihood (paper eq. 8) as the factor ``"y"``; with ``y=None`` it samples
    ``y`` from :math:`\mathcal N(\Phi w, \sigma^2 + \mathrm{diag}(K_{xx} - \Phi\Phi^\top))`.
    ``guide`` is an :class:`ADVGPGuide`; ``loss(X, y)`` is the closed-form
    negative ELBO, ``loss_terms(X, y, shards)`` its split into ``g_k`` and ``h``,
    ``predict(X_new)`` the predictive distribution.

    The closed-form methods (``loss``, ``loss_terms``, ``data_term``, ``predict``) read
    this module's own parameters and never touch Pyro's global param store, so two
    models with equally named parameters cannot see each other's values there; only
    ``model`` (run as ``forward``, inside the module's Pyro context) goes through the
    param store, as ``SVI`` needs.

    .. note:: Cost: ``O(M^3 + N M^2)`` time, ``O(N M)`` memory per loss evaluation.
    """

    def __init__(self, kernel, Z, noise: float = 1.0, *, jitter: float = 1e-6,
                 init_scale: float = 1.0):
        super().__init__()
        Z = torch.as_tensor(Z)
        if not Z.is_floating_point():
            Z = Z.to(torch.get_default_dtype())
        if Z.dim() != 2 or Z.shape[0] < 1:
            raise ValueError(f"Z: expected a 2-D tensor (M, d) with M >= 1, got shape {tuple(Z.shape)}")
        _check_finite("Z", Z)
        noise = torch.as_tensor(noise, dtype=Z.dtype)
        if noise.dim() != 0 or not torch.isfinite(noise) or noise <= 0:
            raise ValueError(f"noise: expected a positive finite scalar, got {noise}")
        if not (math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter: expected a non-negative number, got {jitter!r}")
        check_kernel_inputs(kernel, Z.shape[1], "Z")
        self.kernel = kernel
        self.jitter = float(jitter)
        self.Z = PyroParam(Z.detach().clone())
        self.noise = PyroParam(noise.detach().clone(), constraint=constraints.positive)
        self.guide = ADVGPGuide(Z.shape[0], init_scale=init_scale, dtype=Z.dtype)

    @property
    def num_inducing(self) -> int:
        return self.guide.M

    def _check_data(self, X, y):
        X, y = _check_inputs(X, y, self.Z.detach())
        if y is not None and self.num_inducing > X.shape[0]:
            raise ValueError(f"Z: M={self.num_inducing} inducing points exceed the N={X.shape[0]} rows of X")
        return X, y

    def _chol_zz(self) -> torch.Tensor:
        Z = self.Z
        Kzz = self.kernel.forward(Z)
        Kzz = Kzz + self.jitter * torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)
        return torch.linalg.cholesky(Kzz)

    def features(self, X: torch.Tensor, *, chol_zz: torch.Tensor | None = None) -> torch.Tensor:
        r"""The ``(N, M)`` feature matrix :math:`\Phi = K_{xz}L`, :math:`L = \mathrm{chol}(K_{zz})^{-\top}`."""
        Lz = self._chol_zz() if chol_zz is None else chol_zz
        Kzx = self.kernel.forward(self.Z, X)
        return torch.linalg.solve_triangular(Lz, Kzx, upper=False).transpose(-2, -1)

    def data_term(self, X: torch.Tensor, y: torch.Tensor, *, chol_zz: torch.Tensor | None = None) -> torch.Tensor:
        r"""The data term :math:`g_k` of the rows ``(X, y)`` (paper eq. 15); differentiable
        in the kernel hyperparameters, ``Z``, ``noise``, ``loc`` and ``scale_tril``. Computed from
        the shard's statistics :math:`K_{zx}K_{xz}` and :math:`K_{zx}y` (see the module docstring),
        never forming :math:`\Phi`. For an RBF kernel (Pyro's ``RBF`` itself) with the gradient
        to be taken and no ``chol_zz`` given, value and gradient come from :class:`_RBFDataTerm`."""
        if (chol_zz is None and type(self.kernel) is RBF and torch.is_grad_enabled()
                and not (X.requires_grad or y.requires_grad)):
            k = self.kernel
            Xs, Zs = k._slice_input(X), k._slice_input(self.Z)
            return _RBFDataTerm.apply(k.variance, k.lengthscale.expand(Xs.shape[1]), Zs, self.noise,
                                      self.guide.loc, self.guide.scale_tril, Xs, y, self.jitter)
        Lz = self._chol_zz() if chol_zz is None else chol_zz
        Kzx = self.kernel.forward(self.Z, X)
        T, c = _gram_statistics(Lz, Kzx @ Kzx.T, Kzx @ y)
        loc, scale_tril = self.guide.loc, self.guide.scale_tril
        quad = (y @ y - 2 * loc @ c + loc @ T @ loc + (scale_tril * (T @ scale_tril)).sum()
                + self.kernel.forward(X, diag=True).sum() - T.diagonal().sum())
        return 0.5 * X.shape[0] * torch.log(2 * math.pi * self.noise) + 0.5 * quad / self.noise

    def kl(self) -> torch.Tensor:
        """The KL term ``h`` (see :func:`kl_term`)."""
        return kl_term(self.guide.loc, self.guide.scale_tril)

    def loss_terms(self, X, y, shards: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, h)``: the data terms ``g`` (shape ``(K,)``, one per shard of row indices;
        one shard of all rows by default) and the KL term ``h``. ``g.sum() + h`` is the
        negative ELBO."""
        X, y = self._check_data(X, y)
        if shards is None:
            shards = [torch.arange(X.shape[0])]
        Lz = self._chol_zz()
        g = torch.stack([self.data_term(X[idx], y[idx], chol_zz=Lz)
                         for idx in (torch.as_tensor(s, dtype=torch.long) for s in shards)])
        return g, self.kl()

    def loss(self, X, y) -> torch.Tensor:
        """The closed-form negative ELBO ``sum_k g_k + h`` (no sampling)."""
        g, h = self.loss_terms(X, y)
        return g.sum() + h

    def model(self, X, y=None):
        """Pyro model: ``w ~ N(0, I_M)`` and the Jensen-bound likelihood as a factor.
        Runs as the module's ``forward`` so that every parameter is a Pyro param site."""
        return self(X, y)

    def forward(self, X, y=None):
        X, y = self._check_data(X, y)
        M = self.num_inducing
        w = pyro.sample("w", dist.Normal(X.new_zeros(M), 1.0).to_event(1))
        Phi = self.features(X)
        s2 = self.noise
        f = w @ Phi.T
        excess = self.kernel.forward(X, diag=True) - (Phi**2).sum(-1)
        if y is None:
            return pyro.sample("y", dist.Normal(f, (s2 + excess.clamp(min=0)).sqrt()).to_event(1))
        bound = dist.Normal(f, s2.sqrt()).log_prob(y).sum(-1) - 0.5 * excess.sum() / s2
        pyro.factor("y", bound)
        return y

    def predict(self, X_new) -> dist.Independent:
        r"""The predictive distribution of ``y`` at ``X_new`` under ``q(w)``: independent
        normals with mean :math:`\phi_*^\top\mu` and variance
        :math:`\sigma^2 + k_{**} - \phi_*^\top\phi_* + \|U\phi_*\|^2`."""
        X_new, _ = _check_inputs(X_new, None, self.Z.detach())
        Phi = self.features(X_new)
        mean = Phi @ self.guide.loc
        var = (self.noise + self.kernel.forward(X_new, diag=True) - (Phi**2).sum(-1)
               + ((Phi @ self.guide.scale_tril) ** 2).sum(-1))
        return dist.Normal(mean, var.clamp(min=torch.finfo(var.dtype).tiny).sqrt()).to_event(1)


# The parameters of an RBF ADVGP whose gradient _flat_rbf_gradient writes out, with the constraints their
# classes give them: Pyro maps a positive one from its unconstrained value u as exp(u), scale_tril as
# LowerCholeskyTransform (the strict lower triangle of u, exp of its diagonal), a real one as itself.
_RBF_PARAMETERS = {"Z": constraints.real, "noise": constraints.positive, "kernel.variance": constraints.positive,
                   "kernel.lengthscale": constraints.positive, "guide.loc": constraints.real,
                   "guide.scale_tril": constraints.lower_cholesky}


def _flat_rbf_gradient(advgp: ADVGP):
    r"""``gradient(flat, X, y) -> (g_k, grad g_k)`` in numpy, without autograd, for the workers of
    :class:`~pyro_scalegp.async_svi.AsyncProximalSVI`: ``flat`` holds the unconstrained parameters
    in the order of ``advgp.parameters()``, ``X`` (all input columns, ``advgp``'s dtype) and ``y`` are
    numpy arrays. :func:`scalegp.advgp_gradient.rbf_data_term_and_gradients` gives the gradients
    with respect to the constrained values, and the chain rule through the parametrization is
    written out: :math:`\bar u = \bar\theta\,e^u` for a positive :math:`\theta = e^u`, and for
    ``scale_tril`` the lower triangle of :math:`\bar S` with its diagonal times :math:`e^{u_{jj}}`.

    ``None`` (the caller differentiates :meth:`ADVGP.data_term` by autograd) unless the kernel is
    Pyro's ``RBF``, the parameters are on the CPU and are exactly the six of ``_RBF_PARAMETERS``,
    all trainable, with those constraints. Against autograd through :class:`_RBFDataTerm` (flights,
    256 rows, one thread, ``/work/notes/adhoc/worker_overhead.py M 4``): 1.72 -> 0.86 ms at M = 50,
    2.79 -> 1.87 ms at M = 100.

    .. note:: Cost: ``O(M^3 + n M^2 + n M d)``, as the value.
    """
    kernel = advgp.kernel
    if type(kernel) is not RBF or advgp.Z.device.type != "cpu":
        return None
    modules = dict(advgp.named_modules())
    names, shapes = [], []  # in the order of advgp.parameters()
    for full_name, p in advgp.named_parameters():
        owner, _, attr = full_name.rpartition(".")
        name = full_name.removesuffix("_unconstrained")
        declared = modules[owner].__dict__.get("_pyro_params", {}).get(attr.removesuffix("_unconstrained"))
        expected = _RBF_PARAMETERS.get(name)
        if (name == full_name or not p.requires_grad or declared is None  # (a model unpickled in a worker
                or type(declared[0]) is not type(expected) or vars(declared[0]) != vars(expected)):  # has copies)
            return None
        names.append(name)
        shapes.append(tuple(p.shape))
    if len(names) != len(_RBF_PARAMETERS):
        return None
    dtype = torch.empty(0, dtype=advgp.Z.dtype).numpy().dtype
    cols = list(kernel.active_dims)
    every_column = cols == list(range(advgp.Z.shape[1]))
    jitter = advgp.jitter

    def gradient(flat, X, y):
        u = unflatten(np.asarray(flat, dtype=dtype), names, shapes, dtype)
        variance, lengthscale, noise = (np.exp(u[k]) for k in ("kernel.variance", "kernel.lengthscale", "noise"))
        S, diag = np.tril(u["guide.scale_tril"], -1), np.exp(np.diagonal(u["guide.scale_tril"]))
        S[np.diag_indices_from(S)] = diag
        Z = u["Z"] if every_column else u["Z"][:, cols]
        value, (g_var, g_ell, g_Z, g_noise, g_loc, g_S) = rbf_data_term_and_gradients(
            variance, np.broadcast_to(lengthscale, (len(cols),)), Z, noise, u["guide.loc"], S,
            X if every_column else X[:, cols], y, jitter)
        if not every_column:  # the columns the kernel ignores get no gradient
            g_Z, active = np.zeros_like(u["Z"]), g_Z
            np.add.at(g_Z, (slice(None), cols), active)
        g_S = np.tril(g_S)
        g_S[np.diag_indices_from(g_S)] *= diag
        grads = {"Z": g_Z, "noise": g_noise * noise, "kernel.variance": g_var * variance,
                 "kernel.lengthscale": (g_ell.sum() if lengthscale.ndim == 0 else g_ell) * lengthscale,
                 "guide.loc": g_loc, "guide.scale_tril": g_S}
        return float(value), np.concatenate([np.ravel(grads[name]) for name in names])

    return gradient
