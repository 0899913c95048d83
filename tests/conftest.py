"""Shared pytest fixtures. Each restores the global state it changes."""
from __future__ import annotations

import logging

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
def xla_compiles():
    """The messages of the XLA compilations JAX runs during the test, in order (a list that grows
    as they happen), JAX's caches cleared first, so that nothing compiled earlier hides one."""
    import jax

    compiled = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Finished XLA compilation"):
                compiled.append(record.getMessage())

    handler = Compiles()
    logging.getLogger("jax").addHandler(handler)
    try:
        jax.clear_caches()
        with jax.log_compiles(True):
            yield compiled
    finally:
        logging.getLogger("jax").removeHandler(handler)


@pytest.fixture
def stand_in_through_a_restart():
    """A function ``run(svi, victim)`` for an ``AsyncProximalSVI`` of 2 minibatch workers, either
    frontend: checks that the server computes the first update's gradients itself, steps until the
    workers serve (three updates in a row with no stand-in; at most 120 s), kills worker ``victim``
    and checks that it is restarted and stood in for until it serves again, then returns the
    number of updates."""
    import time

    def until_workers_serve(svi, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            before = len(svi.stood_in)
            svi.run(3, progress_bar=False)
            if len(svi.stood_in) == before:
                return
            assert time.monotonic() < deadline, "the workers never took over from the server"

    def run(svi, victim: int) -> int:
        svi.step()  # at once: workers take milliseconds to start where forked, seconds otherwise
        assert sorted(svi.stood_in) == [(0, 0), (1, 0)]
        until_workers_serve(svi)
        process = svi.workers[victim]
        process.kill()
        process.join()
        killed_at = svi.version
        with pytest.warns(RuntimeWarning, match=f"worker {victim} .* died"):
            until_workers_serve(svi)
        assert [k for k, _ in svi.restarts] == [victim] and svi.workers[victim].pid != process.pid
        assert any(k == victim and v >= killed_at for k, v in svi.stood_in)  # the server covered the restart
        assert all(s == 0 for s in svi.staleness)
        return svi.version

    return run
