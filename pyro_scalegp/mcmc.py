"""How Pyro's HMC and NUTS meet hyperparameter values outside a computation's domain.

A sampler's first steps (its step-size search, early warmup) can propose hyperparameters far in a
prior's tail: a noise that underflows to 0, a lengthscale of inf or one too short for the lattice's
coordinates, an expert's ``K + noise I`` that no jitter makes positive definite. scalegp raises
:class:`scalegp.domain.DomainError` for those. Pyro's integrator turns an exception that one of its
registered handlers accepts into a NaN potential energy, a rejected (divergent) step, as it does for
torch's own failed Cholesky; :func:`reject_step` is registered for :class:`~scalegp.domain.DomainError`
and warns with its message (a :class:`~scalegp.domain.DomainWarning`), so that a run whose every step
fails says why. Anywhere else the error is raised as before.
"""
from __future__ import annotations

import warnings

from pyro.ops.integrator import register_exception_handler

from scalegp.domain import DomainError, DomainWarning

__all__ = ["reject_step"]


def reject_step(exception: Exception) -> bool:
    """Pyro's exception handler: true (the step is rejected) for a :class:`~scalegp.domain.DomainError`,
    with a warning."""
    if isinstance(exception, DomainError):
        # the first line: Pyro appends the model trace's shapes to errors raised inside a model
        warnings.warn(f"{str(exception).splitlines()[0]} (HMC/NUTS rejects this step)", DomainWarning, stacklevel=2)
        return True
    return False


register_exception_handler("scalegp", reject_step)
