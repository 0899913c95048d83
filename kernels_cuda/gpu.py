"""CuPy (NVRTC) dispatch of the CUDA build: the same lattice as :class:`kernels_cuda.cpu.CpuLattice`,
on device arrays, without copies: torch tensors arrive through DLPack, and the buffers XLA hands a JAX
``buffer_callback`` through the CUDA array interface. The callers set CuPy's current stream to the
framework's (torch's current stream, XLA's stream of the call), so the launches run in order with it.

The kernels of ``sgp_lattice.cu`` are compiled at run time by CuPy's ``RawModule`` and launched in
the order of the CPU build. CI has no GPU: it compiles ``sgp_lattice.cu`` with nvcc and tests this
dispatch with CuPy mocked; ``tests/test_lattice_cuda.py`` runs the CUDA path on a GPU where there is one
(it passed on an H200).

Vertex ids are numbered by an atomic counter here (in order of first occurrence on the CPU), so where the calibration
uses Rademacher probes (signs hashed from vertex ids) its estimate differs from run to run, with the
same distribution.

.. note:: Cost: as the CPU build, with one thread per point, point-vertex or vertex (per vertex and
   column in the blur, so that the calibration's small lattices of 64 columns fill the device).
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

from .build import SOURCE_DIR
from .cpu import CALIBRATION_PROBES, SUFFIX, Calibration, _output, probe_plan, table_capacity

__all__ = ["GpuLattice", "KERNEL_NAMES", "external_stream", "module"]

KERNEL_NAMES = (
    "sgp_embed_f32", "sgp_embed_f64", "sgp_fill_i32", "sgp_insert_all", "sgp_number_owners", "sgp_resolve_vids",
    "sgp_build_neighbours", "sgp_zero_f32", "sgp_zero_f64", "sgp_splat_f32", "sgp_splat_f64", "sgp_blur_f32",
    "sgp_blur_f64", "sgp_slice_f32", "sgp_slice_f64", "sgp_pair_keys", "sgp_probe_fill_f32", "sgp_probe_fill_f64",
    "sgp_pair_dot_f32", "sgp_pair_dot_f64", "sgp_pair_extract_f32", "sgp_pair_extract_f64", "sgp_gram_from_pairs_f32",
    "sgp_gram_from_pairs_f64", "sgp_diag_from_pairs_f32", "sgp_diag_from_pairs_f64",
)
_THREADS = 256


def _cupy():
    try:
        return importlib.import_module("cupy")
    except ImportError as err:
        raise RuntimeError("kernels_cuda: the GPU backend needs CuPy (pip install 'scalegp[cuda]' for CUDA 12, "
                           "'scalegp[cuda13]' for CUDA 13)") from err


class _StreamPointer:
    """A ``cudaStream_t`` handle under the CUDA stream protocol (``__cuda_stream__``: version 0, handle)."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return 0, self.ptr


def external_stream(ptr: int):
    """CuPy's stream object for the CUDA stream ``ptr`` that another framework owns (torch, XLA), to
    enter as CuPy's current stream: ``cupy.cuda.Stream.from_external`` (CuPy 14, through the CUDA stream
    protocol) where CuPy has it, else ``cupy.cuda.ExternalStream`` (CuPy 13; deprecated in 14)."""
    cuda = _cupy().cuda
    if hasattr(cuda.Stream, "from_external"):
        return cuda.Stream.from_external(_StreamPointer(ptr))
    return cuda.ExternalStream(ptr)


@functools.lru_cache(maxsize=None)
def module():
    """The RawModule of ``sgp_lattice.cu`` (compiled by NVRTC once per process)."""
    cp = _cupy()
    code = (SOURCE_DIR / "sgp_lattice.cu").read_text()
    return cp.RawModule(code=code, options=("-std=c++17", f"-I{SOURCE_DIR}"), name_expressions=None)


