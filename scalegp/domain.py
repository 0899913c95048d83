"""Hyperparameter values outside what a computation can take, framework-free.

Malformed input (a shape, a NaN in ``X`` or ``y``, an unknown option) is the caller's mistake and
raises ``ValueError``. A hyperparameter's *value* outside the domain (a noise of 0 or inf, an
infinite lengthscale, a lengthscale too short for the lattice's 32-bit coordinates, a ``K + noise I``
that no jitter makes positive definite) is also what a sampler meets far in a prior's tail: NumPyro's
NUTS with its defaults reached a lengthscale of 1e-8 on a Simplex-GP model in its first step-size
search, and from a large first step proposes lengthscales and noises of 0 and inf. Those raise
:class:`DomainError` (a ``ValueError``): called directly, an error as before; under Pyro's HMC and
NUTS a rejected step with a :class:`DomainWarning` (``pyro_scalegp.mcmc`` registers the handler);
inside NumPyro's ``jit``, where nothing can be raised without ending the run, a NaN or ``-inf``
log-density (which NUTS rejects) with a :class:`DomainWarning` from a host callback.

Short of that edge, a Cholesky that needs more jitter than requested to succeed warns with a
:class:`JitterWarning` (both frontends' ``HGPMarginal``).
"""
from __future__ import annotations

__all__ = ["DomainError", "DomainWarning", "JitterWarning"]


class DomainError(ValueError):
    """A hyperparameter value outside the computation's domain (see the module docstring)."""


class DomainWarning(RuntimeWarning):
    """A :class:`DomainError`'s message where it does not stop the run (see the module docstring)."""


class JitterWarning(RuntimeWarning):
    """A Cholesky factorization needed more jitter than requested."""
