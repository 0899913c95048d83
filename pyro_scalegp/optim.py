r"""Proximal ADADELTA for ADVGP's composite loss :math:`\sum_k g_k + h`, for torch and Pyro.

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
actually taken, :math:`(x - x_{new})/\eta`; with ``prox=None`` this is exactly
``torch.optim.Adadelta``. ``step(step_scale=c)`` takes one step with :math:`c\gamma`
(and accumulates :math:`(x - x_{new})/(c\eta)`, so the running averages do not see
``c``): the delayed server's shrunk steps for stale gradients
(:mod:`scalegp.async_server`). Kernel hyperparameters, noise and inducing inputs take
plain ADADELTA steps.

A ``"scale_tril"`` parameter holds :math:`U^\top` unconstrained, as
``PyroParam(constraint=lower_cholesky)`` stores it: the strict lower triangle as is,
the log of the diagonal. The step is taken on :math:`U^\top` itself (the gradient is
mapped to it first) and mapped back.

.. note:: Cost: ``O(P)`` time and memory per step for ``P`` parameters.
"""
from __future__ import annotations

from typing import Callable

import torch
from pyro.optim import PyroOptim

__all__ = [
    "ProximalAdadelta",
    "ProximalAdadeltaOptimizer",
    "prox_kl_loc",
    "prox_kl_scale_tril",
]

_PROX = (None, "loc", "scale_tril")


def prox_kl_loc(v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r""":math:`\arg\min_\mu \sum_i \gamma_i\mu_i^2/2 + (\mu_i - v_i)^2/2 = v / (1 + \gamma)`."""
    return v / (1.0 + gamma)


def prox_kl_scale_tril(V: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r"""Proximal operator of :math:`\gamma h` in :math:`U^\top` (lower triangular ``V``):
    off-diagonal :math:`v/(1+\gamma)`, diagonal the positive root of
    :math:`(1+\gamma)u^2 - v u - \gamma = 0`; the strict upper triangle is zero. For
    :math:`v < 0` the root is taken as :math:`2\gamma/(s - v)`, :math:`s = \sqrt{v^2 + 4\gamma(1+\gamma)}`
    (the same number), since :math:`v + s` cancels to zero when :math:`v^2 \gg \gamma`."""
    gamma = torch.as_tensor(gamma, dtype=V.dtype).expand(V.shape)
    off = V.tril(-1) / (1.0 + gamma.tril(-1))
    v = V.diagonal()
    g = gamma.diagonal()
    s = (v**2 + 4.0 * g * (1.0 + g)).sqrt()
    diag = torch.where(v >= 0, (v + s) / (2.0 * (1.0 + g)), 2.0 * g / (s - v))
    return off + torch.diag_embed(diag)


class ProximalAdadeltaOptimizer(torch.optim.Optimizer):
    """Proximal ADADELTA as a ``torch.optim.Optimizer``; ``.grad`` must hold the gradient
    of the data terms only.

    :param params: parameters or param groups; a group's ``prox`` is ``None`` (plain
        ADADELTA), ``"loc"`` (:math:`\\mu`) or ``"scale_tril"`` (unconstrained :math:`U^\\top`).
    :param lr: ADADELTA's ``lr`` (scales the per-coordinate step).
    :param rho: decay of the running averages.
    :param eps: ADADELTA's ``epsilon``.
    :param prox: default ``prox`` of the groups.

    .. note:: Cost: ``O(P)`` time and memory per step for ``P`` parameters.
    """

    def __init__(self, params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 prox: str | None = None):
        if not lr > 0:
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho: expected 0 <= rho < 1, got {rho!r}")
        if prox not in _PROX:
            raise ValueError(f"prox: expected one of {_PROX}, got {prox!r}")
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, prox=prox))
        for group in self.param_groups:
            if group["prox"] not in _PROX:
                raise ValueError(f"prox: expected one of {_PROX}, got {group['prox']!r}")

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, step_scale: float = 1.0):
        """One step; ``step_scale`` multiplies every step size :math:`\\gamma` (module docstring)."""
        if not step_scale > 0:
            raise ValueError(f"step_scale: expected a positive number, got {step_scale!r}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, eps, prox = group["lr"] * step_scale, group["rho"], group["eps"], group["prox"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.zeros_like(p)
                    state["acc_delta"] = torch.zeros_like(p)
                x, g = p.detach(), p.grad.detach()
                if prox == "scale_tril":
                    u = x.diagonal().exp()
                    x = x.tril(-1) + torch.diag_embed(u)
                    g = g.tril(-1) + torch.diag_embed(g.diagonal() / u)
                sq, acc = state["square_avg"], state["acc_delta"]
                sq.mul_(rho).addcmul_(g, g, value=1.0 - rho)
                gamma = lr * (acc + eps).sqrt() / (sq + eps).sqrt()
                v = x - gamma * g
                if prox == "loc":
                    new = prox_kl_loc(v, gamma)
                elif prox == "scale_tril":
                    new = prox_kl_scale_tril(v, gamma)
                else:
                    new = v
                delta = (x - new) / lr
                acc.mul_(rho).addcmul_(delta, delta, value=1.0 - rho)
                if prox == "scale_tril":
                    new = new.tril(-1) + torch.diag_embed(new.diagonal().log())
                p.copy_(new)
        return loss


def ProximalAdadelta(optim_args: dict, *, loc: str = "guide.loc",
                     scale_tril: str = "guide.scale_tril") -> PyroOptim:
    """:class:`ProximalAdadeltaOptimizer` wrapped as a ``PyroOptim``: the param-store
    parameters named ``loc`` and ``scale_tril`` (those of an :class:`~pyro_scalegp.ADVGP`'s
    guide by default) take proximal steps, all others plain ADADELTA steps.

    :param optim_args: ``lr``, ``rho``, ``eps``.
    """
    if not isinstance(optim_args, dict) or "prox" in optim_args:
        raise ValueError("optim_args: expected a dict of lr/rho/eps (prox is set from the names)")

    def per_param(param_name: str) -> dict:
        prox = "loc" if param_name == loc else "scale_tril" if param_name == scale_tril else None
        return dict(optim_args, prox=prox)

    return PyroOptim(ProximalAdadeltaOptimizer, per_param)
