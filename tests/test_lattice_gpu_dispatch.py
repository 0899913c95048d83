"""Host-side GPU dispatch (kernels_cuda.gpu) with the device layer mocked: CI has no GPU.

A fake ``cupy`` module hands out numpy arrays and a ``RawModule`` whose kernels (1) check every
launch's arguments against the ``__global__`` signature parsed from ``sgp_lattice.cu`` (count,
pointer dtypes, 32/64-bit integer scalars) and (2) execute the kernel's semantics on the host, so
the dispatcher's whole build / product sequence is checked against the CPU build. In CI the CUDA code
itself is only compiled (tests/test_lattice_build.py); tests/test_lattice_cuda.py runs it on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
import types

import numpy as np
import pytest
import torch

from kernels_cuda import build, cpu, gpu
from kernels_cuda.cpu import CpuLattice, _ptr, load_library
from scalegp import lattice as sl
from tests.test_lattice_build import blur_pass

_CTYPES = {"float": np.float32, "double": np.float64, "int32_t": np.int32, "int64_t": np.int64, "int": np.int32}


def _signatures():
    src = (build.SOURCE_DIR / "sgp_lattice.cu").read_text()
    sigs = {}
    for name, params in re.findall(r"__global__ void (\w+)\(([^)]*)\)", src):
        parsed = []
        for p in params.split(","):
            p = p.replace("const", "").strip()
            base = p.split()[0].rstrip("*")
            parsed.append((_CTYPES[base], "*" in p))
        sigs[name] = parsed
    return sigs


SIGS = _signatures()


def _check(name, args):
    sig = SIGS[name]
    assert len(args) == len(sig), (name, len(args), len(sig))
    for i, (a, (dtype, is_ptr)) in enumerate(zip(args, sig)):
        if is_ptr:
            assert isinstance(a, np.ndarray) and a.dtype == dtype, (name, i, type(a), getattr(a, "dtype", None))
        else:
            assert isinstance(a, np.generic) and a.dtype == dtype, (name, i, type(a))


def _host_kernel(name, args):
    """What each __global__ kernel computes, on host arrays (CPU library where the C ABI matches)."""
    lib = load_library()
    if name.startswith("sgp_embed_"):
        z, n, d, scale, bary, rank, greedy, keys = args
        getattr(lib, name)(_ptr(z), int(n), int(d), _ptr(scale), _ptr(bary), _ptr(rank), _ptr(greedy), _ptr(keys))
    elif name == "sgp_fill_i32":
        a, n, value = args
        a[: int(n)] = value
    elif name == "sgp_insert_all":
        keys, n_pv, d, table, mask, rep, failed = args
        scratch = [np.empty(int(n_pv), np.int32) for _ in range(3)]
        m = lib.sgp_build_table(_ptr(keys), int(n_pv), int(d), _ptr(table), int(mask), _ptr(rep),
                                *(_ptr(s) for s in scratch))
        failed[0] = int(m < 0)
    elif name == "sgp_number_owners":
        rep, n_pv, owner_vid, vertex_owner, counter = args
        owners = np.flatnonzero(rep == np.arange(int(n_pv)))
        owner_vid[owners] = np.arange(owners.size)
        vertex_owner[: owners.size] = owners
        counter[0] = owners.size
    elif name == "sgp_resolve_vids":
        rep, n_pv, owner_vid, vid = args
        vid.reshape(-1)[:] = owner_vid[rep]
    elif name == "sgp_build_neighbours":
        m, d, vertex_owner, keys, table, mask, owner_vid, r, nbr = args
        lib.sgp_build_neighbours(int(m), int(d), _ptr(vertex_owner), _ptr(keys), _ptr(table), int(mask),
                                 _ptr(owner_vid), int(r), _ptr(nbr))
    elif name.startswith("sgp_zero_"):
        a, n = args
        a.reshape(-1)[: int(n)] = 0
    elif name.startswith("sgp_splat_"):
        v, n, nc, d, vid, bary, vals = args
        np.add.at(vals, vid, bary[..., None] * v[:, None, :])
    elif name.startswith("sgp_blur_"):
        m, axis, src, dst, nc, d, nbr, r, coef = args
        r, size = int(r), int(m) * int(nc)  # buffers hold m x nc values first (the calibration's are longer)
        x = src.reshape(-1)[:size].reshape(int(m), int(nc))
        dst.reshape(-1)[:size] = blur_pass(x, nbr, int(axis), r, coef).reshape(-1)
    elif name.startswith("sgp_slice_"):
        vals, out, n, nc, d, vid, bary = args
        out[:] = np.einsum("nk,nkc->nc", bary, vals[vid])
    elif name.startswith("sgp_probe_fill_"):
        m, col0, nc, identity, out = args
        v, col = np.arange(int(m), dtype=np.uint64)[:, None], int(col0) + np.arange(int(nc), dtype=np.uint64)[None, :]
        if identity:
            vals = (v == col).astype(out.dtype)
        else:  # splitmix64 of (v << 32) ^ (col / 64), the sign from its bit col % 64
            with np.errstate(over="ignore"):
                x = ((v << np.uint64(32)) ^ (col >> np.uint64(6))) + np.uint64(0x9E3779B97F4A7C15)
                x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                x = x ^ (x >> np.uint64(31))
            vals = np.where((x >> (col & np.uint64(63))) & np.uint64(1), 1.0, -1.0).astype(out.dtype)
        out[: vals.size] = vals.reshape(-1)
    elif name == "sgp_pair_keys":
        idx, u, vid, d, keys = args
        k, l = np.triu_indices(int(d) + 1)
        rows = vid[idx[: int(u)]]
        pairs = np.stack([np.minimum(rows[:, k], rows[:, l]), np.maximum(rows[:, k], rows[:, l])], -1)
        keys.reshape(-1)[: pairs.size] = pairs.reshape(-1)
    elif name.startswith("sgp_pair_dot_"):
        npairs, keys, z, nc, scale, acc = args
        Z = z[: (int(keys.max()) + 1) * int(nc)].reshape(-1, int(nc))
        acc[: int(npairs)] += scale * np.einsum("pc,pc->p", Z[keys[:, 0]], Z[keys[:, 1]])
    elif name.startswith("sgp_pair_extract_"):
        npairs, keys, bcols, col0, nc, acc = args
        B = bcols[: (int(keys.max()) + 1) * int(nc)].reshape(-1, int(nc))
        c = keys[:, 1] - int(col0)
        hit = (c >= 0) & (c < int(nc))
        acc[hit] = B[keys[hit, 0], c[hit]]
    elif name.startswith("sgp_gram_from_pairs_"):
        simplex, n, pid, acc, d, gram = args
        k, l = np.triu_indices(int(d) + 1)
        vals = acc[pid[simplex]]  # n x pairs
        gram[:, k, l] = vals
        gram[:, l, k] = vals
    elif name.startswith("sgp_gram_times_from_pairs_"):
        simplex, n, pid, acc, bary, d, out = args
        k, l = np.triu_indices(int(d) + 1)
        G = np.zeros((int(n), int(d) + 1, int(d) + 1), acc.dtype)
        G[:, k, l] = acc[pid[simplex]]
        G[:, l, k] = acc[pid[simplex]]
        out[:] = np.einsum("nkl,nl->nk", G, bary)
    elif name.startswith("sgp_diag_from_pairs_"):
        simplex, n, pid, acc, bary, d, diag = args
        k, l = np.triu_indices(int(d) + 1)
        diag[:] = np.einsum("np,np->n", acc[pid[simplex]], np.where(k == l, 1, 2) * bary[:, k] * bary[:, l])
    else:
        raise AssertionError(f"unexpected kernel {name}")


@pytest.fixture
def fake_cupy(monkeypatch):
    launches = []

    class RawModule:
        def __init__(self, code, options, name_expressions=None):
            assert '#include "sgp_lattice.h"' in code
            assert f"-I{build.SOURCE_DIR}" in options
            self.code = code

        def get_function(self, name):
            assert re.search(rf"__global__ void {name}\(", self.code), name

            def launch(grid, block, args):
                assert len(grid) == 1 and len(block) == 1 and 1 <= grid[0] <= 65535 and block[0] == 256
                if name.startswith("sgp_blur_"):  # a thread per vertex and column (up to the grid's cap)
                    assert grid[0] == min(-(-int(args[0]) * int(args[4]) // 256), 65535), (name, grid)
                _check(name, args)
                launches.append(name)
                _host_kernel(name, args)

            return launch

    fake = types.ModuleType("cupy")
    for fn in ("ascontiguousarray", "asarray", "empty", "zeros", "full", "arange", "empty_like", "unique", "einsum"):
        setattr(fake, fn, getattr(np, fn))
    fake.from_dlpack = lambda t: t.numpy()
    fake.asnumpy = np.array
    fake.RawModule = RawModule
    fake.free_bytes = 16 << 30  # what the device reports free (a test lowers it)
    fake.streams = []  # the external streams entered, by pointer

    @contextlib.contextmanager
    def external_stream(ptr):
        fake.streams.append(ptr)
        yield

    # CuPy 13: streams of other frameworks through ExternalStream (the test below gives Stream CuPy 14's from_external)
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (fake.free_bytes, 16 << 30)),
                                      ExternalStream=external_stream, Stream=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupy", fake)
    gpu.module.cache_clear()
    yield launches
    gpu.module.cache_clear()


@pytest.mark.parametrize("dtype,order", [(np.float64, 1), (np.float32, 2)])
def test_gpu_dispatch_equals_cpu_build(fake_cupy, dtype, order):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 4)).astype(dtype)
    st = sl.stencil("matern32", order)
    scale = sl.elevation_scale(4, st).astype(dtype)
    c, g = CpuLattice(z, scale, order), gpu.GpuLattice(z, scale, order)
    assert g.m == c.m and g.capacity == c.capacity
    for attr in ("bary", "rank", "greedy"):
        np.testing.assert_array_equal(getattr(g, attr), getattr(c, attr))
    coef = st.coef.astype(dtype)
    V = rng.normal(size=(300, 3)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(g.filter(V, coef), c.filter(V, coef), rtol=tol, atol=tol)
    assert c.m > 64  # exact calibration over several column blocks, then Rademacher probes
    for exact in (True, False):
        gc, cc = g.calibrate(coef, probes=48, exact=exact), c.calibrate(coef, probes=48, exact=exact)
        assert gc.exact == cc.exact == exact
        np.testing.assert_array_equal(gc.simplex, cc.simplex)
        assert gc.values.dtype == cc.values.dtype == dtype
        # the probe estimate works in float32 whatever the lattice's dtype: equal to float32 rounding; the pairs
        # are numbered differently (atomic counter, table order), the values at each simplex's pairs agree
        rtol, atol = (tol, tol) if exact else (1e-4, 1e-7)
        np.testing.assert_allclose(gc.values[gc.pid], cc.values[cc.pid], rtol=rtol, atol=atol)
        np.testing.assert_allclose(gc.gram(), cc.gram(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(gc.diagonal(), cc.diagonal(), rtol=rtol, atol=atol)
    suffix = "f32" if dtype == np.float32 else "f64"
    assert fake_cupy[0] == f"sgp_embed_{suffix}" and fake_cupy[-1] == f"sgp_diag_from_pairs_{suffix}"
    blocks = -(-c.m // cpu.probe_plan(c.m, 4, order, 48, z.dtype, True)[2])
    assert fake_cupy.count(f"sgp_pair_extract_{suffix}") == blocks and fake_cupy.count("sgp_pair_dot_f32") == 1
    # one product: 2(d+1) blurs (d = 4); the calibration: 2(d+1) per block of exact columns, d+1 per probe block,
    # the probes' in float32
    blurs = {"f32": 5, "f64": 0}
    blurs[suffix] += 2 * 5 + 2 * 5 * blocks
    assert {k: fake_cupy.count(f"sgp_blur_{k}") for k in blurs} == blurs


def test_build_sequence(fake_cupy):
    z = np.random.default_rng(1).normal(size=(50, 2))
    st = sl.stencil("rbf", 1)
    L = gpu.GpuLattice(z, sl.elevation_scale(2, st), 1)
    assert fake_cupy == ["sgp_embed_f64", "sgp_fill_i32", "sgp_insert_all", "sgp_number_owners", "sgp_resolve_vids",
                         "sgp_build_neighbours"]
    fake_cupy.clear()
    L.filter(np.ones((50, 2)), st.coef)
    assert fake_cupy == ["sgp_zero_f64", "sgp_splat_f64"] + ["sgp_blur_f64"] * 6 + ["sgp_slice_f64"]
    fake_cupy.clear()
    E = np.random.default_rng(2).normal(size=(L.m, 3))
    C = CpuLattice(z, sl.elevation_scale(2, st), 1)
    np.testing.assert_allclose(L.blur_slice(E, st.coef), C.blur_slice(E, st.coef), rtol=1e-12, atol=1e-13)
    assert fake_cupy == ["sgp_blur_f64"] * 3 + ["sgp_slice_f64"]  # C^T: the blurs along axes d..0


def test_torch_operator_cuda_backend_dispatches(fake_cupy, monkeypatch):
    from pyro.contrib.gp.kernels import RBF

    from pyro_scalegp.lattice import LatticeKernelOperator

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=4321))
    X = torch.randn(120, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kern = RBF(3, variance=torch.tensor(1.0, dtype=torch.float64), lengthscale=torch.ones(3, dtype=torch.float64))
    V = torch.randn(120, 2, dtype=torch.float64)
    with torch.no_grad():
        a = LatticeKernelOperator(X, kern, backend="cuda") @ V
        assert "sgp_embed_f64" in fake_cupy and "sgp_slice_f64" in fake_cupy
        # the build and the product each launch on torch's current stream
        assert sys.modules["cupy"].streams == [4321, 4321]
        b = LatticeKernelOperator(X, kern, backend="cpu") @ V
    assert sys.modules["cupy"].streams == [4321, 4321]  # the CPU build enters no stream
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cupy_14_takes_streams_through_the_cuda_stream_protocol(fake_cupy, monkeypatch):
    # CuPy 14 deprecates ExternalStream: where cupy.cuda.Stream.from_external exists, torch's and XLA's stream
    # handles reach it as objects of the CUDA stream protocol, and ExternalStream is not called
    from pyro.contrib.gp.kernels import RBF

    from numpyro_scalegp import lattice as nl
    from pyro_scalegp.lattice import LatticeKernelOperator

    fake = sys.modules["cupy"]
    protocol = []

    @contextlib.contextmanager
    def from_external(obj):
        protocol.append(obj.__cuda_stream__())
        yield

    monkeypatch.setattr(fake.cuda, "Stream", types.SimpleNamespace(from_external=from_external))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=4321))
    X = torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kern = RBF(2, variance=torch.tensor(1.0, dtype=torch.float64), lengthscale=torch.ones(2, dtype=torch.float64))
    with torch.no_grad():
        LatticeKernelOperator(X, kern, backend="cuda") @ torch.ones(60, 1, dtype=torch.float64)
    assert protocol == [(0, 4321), (0, 4321)] and fake.streams == []  # the build and the product
    with nl._xla_stream(types.SimpleNamespace(stream=8765)):  # jax 0.9.2: a property
        pass
    with nl._xla_stream(types.SimpleNamespace(stream=lambda: 8766)):  # other versions: a method
        pass
    assert protocol[2:] == [(0, 8765), (0, 8766)] and fake.streams == []


@pytest.mark.usefixtures("jax_x64")
def test_jax_operator_cuda_backend_dispatches(fake_cupy, monkeypatch):
    """The NumPyro operator on the CUDA build, built outside and inside jit (by a buffer_callback),
    forward and gradients: equal to the CPU build, with every callback of the CUDA backend on XLA's stream."""
    import jax
    import jax.numpy as jnp

    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp import lattice as nl

    streams = []
    monkeypatch.setattr(nl, "_xla_stream", lambda ctx: streams.append(ctx) or contextlib.nullcontext())
    rng = np.random.default_rng(3)
    X, V = jnp.asarray(rng.normal(size=(120, 3))), jnp.asarray(rng.normal(size=(120, 2)))
    ell = jnp.asarray([1.0, 1.5, 0.8])

    def product(backend, x, lengthscale, v):
        return nl.LatticeKernelOperator(x, nk.RBF(3, variance=0.7, lengthscale=lengthscale), backend=backend) @ v

    ref = product("cpu", X, ell, V)
    np.testing.assert_allclose(product("cuda", X, ell, V), ref, rtol=1e-12, atol=1e-12)
    assert {"sgp_embed_f64", "sgp_slice_f64"} <= set(fake_cupy) and len(streams) == 1  # the product's callback
    fake_cupy.clear(), streams.clear()
    traced = jax.jit(functools.partial(product, "cuda"))
    np.testing.assert_allclose(traced(X, ell, V), ref, rtol=1e-12, atol=1e-12)
    assert fake_cupy[0] == "sgp_embed_f64" and "sgp_slice_f64" in fake_cupy and len(streams) == 2  # build, product
    loss = lambda backend: lambda x, lengthscale, v: (product(backend, x, lengthscale, v) ** 2).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss("cuda"), argnums=(0, 1, 2)))(X, ell, V)
    for got, want in zip(grads, jax.grad(loss("cpu"), argnums=(0, 1, 2))(X, ell, V)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert nl._resolve_backend(X, "auto") == "cpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert nl._resolve_backend(np.asarray(X), "auto") == "cuda"


@pytest.mark.usefixtures("jax_x64")
def test_lattice_too_big_for_the_gpu_is_refused_before_building(fake_cupy):
    """Both frontends check the lattice's memory estimate against the GPU's free memory for the CUDA build
    (against the host's for the CPU build), before the first launch."""
    import jax.numpy as jnp
    from pyro.contrib.gp.kernels import RBF

    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp.lattice import LatticeKernelOperator as JaxOperator
    from pyro_scalegp.lattice import LatticeKernelOperator

    sys.modules["cupy"].free_bytes = sl.memory_estimate(500, 3, 1) - 1
    X = np.random.default_rng(4).normal(size=(500, 3))
    with pytest.raises(MemoryError, match="GiB of GPU memory available"):
        LatticeKernelOperator(torch.as_tensor(X), RBF(3), backend="cuda")
    with pytest.raises(MemoryError, match="GiB of GPU memory available"):
        JaxOperator(jnp.asarray(X), nk.RBF(3), backend="cuda")
    assert fake_cupy == []  # refused before any launch
    JaxOperator(jnp.asarray(X), nk.RBF(3), backend="cpu")  # the host has the room
    sys.modules["cupy"].free_bytes = sl.memory_estimate(500, 3, 1)
    JaxOperator(jnp.asarray(X), nk.RBF(3), backend="cuda")
    assert fake_cupy[0] == "sgp_embed_f64"


def test_missing_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="CuPy"):
        gpu.GpuLattice(np.zeros((3, 2)), np.ones(2), 1)
    assert cpu  # the CPU build needs no CuPy