def _launch(name, n, *args):
    blocks = max(1, min((int(n) + _THREADS - 1) // _THREADS, 65535))
    module().get_function(name)((blocks,), (_THREADS,), args)


def _hash_rows(keys):
    """``(table, ids_by_owner, first, ids)``: the distinct rows of the int32 array ``keys`` (``n x len``)
    hashed into ``table`` and numbered ``0..K-1`` in the order the atomic counter hands out;
    ``ids_by_owner`` the number held by each row that owns its key, ``first`` (``K``) a row holding each
    key and ``ids`` (``n``) every row's number (the device twin of :func:`kernels_cuda.cpu.number_rows`)."""
    cp = _cupy()
    n, length = keys.shape
    cap = table_capacity(n)
    table = cp.empty(cap, np.int32)
    _launch("sgp_fill_i32", cap, table, np.int64(cap), np.int32(-1))
    rep, ids_by_owner, first, ids = (cp.empty(n, np.int32) for _ in range(4))
    failed, counter = cp.zeros(1, np.int32), cp.zeros(1, np.int32)
    _launch("sgp_insert_all", n, keys, np.int64(n), np.int32(length), table, np.int64(cap - 1), rep, failed)
    _launch("sgp_number_owners", n, rep, np.int64(n), ids_by_owner, first, counter)
    _launch("sgp_resolve_vids", n, rep, np.int64(n), ids_by_owner, ids)
    if int(failed[0]) != 0:
        raise RuntimeError("kernels_cuda: hash table overflowed (internal error)")
    return table, ids_by_owner, first[: int(counter[0])], ids


class GpuLattice:
    """Device twin of :class:`~kernels_cuda.cpu.CpuLattice` (same attributes, CuPy arrays)."""

    def __init__(self, z, scale, order: int):
        cp = _cupy()
        z = cp.ascontiguousarray(z)
        if z.dtype not in (np.float32, np.float64):
            raise ValueError(f"z: dtype must be float32 or float64, got {z.dtype}")
        n, d = z.shape
        self.dtype, self.suffix = z.dtype, SUFFIX[np.dtype(z.dtype)]
        self.n, self.d, self.order = n, d, int(order)
        dp1, n_pv = d + 1, n * (d + 1)
        scale = cp.asarray(scale, dtype=z.dtype)
        self.bary = cp.empty((n, dp1), z.dtype)
        self.rank = cp.empty((n, dp1), np.int32)
        self.greedy = cp.empty((n, dp1), np.int32)
        pv_keys = cp.empty((n_pv, d), np.int32)
        _launch(f"sgp_embed_{self.suffix}", n, z, np.int64(n), np.int32(d), scale, self.bary, self.rank,
                self.greedy, pv_keys)
        table, owner_vid, vertex_owner, vid = _hash_rows(pv_keys)
        self.vid = vid.reshape(n, dp1)
        self.m = int(vertex_owner.shape[0])
        self.capacity = int(table.shape[0])
        self.nbr = cp.empty((self.m, dp1, 2 * self.order), np.int32)
        _launch("sgp_build_neighbours", self.m * dp1, np.int32(self.m), np.int32(d), vertex_owner, pv_keys, table,
                np.int64(self.capacity - 1), owner_vid, np.int32(self.order), self.nbr)

    def _cols(self, v, coef, bary):
        v2 = _cupy().ascontiguousarray(v.reshape(self.n, -1))
        if v2.dtype != self.dtype:
            raise ValueError(f"v: dtype {v2.dtype} differs from the lattice's {self.dtype}")
        return (v2,) + self._stencil_weights(coef, bary)

    def _stencil_weights(self, coef, bary):
        """``(coef, bary)`` as device arrays of the lattice's dtype (``bary`` default: the lattice's own)."""
        cp = _cupy()
        bary = self.bary if bary is None else cp.ascontiguousarray(bary, dtype=self.dtype)
        return cp.asarray(coef, dtype=self.dtype), bary

    def _slice(self, vals, out, bary):
        """``out`` (``N x c``) = ``W^T vals`` for vertex values ``vals`` (``m x c``) at the weights ``bary``."""
        _launch(f"sgp_slice_{self.suffix}", self.n, vals, out, np.int64(self.n), np.int32(vals.shape[1]),
                np.int32(self.d), self.vid, bary)
        return out

    def splat_blur(self, v, coef, bary=None):
        """Vertex values ``C^T C W v`` (``m x c``)."""
        cp = _cupy()
        v2, coef, bary = self._cols(v, coef, bary)
        nc = v2.shape[1]
        vals = cp.empty((self.m, nc), self.dtype)
        buf = cp.empty((self.m, nc), self.dtype)
        _launch(f"sgp_zero_{self.suffix}", self.m * nc, vals, np.int64(self.m * nc))
        _launch(f"sgp_splat_{self.suffix}", self.n, v2, np.int64(self.n), np.int32(nc), np.int32(self.d), self.vid,
                bary, vals)
        return self._blur(vals, buf, coef, 0)

    def _blur(self, vals, buf, coef, first: int):
        """Blur ``vals`` (``m x c``) along passes ``first..2d+1`` (axes ``0..d``, then ``d..0``), ping-ponging with
        ``buf``; returns the array holding the result."""
        src, dst = vals, buf
        for p in range(first, 2 * (self.d + 1)):
            axis = p if p <= self.d else 2 * self.d + 1 - p
            _launch(f"sgp_blur_{self.suffix}", self.m * vals.shape[1], np.int32(self.m), np.int32(axis), src, dst,
                    np.int32(vals.shape[1]), np.int32(self.d), self.nbr, np.int32(self.order), coef)
            src, dst = dst, src
        return src

    def blur_slice(self, u, coef, bary=None):
        """``W^T C^T u`` (``N x c``) for vertex values ``u`` (``m x c``; see the CPU twin)."""
        cp = _cupy()
        if u.dtype != self.dtype or u.ndim != 2 or u.shape[0] != self.m:
            raise ValueError(f"u: expected a ({self.m}, c) {self.dtype} array, got {u.dtype} {u.shape}")
        coef, bary = self._stencil_weights(coef, bary)
        nc = u.shape[1]
        vals = self._blur(u.copy(order="C"), cp.empty((self.m, nc), self.dtype), coef, self.d + 1)
        return self._slice(vals, cp.empty((self.n, nc), self.dtype), bary)

    def filter(self, v, coef, bary=None, out=None):
        """``W^T C^T C W v``, same shape as ``v``; written into ``out`` where given (as the CPU twin)."""
        cp = _cupy()
        v2, coef_, bary_ = self._cols(v, coef, bary)
        vals = self.splat_blur(v2, coef_, bary_)
        return self._slice(vals, _output(out, v.shape, self.dtype, cp), bary_)

    def calibrate(self, coef, *, probes: int = CALIBRATION_PROBES, exact=None) -> Calibration:
        """The diagonal calibration, exact or from ``probes`` Rademacher columns (see the CPU twin)."""
        cp = _cupy()
        dp1 = self.d + 1
        first, simplex = _hash_rows(self.vid)[2:]
        u = int(first.shape[0])
        all_keys = cp.empty((u * dp1 * (dp1 + 1) // 2, 2), np.int32)
        _launch("sgp_pair_keys", u, first, np.int64(u), self.vid, np.int32(self.d), all_keys)
        owner, pid = _hash_rows(all_keys)[2:]
        keys = cp.ascontiguousarray(all_keys[owner])
        npairs = int(owner.shape[0])
        total, exact, block, work = probe_plan(self.m, self.d, self.order, probes, self.dtype, exact, npairs)
        suffix = SUFFIX[work]
        coef = cp.asarray(coef, dtype=work)
        values = cp.zeros(npairs, work)
        buf0 = cp.empty(self.m * block, work)
        buf1 = cp.empty(self.m * block, work)
        for col0 in range(0, total, block):
            nc = min(block, total - col0)
            _launch(f"sgp_probe_fill_{suffix}", self.m, np.int32(self.m), np.int64(col0), np.int32(nc),
                    np.int32(exact), buf0)
            src, dst = buf0, buf1
            for p in range(0 if exact else dp1, 2 * dp1):  # B = C^T C, or C^T for the probes
                axis = p if p <= self.d else 2 * self.d + 1 - p
                _launch(f"sgp_blur_{suffix}", self.m * nc, np.int32(self.m), np.int32(axis), src, dst, np.int32(nc),
                        np.int32(self.d), self.nbr, np.int32(self.order), coef)
                src, dst = dst, src
            if exact:
                _launch(f"sgp_pair_extract_{suffix}", npairs, np.int64(npairs), keys, src, np.int64(col0),
                        np.int32(nc), values)
            else:
                _launch(f"sgp_pair_dot_{suffix}", npairs, np.int64(npairs), keys, src, np.int32(nc),
                        work.type(1.0 / total), values)
        return Calibration(self, simplex, pid.reshape(u, -1), values.astype(self.dtype, copy=False), exact)

    def local_gram(self, coef, **kwargs):
        """``self.calibrate(coef, **kwargs).gram()``."""
        return self.calibrate(coef, **kwargs).gram()

    def _from_pairs(self, what: str, cal: Calibration, bary):
        cp = _cupy()
        if what == "gram":
            out = cp.empty((self.n, self.d + 1, self.d + 1), self.dtype)
            _launch(f"sgp_gram_from_pairs_{self.suffix}", self.n, cal.simplex, np.int64(self.n), cal.pid, cal.values,
                    np.int32(self.d), out)
        else:  # "diag" (N) or "gram_times" (N x (d+1)), for the weights bary
            out = cp.empty(self.n if what == "diag" else (self.n, self.d + 1), self.dtype)
            _launch(f"sgp_{what}_from_pairs_{self.suffix}", self.n, cal.simplex, np.int64(self.n), cal.pid,
                    cal.values, cp.ascontiguousarray(bary, dtype=self.dtype), np.int32(self.d), out)
        return out
