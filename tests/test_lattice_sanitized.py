"""The CPU build of the lattice kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

The kernels index raw buffers handed over by numpy, torch and XLA, so an off-by-one there reads or
writes another array's memory without failing any value test. Here the one source is compiled with
``-fsanitize=address,undefined`` (``$CXX`` pointing at a wrapper, ``$SCALEGP_CACHE`` at a fresh
cache) and every entry point of its C ABI, and both frontends' operators with their gradients, run in
a child process with the sanitizer runtimes preloaded into Python: any out-of-bounds access, use after
free or undefined behaviour in our C++ aborts it, and the test fails with the sanitizer's report.
Skipped where g++ has no sanitizer runtimes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels_cuda import build

ROOT = Path(__file__).resolve().parents[1]
FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"


def _runtime(name: str) -> str | None:
    """Absolute path of g++'s runtime library ``name``, or None (g++ prints the bare name if it has none)."""
    try:
        out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def _workload():
    """Every C entry point of the CPU build, with the paths that grow its hash tables and split its work
    over threads, then the torch and JAX operators forward and backward (run in the sanitized child)."""
    import jax
    import jax.numpy as jnp
    import torch
    from pyro.contrib.gp import kernels as gpk

    from kernels_cuda.cpu import CpuLattice, load_library, number_rows
    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp.lattice import LatticeKernelOperator as JaxOperator
    from pyro_scalegp.lattice import LatticeKernelOperator as TorchOperator
    from scalegp import lattice as sl

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    # (n, d, order, dtype): d = 1 to the largest supported d; 20,000 x 9 point-vertices outgrow the first table
    for n, d, order, dtype in [(50, 1, 3, np.float64), (3000, 2, 1, np.float32), (800, 5, 2, np.float64),
                               (20_000, 8, 1, np.float64), (400, 20, 2, np.float32),
                               (300, load_library().sgp_max_d(), 1, np.float64)]:
        z = rng.normal(size=(n, d)).astype(dtype)
        st = sl.stencil("rbf", order)
        lat = CpuLattice(z, sl.elevation_scale(d, st).astype(dtype), order)
        coef = np.asarray(st.coef, dtype)
        for cols in (1, 5):
            v = rng.normal(size=(n, cols)).astype(dtype)
            out = lat.filter(v, coef)
            assert out.shape == v.shape and np.isfinite(out).all()
            assert lat.splat_blur(v, coef).shape == (lat.m, cols)
            drawn = lat.blur_slice(rng.normal(size=(lat.m, cols)).astype(dtype), coef)
            assert drawn.shape == v.shape and np.isfinite(drawn).all()
        for exact in (True, False):
            if exact and lat.m > 6000:
                continue  # the exact calibration costs m^2
            cal = lat.calibrate(coef, exact=exact, probes=96)
            assert np.isfinite(cal.diagonal()).all() and cal.gram_times(lat.bary).shape == lat.bary.shape
            if n * (d + 1) ** 2 < 5e6:
                assert cal.gram().shape == (n, d + 1, d + 1)
    keys = rng.integers(0, 300, size=(200_000, 3)).astype(np.int32)  # past number_rows' first table
    first, ids = number_rows(keys)
    assert (keys[first][ids] == keys).all()

    X, ell = rng.normal(size=(400, 3)), np.array([0.7, 1.0, 1.6])
    V = rng.normal(size=(400, 2))
    Xt = torch.tensor(X, requires_grad=True)
    kt = gpk.Matern32(3, variance=torch.tensor(1.3, dtype=torch.float64), lengthscale=torch.tensor(ell))
    out_t = TorchOperator(Xt, kt, order=2) @ torch.tensor(V)
    out_t.square().sum().backward()
    assert torch.isfinite(Xt.grad).all()
    op = JaxOperator(X, nk.Matern32(3, variance=1.3, lengthscale=jnp.asarray(ell)), order=2)
    g = jax.jit(jax.grad(lambda o, v: jnp.sum((o @ v) ** 2)))(op, jnp.asarray(V))
    assert np.isfinite(np.asarray(g.X)).all()
    print("workload done")


def test_cpu_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path, monkeypatch):
    libs = [_runtime(name) for name in ("libasan.so", "libubsan.so", "libstdc++.so.6")]
    if None in libs:
        pytest.skip("g++ has no AddressSanitizer / UBSan runtime here")
    wrapper = tmp_path / "sanitized-g++"
    wrapper.write_text(f'#!/bin/sh\nexec g++ {FLAGS} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "SCALEGP_CACHE": str(tmp_path / "cache")}
    # compiled in this process, so that the compiler itself runs without the preloaded runtimes
    for key in ("CXX", "SCALEGP_CACHE"):
        monkeypatch.setenv(key, env[key])
    library = build.cpu_library_path()
    assert b"__asan_report" in library.read_bytes() and b"__ubsan_handle" in library.read_bytes()

    env.update(LD_PRELOAD=" ".join(libs), JAX_PLATFORMS="cpu", OMP_NUM_THREADS="2",
               ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run([sys.executable, "-c", "from tests.test_lattice_sanitized import _workload; _workload()"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0 and "workload done" in run.stdout, run.stderr[-6000:]
