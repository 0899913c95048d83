"""Combining the experts' predictions (Ng & Deisenroth section 3.3; Liu et al. 2018).

Written once for both frontends: the functions take the array namespace ``xp``
(``torch`` or ``jax.numpy``) and use only element-wise operations and sums
over the leading (expert) axis, so they run under autograd, ``jit`` and ``vmap``.

Each expert ``k`` predicts the latent ``f(x*)`` with mean ``m_k`` and variance
``v_k``; ``v_0 = k(x*, x*)`` is the prior variance. Every rule is a weighted
product of Gaussians with a prior correction:

.. math::

    \\frac{1}{v} = \\sum_k \\frac{\\beta_k}{v_k} + \\Big(1 - \\sum_k \\beta_k\\Big) \\frac{\\gamma}{v_0},
    \\qquad m = v \\Big(\\sum_k \\frac{\\beta_k m_k}{v_k} + \\Big(1 - \\sum_k \\beta_k\\Big)\\frac{\\gamma m_0}{v_0}\\Big)

* PoE: :math:`\\beta_k = 1`, :math:`\\gamma = 0`.
* gPoE: :math:`\\beta_k = 1/E`, :math:`\\gamma = 0` (the weights sum to one).
* BCM: :math:`\\beta_k = 1`, :math:`\\gamma = 1`, prior mean ``m_0`` (the GP mean).
* rBCM: :math:`\\beta_k = \\tfrac12(\\log v_0 - \\log v_k)`, :math:`\\gamma = 1`.
* GRBCM: the prior is replaced by the communication expert ``(m_c, v_c)``;
  the experts are the augmented ones, :math:`\\beta_1 = 1` and
  :math:`\\beta_k = \\tfrac12(\\log v_c - \\log v_k)` for ``k >= 2``.

The weighted sums are accumulated over the expert tree (paper section 3.4), each
node summing its children's sums, so a hierarchy gives the flat model's result
(up to the order of floating-point additions).

.. note:: Cost: ``O(E T)`` for ``E`` experts and ``T`` test points.
"""
from __future__ import annotations

from .partition import Tree

__all__ = ["COMBINE_RULES", "combine", "tree_sum"]

COMBINE_RULES = ("poe", "gpoe", "bcm", "rbcm", "grbcm")


def tree_sum(values, tree: Tree | None):
    """Sum ``values`` (leading axis = experts) node by node over ``tree``."""
    if tree is None:
        return values.sum(0)
    if isinstance(tree, int):
        return values[tree]
    total = None
    for child in tree:
        part = tree_sum(values, child)
        total = part if total is None else total + part
    return total


def combine(xp, rule: str, means, variances, prior_mean, prior_var, *, tree: Tree | None = None):
    """Combine expert predictions ``means, variances`` of shape ``(E, T)``.

    :param xp: array namespace (``torch`` or ``jax.numpy``).
    :param rule: one of :data:`COMBINE_RULES`.
    :param prior_mean, prior_var: ``(T,)``; for ``"grbcm"`` the communication
        expert's mean and variance.
    :returns: ``(mean, variance)`` of shape ``(T,)`` for the latent function.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine: unknown rule {rule!r}; use one of {COMBINE_RULES}")
    E = means.shape[0]
    if rule in ("poe", "bcm"):
        beta = xp.ones_like(variances)
    elif rule == "gpoe":
        beta = xp.ones_like(variances) / E
    elif rule == "rbcm":
        beta = 0.5 * (xp.log(prior_var) - xp.log(variances))
    else:  # grbcm
        beta = 0.5 * (xp.log(prior_var) - xp.log(variances))
        first = (xp.arange(E) == 0)[:, None]
        beta = xp.where(first, xp.ones_like(beta), beta)
    precision = tree_sum(beta / variances, tree)
    weighted_mean = tree_sum(beta * means / variances, tree)
    if rule in ("poe", "gpoe"):
        var = 1.0 / precision
        return var * weighted_mean, var
    rest = 1.0 - tree_sum(beta, tree)
    var = 1.0 / (precision + rest / prior_var)
    return var * (weighted_mean + rest * prior_mean / prior_var), var
