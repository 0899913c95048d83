"""Shared pytest fixtures. Each restores the global state it changes."""
from __future__ import annotations

import pyro
import pytest
import torch


@pytest.fixture
def float64():
    """torch's default dtype set to float64 for one test, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def pyro_clean():
    """An empty Pyro parameter store before and after the test (kernels' PyroParams live there)."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def jax_x64():
    """JAX's 64-bit mode switched on for one test, restored afterwards."""
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def until_workers_serve():
    """A function that steps an ``AsyncProximalSVI`` until three updates in a row needed no
    stand-in from the server (every worker process is up and serving); fails after 120 s."""
    import time

    def run(svi, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            before = len(svi.stood_in)
            svi.run(3, progress_bar=False)
            if len(svi.stood_in) == before:
                return
            assert time.monotonic() < deadline, "the workers never took over from the server"

    return run
