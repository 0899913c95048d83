"""Every benchmark script imports (a syntax or import error in one that no smoke test runs
would otherwise go unnoticed until someone runs it at full size)."""
from __future__ import annotations

import importlib
import pkgutil

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


def test_there_are_benchmarks():
    assert {"demo", "hgp_flights", "hgp_speed", "hgp_scale", "hgp_parallel"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports_and_has_main(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if name not in ("common", "baselines", "hgp_fit", "run_all"):
        assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
