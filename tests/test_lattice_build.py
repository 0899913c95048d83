"""The lattice kernels themselves (kernels_cuda): the CPU build of the one source, checked point by
point against a numpy re-derivation, and the CUDA translation unit compiled with nvcc."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels_cuda import build
from kernels_cuda.cpu import CpuLattice
from scalegp import lattice as sl


def _lattice(n, d, order=1, seed=0, dtype=np.float64, spread=1.0):
    rng = np.random.default_rng(seed)
    z = (spread * rng.normal(size=(n, d))).astype(dtype)
    st = sl.stencil("rbf", order)
    return z, st, CpuLattice(z, sl.elevation_scale(d, st).astype(dtype), order)


def _vertex_keys(L):
    """Full (d+1)-coordinate keys of every point-vertex, re-derived from greedy and rank."""
    d = L.d
    k = np.arange(d + 1)[None, :, None]
    rank = L.rank[:, None, :]
    canon = np.where(rank <= d - k, k, k - (d + 1))
    return L.greedy[:, None, :] + canon  # N x (d+1 vertices) x (d+1 coordinates)


def test_compiles_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEGP_CACHE", str(tmp_path))
    path = build.cpu_library_path()
    assert path.parent == tmp_path and path.exists()
    assert build.cpu_library_path() == path  # cached: same key, no recompilation
    assert path.stat().st_mtime == build.cpu_library_path().stat().st_mtime


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        build.cpu_library_path()


@pytest.mark.parametrize("d", [1, 3, 8, 32])
def test_embedding_simplex_and_weights(d):
    z, st, L = _lattice(400, d)
    keys = _vertex_keys(L)
    # keys lie on the lattice: coordinates sum to zero, all congruent to the vertex's remainder
    assert np.all(keys.sum(-1) == 0)
    rem = np.mod(keys, d + 1)
    assert np.all(rem == rem[..., :1])
    assert np.all(rem[:, :, 0] == np.mod(np.arange(d + 1), d + 1)[None, :])
    # barycentric weights: non-negative, sum to one, reproduce the elevated point
    assert L.bary.min() >= -1e-12
    np.testing.assert_allclose(L.bary.sum(1), 1.0, atol=1e-12)
    el = (z * sl.elevation_scale(d, st)) @ sl.elevation_matrix(d).T
    np.testing.assert_allclose(np.einsum("nk,nkj->nj", L.bary, keys), el, atol=1e-9 * max(1, abs(el).max()))
    # the numpy copy of the weight formula (what the frontends differentiate) equals the kernel's
    np.testing.assert_allclose(sl.barycentric(el, L.greedy, L.rank), L.bary, atol=1e-12)


def test_elevation_is_a_scaled_isometry():
    for d in (1, 2, 5, 17):
        E = sl.elevation_matrix(d)
        np.testing.assert_allclose(E.sum(0), 0.0)
        np.testing.assert_allclose(E.T @ E, np.diag((np.arange(d) + 1.0) * (np.arange(d) + 2.0)), atol=1e-9)


@pytest.mark.parametrize("n,d,order", [(300, 2, 1), (300, 5, 2), (300, 32, 1), (4000, 8, 3)])
def test_hash_table_unique_keys_and_neighbours(n, d, order):
    # the last case: 35k vertices, found on 2 threads in batches of 4 vertices (kLookupsInFlight / 54 lookups)
    _, _, L = _lattice(n, d, order)
    keys = _vertex_keys(L).reshape(-1, d + 1)
    vid = L.vid.reshape(-1)
    assert L.capacity >= 2 * L.m  # load factor <= 1/2
    table = {}
    for key, v in zip(map(bytes, keys.astype(np.int64)), vid):
        assert table.setdefault(key, v) == v  # one id per key
    assert len(table) == L.m and sorted(table.values()) == list(range(L.m))  # no duplicate keys
    by_id = np.empty((L.m, d + 1), np.int64)
    by_id[vid] = keys
    u = np.eye(d + 1, dtype=np.int64) * (d + 1) - 1  # row axis: the lattice direction
    steps = np.concatenate([np.arange(1, order + 1), -np.arange(1, order + 1)])  # slots +1..+r, then -1..-r
    want = by_id[:, None, None, :] - steps[None, None, :, None] * u[None, :, None, :]  # m x (d+1) x 2r x (d+1)
    found = np.array([table.get(bytes(k), -1) for k in want.reshape(-1, d + 1)]).reshape(L.m, d + 1, 2 * order)
    assert 0 < (found >= 0).sum() < found.size  # some neighbours present, some absent
    np.testing.assert_array_equal(L.nbr, found)


def test_vertex_table_grows_from_a_small_first_table(monkeypatch):
    import kernels_cuda.cpu as cpu

    _, _, L = _lattice(150, 4)  # 425 vertices of 750 point-vertices: at most 2048 slots
    monkeypatch.setattr(cpu, "FIRST_TABLE", 64)  # over half full at once, and at 512 slots too
    _, _, small = _lattice(150, 4)
    assert L.m > 256 and small.capacity == L.capacity == 2048
    for attr in ("vid", "nbr", "bary"):
        np.testing.assert_array_equal(getattr(small, attr), getattr(L, attr))


@pytest.mark.parametrize("width", [2, 3])
def test_number_rows_in_order_of_first_occurrence(width):
    from kernels_cuda.cpu import number_rows

    # 600k rows (threaded insertion) of 2 ints (the packed-pair table) or 3 (the general one), many repeated
    keys = np.random.default_rng(width).integers(0, 40 if width == 3 else 300, size=(600_000, width)).astype(np.int32)
    _, first_np, inverse_np = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first_np)  # np.unique's rows renumbered in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    for expect in (1, 10**6):  # a table grown from 16 slots, and one large enough at once
        first, ids = number_rows(keys, expect=expect)
        np.testing.assert_array_equal(first, first_np[order])
        np.testing.assert_array_equal(ids, rank[inverse_np.reshape(-1)])


def test_number_pairs_gives_each_distinct_pair_one_number():
    from kernels_cuda.cpu import number_pairs

    # 600k pairs (threaded insertion), 90,000 distinct; vertex ids up to 2^31 - 1 survive the 64-bit packing
    keys = np.random.default_rng(5).integers(0, 300, size=(600_000, 2)).astype(np.int32)
    keys[::7] += np.int32(2**31 - 300)
    for expect in (1, 10**6):  # a table grown from 16 slots, and one large enough at once
        distinct, ids = number_pairs(keys, expect=expect)
        np.testing.assert_array_equal(distinct[ids], keys)
        assert ids.min() == 0 and ids.max() == len(distinct) - 1
        assert len(np.unique(distinct, axis=0)) == len(distinct) == len(np.unique(keys, axis=0))


def _dense_operator(L, coef):
    """W^T C^T C W as a dense matrix, assembled in numpy from vid/bary/nbr (no C code)."""
    W = np.zeros((L.m, L.n))
    np.add.at(W, (L.vid, np.arange(L.n)[:, None]), L.bary)
    C = np.eye(L.m)
    r = L.order
    for axis in range(L.d + 1):
        Cj = coef[0] * np.eye(L.m)
        for a in range(L.m):
            for t in range(1, r + 1):
                for b in (L.nbr[a, axis, t - 1], L.nbr[a, axis, r + t - 1]):
                    if b >= 0:
                        Cj[a, b] += coef[t]
        C = Cj @ C
    return W.T @ C.T @ C @ W, C, W


@pytest.mark.parametrize("order", [1, 2])
def test_filter_equals_dense_assembly_and_is_symmetric(order):
    z, st, L = _lattice(120, 3, order, spread=0.7)
    K, C, W = _dense_operator(L, st.coef)
    rng = np.random.default_rng(1)
    V = rng.normal(size=(120, 5))
    np.testing.assert_allclose(L.filter(V, st.coef), K @ V, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(L.filter(V[:, 0], st.coef), K @ V[:, 0], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(L.splat_blur(V, st.coef), C.T @ C @ W @ V, rtol=1e-11, atol=1e-13)
    # the transpose of the one-pass splat-blur C W, the factor of the exact draws of N(0, K)
    E = rng.normal(size=(L.m, 4))
    np.testing.assert_allclose(L.blur_slice(E, st.coef), W.T @ C.T @ E, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="u: expected"):
        L.blur_slice(E[:-1], st.coef)
    U = rng.normal(size=(120, 5))
    assert abs(np.sum(U * L.filter(V, st.coef)) - np.sum(V * L.filter(U, st.coef))) < 1e-12 * np.abs(V).sum()
    # exact local Gram from the columns of B = C^T C: diag(W^T C^T C W)_i = w_i^T G_i w_i
    assert L.m > 64  # several column blocks
    G = L.local_gram(st.coef)
    np.testing.assert_array_equal(G, L.local_gram(st.coef, exact=True))  # small: exact by default
    np.testing.assert_allclose(np.einsum("nk,nkl,nl->n", L.bary, G, L.bary), np.diag(K), rtol=1e-11)
    CW = C[:, L.vid]  # m x N x (d+1): C e_{a_ik}
    np.testing.assert_allclose(G, np.einsum("mnk,mnl->nkl", CW, CW), atol=1e-13)
    # the diagonal straight from the pair values, for the lattice's weights and for others
    cal = L.calibrate(st.coef)
    assert cal.exact and cal.values.size < L.n * (4 * 5 // 2)  # neighbouring simplices share vertex pairs
    np.testing.assert_allclose(cal.diagonal(), np.diag(K), rtol=1e-11)
    w = L.bary + 0.1 * rng.normal(size=L.bary.shape)
    np.testing.assert_allclose(cal.diagonal(w), np.einsum("nk,nkl,nl->n", w, G, w), rtol=1e-11)
    np.testing.assert_allclose(cal.gram_times(w), np.einsum("nkl,nl->nk", G, w), rtol=1e-11, atol=1e-14)
    probed = L.calibrate(st.coef, probes=64, exact=False)  # the same for the probe estimate, in float32 too
    np.testing.assert_allclose(probed.gram_times(w), np.einsum("nkl,nl->nk", probed.gram(), w), rtol=1e-11,
                               atol=1e-14)
    L32 = CpuLattice(z.astype(np.float32), sl.elevation_scale(z.shape[1], st).astype(np.float32), L.order)
    cal32 = L32.calibrate(st.coef.astype(np.float32))
    w32 = w.astype(np.float32)
    np.testing.assert_allclose(cal32.gram_times(w32), np.einsum("nkl,nl->nk", cal32.gram(), w32), rtol=1e-5,
                               atol=1e-6)


def test_calibration_plan():
    from kernels_cuda.cpu import probe_plan

    f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
    # exact: 2 (d+1)(2r+1) m^2 = 5.4e7 <= 2^26, in the lattice's dtype
    assert probe_plan(1000, 8, 1, 256, f64) == (1000, True, 64, f64)
    # 8-D flights, 100k rows: exact 2.0e9 > probes 256 (27 m + P) = 6.5e7 for P = 90,000 vertex pairs; the
    # probes work in float32
    assert probe_plan(6020, 8, 1, 256, f64, pairs=90000) == (256, False, 64, f32)
    assert probe_plan(6020, 8, 1, 256, f64, pairs=90000, exact=True) == (6020, True, 64, f64)
    assert probe_plan(6020, 8, 1, 10**4, f64, pairs=90000)[1]  # many probes (2.5e9): exact is cheaper
    assert probe_plan(10**7, 8, 1, 256, f64) == (256, False, 1, f32)  # 64 MiB of buffers per thread
    with pytest.raises(ValueError, match="probes"):
        probe_plan(100, 2, 1, 0, f64)


@pytest.mark.parametrize("probes", [256, 1024])
def test_probe_calibration_is_unbiased_with_error_sqrt_2_over_s(probes):
    # G_i estimated from S Rademacher columns (what lattices too large for the exact columns get): the
    # diagonal w^T G w then has relative error about sqrt(2 / S) per point and no bias
    z, st, L = _lattice(600, 5, 1, seed=4, spread=1.5)
    exact = np.einsum("nk,nkl,nl->n", L.bary, L.local_gram(st.coef, exact=True), L.bary)
    G = L.local_gram(st.coef, probes=probes, exact=False)
    np.testing.assert_array_equal(G, L.local_gram(st.coef, probes=probes, exact=False))  # deterministic
    np.testing.assert_allclose(G, G.transpose(0, 2, 1), rtol=0, atol=0)
    ratio = np.einsum("nk,nkl,nl->n", L.bary, G, L.bary) / exact
    sigma = np.sqrt(2 / probes)
    assert 0.3 * sigma < np.median(np.abs(ratio - 1)) < 0.9 * sigma  # a Gaussian's median |x| is 0.67 sigma
    assert abs(ratio.mean() - 1) < 0.5 * sigma
    assert np.abs(ratio - 1).max() < 5 * sigma


def test_rebuilt_lattice_numbers_vertices_and_estimates_the_same():
    # large enough for the threaded loops: which thread inserts a key first varies, but vertices are numbered in
    # order of first occurrence, so the probe signs (hashed from vertex ids), and with them the estimate, do not;
    # the vertex pairs are numbered in table order, which can vary, but the value at each simplex's pairs cannot
    z, st, L = _lattice(30000, 8, 1, seed=5, spread=0.5)
    again = CpuLattice(z, sl.elevation_scale(8, st), 1)
    np.testing.assert_array_equal(again.vid, L.vid)
    np.testing.assert_array_equal(again.nbr, L.nbr)
    first = np.unique(L.vid.reshape(-1), return_index=True)[1]
    np.testing.assert_array_equal(L.vid.reshape(-1)[np.sort(first)], np.arange(L.m))  # first-occurrence order
    a, b = L.calibrate(st.coef, exact=False), again.calibrate(st.coef, exact=False)
    np.testing.assert_array_equal(a.simplex, b.simplex)
    np.testing.assert_array_equal(a.values[a.pid], b.values[b.pid])
    np.testing.assert_array_equal(a.diagonal(), b.diagonal())


def blur_pass(x, nbr, axis: int, r: int, coef):
    """One 1-D blur of the vertex values ``x`` (``m x nc``) along ``axis`` in numpy, from the neighbour table."""
    out = coef[0] * x
    for t in range(1, r + 1):
        for side in (0, 1):
            b = nbr[:, axis, side * r + t - 1]
            out = out + coef[t] * np.where(b[:, None] >= 0, x[np.maximum(b, 0)], 0)
    return out


def _numpy_splat_blur(L, coef, V):
    """C^T C W V in numpy from vid/bary/nbr (no C code), for lattices too large for the dense assembly."""
    vals = np.zeros((L.m, V.shape[1]))
    np.add.at(vals, L.vid, L.bary[..., None] * V[:, None, :])
    for p in range(2 * (L.d + 1)):
        vals = blur_pass(vals, L.nbr, p if p <= L.d else 2 * L.d + 1 - p, L.order, coef)
    return vals


_THREADED_PRODUCT = """
import sys, numpy as np
from tests.test_lattice_build import _lattice
z, st, L = _lattice(30000, 8, 1, seed=3, spread=0.5)
V = np.random.default_rng(2).normal(size=(30000, 4))
np.save(sys.argv[1], L.splat_blur(V, st.coef))
"""


@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_splat_sums_every_point_once_and_the_same_in_every_call(tmp_path, threads):
    # large enough for the threaded loops (N nc (d+1) >= 2^20): each thread scatters into its own buffer and the
    # buffers are summed in thread order, so a product is the same in every call for a given number of threads
    z, st, L = _lattice(30000, 8, 1, seed=3, spread=0.5)
    V = np.random.default_rng(2).normal(size=(30000, 4))
    ref = _numpy_splat_blur(L, st.coef, V)
    got = L.splat_blur(V, st.coef)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_array_equal(L.splat_blur(V, st.coef), got)
    np.testing.assert_array_equal(L.filter(V, st.coef), L.filter(V, st.coef))
    # the same lattice with OMP_NUM_THREADS set, in a fresh process (OpenMP reads it once)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "product.npy"
    subprocess.run([sys.executable, "-c", _THREADED_PRODUCT, str(out)], env=env, check=True, timeout=120)
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_points_sharing_a_simplex_share_its_gram():
    from kernels_cuda.cpu import number_rows

    z, st, L = _lattice(300, 2, 1, spread=0.3)  # dense: many points per simplex
    first, inverse = number_rows(L.vid)
    assert first.size < 100 and np.array_equal(L.vid[first][inverse], L.vid)
    # numbered in the order of first occurrence: the first rows of np.unique, sorted
    _, first_np = np.unique(L.vid, axis=0, return_index=True)
    np.testing.assert_array_equal(first, np.sort(first_np))
    for exact in (True, False):
        G = L.local_gram(st.coef, exact=exact)
        np.testing.assert_array_equal(G, G[first][inverse])


def test_float32_matches_float64():
    z, st, L64 = _lattice(500, 4)
    L32 = CpuLattice(z.astype(np.float32), sl.elevation_scale(4, st).astype(np.float32), 1)
    np.testing.assert_array_equal(L32.vid.shape, L64.vid.shape)
    V = np.random.default_rng(2).normal(size=(500, 3))
    a64 = L64.filter(V, st.coef)
    a32 = L32.filter(V.astype(np.float32), st.coef.astype(np.float32))
    assert a32.dtype == np.float32
    # the same simplices almost everywhere; products agree to float32 precision
    assert (L32.vid == L64.vid).mean() > 0.99 or L32.m == L64.m
    np.testing.assert_allclose(a32, a64, rtol=0, atol=2e-5 * np.abs(a64).max())
    with pytest.raises(ValueError, match="v: dtype"):
        L32.filter(V, st.coef)


def test_many_columns_equal_one_at_a_time():
    _, st, L = _lattice(300, 6, 2)
    V = np.random.default_rng(3).normal(size=(300, 8))
    many = L.filter(V, st.coef)
    for j in range(8):
        np.testing.assert_allclose(many[:, j], L.filter(np.ascontiguousarray(V[:, j]), st.coef), rtol=1e-12, atol=1e-14)


def test_nvcc_compiles_cuda_source(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the CUDA translation unit was not compiled (CPU build tested only)")
    src = build.SOURCE_DIR / "sgp_lattice.cu"
    res = subprocess.run([nvcc, "-c", "-arch=sm_80", "-Werror", "all-warnings", "-o", str(tmp_path / "sgp.o"),
                          str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # every kernel the GPU dispatcher launches is defined (extern "C" names, unmangled)
    from kernels_cuda.gpu import KERNEL_NAMES
    syms = subprocess.run(["nm", str(tmp_path / "sgp.o")], capture_output=True, text=True).stdout
    for name in KERNEL_NAMES:
        assert name in syms, name
