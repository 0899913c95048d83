r"""Proximal ADADELTA for ADVGP's composite loss :math:`\sum_k g_k + h`, as an optax transformation.

``h`` is the KL term of :math:`q(w) = \mathcal N(\mu, U^\top U)` against
:math:`\mathcal N(0, I)`, convex and separable:

.. math::

    h(\mu, U) = \tfrac12\big[\textstyle\sum_i \mu_i^2 + \sum_{i\le j} U_{ij}^2
        - \sum_j \log U_{jj}^2 - M\big].

A step takes the ADADELTA (Zeiler, 2012) per-coordinate step size
:math:`\gamma = \eta\sqrt{E[\Delta^2] + \epsilon}/\sqrt{E[g^2] + \epsilon}`, a gradient
step on the data terms :math:`v = x - \gamma\nabla g`, then the proximal operator of
:math:`\gamma h`, :math:`\arg\min_x \gamma h(x) + \tfrac12\|x - v\|^2`, in closed form
element by element (Peng et al., 2017, eqs. 18-20):

.. math::

    \mu_i \leftarrow \frac{v_i}{1 + \gamma_i}, \qquad
    U_{ij} \leftarrow \frac{v_{ij}}{1 + \gamma_{ij}}\ (i \ne j), \qquad
    U_{jj} \leftarrow \frac{v_{jj} + \sqrt{v_{jj}^2 + 4\gamma_{jj}(1 + \gamma_{jj})}}{2(1 + \gamma_{jj})}.

The diagonal stays positive whatever ``v``. ``E[\Delta^2]`` accumulates the step
actually taken, :math:`(x - x_{new})/\eta`; with no proximal leaf this is exactly
optax's / torch's ADADELTA. ``update(..., step_scale=c)`` takes one step with
:math:`c\gamma` (and accumulates :math:`(x - x_{new})/(c\eta)`, so the running averages do
not see ``c``): the delayed server's shrunk steps for stale gradients
(:mod:`scalegp.async_server`). Every other leaf (kernel hyperparameters, noise,
inducing inputs) takes a plain ADADELTA step.

The ``scale_tril`` leaf holds :math:`U^\top` unconstrained, as Pyro's
``PyroParam(constraint=lower_cholesky)`` stores it: the strict lower triangle as is,
the log of the diagonal. The step is taken on :math:`U^\top` itself (the gradient is
mapped to it first) and mapped back.

.. note:: Cost: ``O(P)`` time and memory per step for ``P`` parameters (two
   accumulators per parameter).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "lower_cholesky_from_unconstrained",
    "lower_cholesky_to_unconstrained",
    "prox_kl_loc",
    "prox_kl_scale_tril",
    "proximal_adadelta",
    "ProximalAdadeltaState",
]


def lower_cholesky_from_unconstrained(P):
    """Strict lower triangle of ``P`` plus ``exp`` of its diagonal (Pyro's ``LowerCholeskyTransform``)."""
    return jnp.tril(P, -1) + jnp.diag(jnp.exp(jnp.diagonal(P)))


def lower_cholesky_to_unconstrained(L):
    """Inverse of :func:`lower_cholesky_from_unconstrained`."""
    return jnp.tril(L, -1) + jnp.diag(jnp.log(jnp.diagonal(L)))


def prox_kl_loc(v, gamma):
    r""":math:`\arg\min_\mu \sum_i \gamma_i\mu_i^2/2 + (\mu_i - v_i)^2/2 = v / (1 + \gamma)`."""
    return v / (1.0 + gamma)


def prox_kl_scale_tril(V, gamma):
    r"""Proximal operator of :math:`\gamma h` in :math:`U^\top` (lower triangular ``V``):
    off-diagonal :math:`v/(1+\gamma)`, diagonal the positive root of
    :math:`(1+\gamma)u^2 - v u - \gamma = 0`; the strict upper triangle is zero. For
    :math:`v < 0` the root is taken as :math:`2\gamma/(s - v)`, :math:`s = \sqrt{v^2 + 4\gamma(1+\gamma)}`
    (the same number), since :math:`v + s` cancels to zero when :math:`v^2 \gg \gamma`."""
    gamma = jnp.broadcast_to(gamma, V.shape)
    off = jnp.tril(V, -1) / (1.0 + jnp.tril(gamma, -1))
    v = jnp.diagonal(V)
    g = jnp.diagonal(gamma)
    s = jnp.sqrt(v**2 + 4.0 * g * (1.0 + g))
    diag = jnp.where(v >= 0, (v + s) / (2.0 * (1.0 + g)), 2.0 * g / (s - v))
    return off + jnp.diag(diag)


class ProximalAdadeltaState(NamedTuple):
    """ADADELTA accumulators ``E[g^2]`` and ``E[Delta^2]`` (pytrees like the params)."""

    square_avg: optax.Updates
    acc_delta: optax.Updates


def proximal_adadelta(learning_rate: float = 1.0, rho: float = 0.9, eps: float = 1e-6, *,
                      loc: str = "guide.loc_unconstrained",
                      scale_tril: str = "guide.scale_tril_unconstrained") -> optax.GradientTransformationExtraArgs:
    """Proximal ADADELTA on a dict of parameters, ``update(grads, state, params, step_scale=1.0)``
    with the gradients of the data terms only (``h`` enters through its proximal operator);
    ``step_scale`` multiplies every step size (module docstring).

    :param learning_rate: ADADELTA's ``lr`` (scales the per-coordinate step).
    :param rho: decay of the running averages.
    :param eps: ADADELTA's ``epsilon``.
    :param loc: key of :math:`\\mu` in the params dict.
    :param scale_tril: key of the unconstrained :math:`U^\\top` in the params dict.

    .. note:: Cost: ``O(P)`` time and memory per step for ``P`` parameters.
    """
    for name, value in (("learning_rate", learning_rate), ("eps", eps)):
        if not value > 0:
            raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho: expected 0 <= rho < 1, got {rho!r}")

    def init_fn(params):
        if not isinstance(params, dict) or loc not in params or scale_tril not in params:
            raise ValueError(f"params: expected a dict holding {loc!r} and {scale_tril!r}")
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return ProximalAdadeltaState(square_avg=zeros, acc_delta=zeros)

    def _step(x, g, sq, acc, prox, lr):
        sq = rho * sq + (1.0 - rho) * g**2
        gamma = lr * jnp.sqrt(acc + eps) / jnp.sqrt(sq + eps)
        new = prox(x - gamma * g, gamma)
        delta = (x - new) / lr
        acc = rho * acc + (1.0 - rho) * delta**2
        return new, sq, acc

    def update_fn(grads, state, params=None, *, step_scale=1.0, **extra_args):
        if params is None:
            raise ValueError("params: proximal_adadelta needs the current params in update()")
        lr = learning_rate * step_scale
        new_params, new_sq, new_acc = {}, {}, {}
        for key, x in params.items():
            g, sq, acc = grads[key], state.square_avg[key], state.acc_delta[key]
            if key == loc:
                new, sq, acc = _step(x, g, sq, acc, prox_kl_loc, lr)
            elif key == scale_tril:
                C = lower_cholesky_from_unconstrained(x)
                u = jnp.diagonal(C)
                G = jnp.tril(g, -1) + jnp.diag(jnp.diagonal(g) / u)
                C_new, sq, acc = _step(C, G, sq, acc, prox_kl_scale_tril, lr)
                new = lower_cholesky_to_unconstrained(C_new)
            else:
                new, sq, acc = _step(x, g, sq, acc, lambda v, gamma: v, lr)
            new_params[key], new_sq[key], new_acc[key] = new, sq, acc
        updates = {key: new_params[key] - params[key] for key in params}
        return updates, ProximalAdadeltaState(square_avg=new_sq, acc_delta=new_acc)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
