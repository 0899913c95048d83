r"""What a local NumPyro ADVGP worker process runs: the jitted gradient of its data term
(:class:`_Gradient`), and how parameter dicts travel as flat vectors.

:class:`~numpyro_scalegp.async_svi.AsyncProximalSVI`'s workers fork from a fork server that
imports this module (:func:`scalegp.processes.preloading_context`), so it imports JAX and
nothing of NumPyro: a worker that loads the program the server compiled needs neither the
model's code nor NumPyro (the fork server's imports took 0.6 s instead of 1.0 s here); one that
compiles its own unpickles the model, which imports them. The package's ``__init__`` loads its
modules on first use, so that importing this one does not import the rest.

.. note:: Cost: importing JAX (about 0.5 s) and looking up LAPACK's routines once (below).
"""
from __future__ import annotations

import functools
import os
import pickle
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax._src.lib import utils as jax_utils
from jax.experimental import serialize_executable as _serialize_executable
from jaxlib import lapack as _lapack
from threadpoolctl import threadpool_limits

from scalegp.async_server import unflatten

if TYPE_CHECKING:  # (not imported at run time: it imports NumPyro)
    from .advgp import ADVGP

# a loaded program calls LAPACK's routines, which a process that has lowered no LAPACK call has not
# looked up (a crash without this). Looked up at import: once in the fork server, not in each worker
# (it imports scipy.linalg and loads its OpenBLAS: 0.1-0.3 s apiece on two busy cores), and before a
# worker limits its BLAS threads (a library loaded after the limit runs a thread per core)
_lapack._lapack.initialize()

# XLA compiles the server's update and a minibatch gradient with its older CPU emitters in about
# two thirds of the time, for calls as fast (flights, M = 50 / 100, 512 rows: update 0.51 -> 0.35 s,
# gradient 0.6 -> 0.37 s, calls 1.0-2.6 ms either way), so the server and the workers start sooner;
# whole-shard gradients keep the default emitters, whose calls were 2-8% faster on 20,000 rows.
_QUICK_COMPILE = {"xla_cpu_use_fusion_emitters": False}


def _flatten(params: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(params[n], dtype=np.float64).reshape(-1) for n in names])


def _layout(params: dict) -> tuple:
    """``(names, shapes, dtype)``: how a parameter dict is laid out in a flat vector."""
    names = sorted(params)
    return names, [tuple(np.shape(params[n])) for n in names], np.asarray(params[names[0]]).dtype


class _Gradient:
    """Picklable: builds, in a worker, the jitted ``compute(flat, rows=None) -> (g_k, grad g_k)``
    on the shard ``(X, y)`` (or on its ``rows``) for parameter dicts laid out as ``params``
    (``num_threads`` BLAS threads in that process, if given). The compiled functions are built once
    per instance: the server's stand-in, called for every shard, compiles a minibatch gradient
    once (0.4-0.6 s here), not once per worker. Minibatch gradients compile with
    ``_QUICK_COMPILE``, whole-shard gradients with XLA's defaults.

    :meth:`executables` serializes the minibatch gradients compiled here; a ``_Gradient`` given
    them (``executables=``, in a process on the same machine with the same JAX) loads them
    instead of tracing and compiling its own: about 10 ms instead of 0.9 s of CPU (flights, M = 50;
    two workers on two cores took over from the stand-ins after 2.1 s instead of 3.4-3.5 s)."""

    def __init__(self, advgp: ADVGP, params: dict, num_threads: int | None = None,
                 executables: dict | None = None):
        self._model = pickle.dumps(advgp)
        self._layout = _layout(params)
        self._x64 = bool(jax.config.jax_enable_x64)
        self._num_threads = num_threads
        self._executables = executables
        self._jitted = None  # the jitted value_and_grad, built on first use
        self._minibatch = {}  # rows per batch -> the compiled minibatch gradient

    def executables(self) -> dict:
        """``{rows: serialized}``: the minibatch gradients compiled here, for a local worker."""
        return {rows: _serialize_executable.serialize(c) for rows, c in self._minibatch.items()}

    def _value_and_grad(self):
        if self._jitted is None:
            advgp = pickle.loads(self._model)
            self._jitted = jax.jit(jax.value_and_grad(lambda p, X, y: advgp.data_term(X, y, params=p)))
        return self._jitted

    def _minibatch_gradient(self, params, X, y):
        """The value and gradient on the minibatch ``(X, y)`` by the program for its size: loaded,
        or compiled here on first use."""
        program = self._minibatch.get(len(y))
        if program is None:
            program = self._minibatch[len(y)] = self._value_and_grad().lower(params, X, y).compile(_QUICK_COMPILE)
        return program(params, X, y)

    def __call__(self, X, y):
        if self._num_threads is not None:
            # XLA's CPU Cholesky and triangular solves call scipy's OpenBLAS, whose threads spin
            # between calls: two local workers with a thread per core each took the cores from one
            # another (2 workers of 512 rows, M = 50, 2 cores: 43 ms a gradient, 2 ms with one thread)
            threadpool_limits(self._num_threads, user_api="blas")
        # the precision first, then the model: its arrays must not be rebuilt in float32
        jax.config.update("jax_enable_x64", self._x64)
        if self._executables:
            self._minibatch.update(_load_executables(self._executables))
            self._executables = None
        names = self._layout[0]
        # minibatches are gathered by numpy (an eager JAX gather per call costs more than a small
        # batch's gradient); whole-shard gradients take the shard on the device, copied on first use
        # only: a minibatch run's server, standing in for every shard, would otherwise hold the data twice
        X, y = np.asarray(X), np.asarray(y)
        on_device = functools.cache(lambda: (jax.numpy.asarray(X), jax.numpy.asarray(y)))

        def compute(flat, rows=None):
            params = unflatten(flat, *self._layout)
            if rows is None:
                value, grads = self._value_and_grad()(params, *on_device())
            else:
                value, grads = self._minibatch_gradient(params, X[rows], y[rows])
            return float(value), _flatten(grads, names)

        return compute


def _load_executables(executables: dict) -> dict:
    """Load :meth:`_Gradient.executables` serialized on this machine (JAX's private
    logging and LAPACK hooks used here are those of the jax/jaxlib 0.9 that ``pyproject.toml`` asks)."""
    # XLA's loader logs an error for CPU tuning flags that it takes for missing features
    # (openxla/xla#44565) and a warning that it cannot check versions: both false here
    jax_utils.absl_set_min_log_level(3)
    try:
        return {rows: _serialize_executable.deserialize_and_load(*blob) for rows, blob in executables.items()}
    finally:
        level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1")  # jax's default
        jax_utils.absl_set_min_log_level(int(level) if level.isdigit() else 1)
