"""ctypes front of the CPU build: build a permutohedral lattice once, filter many columns with it.

.. note:: Cost: building is ``O(N d^2)`` for the embedding plus ``O(N d^2)`` hash work and
   ``O(M d^2 r)`` for the neighbour table (``M <= N (d+1)`` vertices, ``r`` the stencil order);
   each product is ``O(N d c + M d r c)`` for ``c`` columns; the calibration (:meth:`CpuLattice.local_gram`)
   ``O(M^2 d r)`` exact, or ``O(S (M d r + P))`` for ``S`` probes and ``P`` distinct vertex pairs where that
   is cheaper, plus ``O(U d^2)`` hash work for ``U`` distinct simplices and ``O(N d^2)`` to fill the Grams. Memory: see
   :func:`scalegp.lattice.memory_estimate`.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .build import cpu_library_path

__all__ = ["CALIBRATION_PROBES", "EXACT_MIN", "Calibration", "CpuLattice", "aligned_empty", "load_library", "number_pairs", "number_rows", "probe_plan"]

_LIB = None
_LOCK = threading.Lock()

#: Rademacher probes of the diagonal calibration where the exact one would cost more (see probe_plan)
CALIBRATION_PROBES = 256
#: element-operations below which the calibration is exact whatever the probes would cost
EXACT_MIN = 1 << 26
#: dtype of the probe estimate whatever the lattice's: its error (about sqrt(2/S) per point) is far above float32
#: rounding, and the blurs of the probe columns then move half the bytes of float64
PROBE_DTYPE = np.dtype(np.float32)
_PROBE_BUFFER_BYTES = 64 << 20
#: the C ABI's name suffix of each float dtype
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_i32p = ctypes.POINTER(ctypes.c_int32)
_i64 = ctypes.c_int64
_int = ctypes.c_int


def _sigs():
    sig = {}
    for suffix, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        tp = ctypes.POINTER(ct)
        sig[f"sgp_embed_{suffix}"] = (None, [tp, _i64, _int, tp, tp, _i32p, _i32p, _i32p])
        sig[f"sgp_filter_{suffix}"] = (
            None, [tp, tp, _i64, _int, _int, _i32p, tp, ctypes.c_int32, _i32p, _int, tp, tp, tp])
        sig[f"sgp_splat_blur_{suffix}"] = (
            None, [tp, _i64, _int, _int, _i32p, tp, ctypes.c_int32, _i32p, _int, tp, tp, tp])
        sig[f"sgp_blur_slice_{suffix}"] = (
            None, [tp, tp, _i64, _int, _int, _i32p, tp, ctypes.c_int32, _i32p, _int, tp, tp])
        sig[f"sgp_pair_gram_{suffix}"] = (None, [_i32p, _i64, _int, ctypes.c_int32, _i32p, _int, tp, _i64, _int, _int, tp])
        sig[f"sgp_gram_from_pairs_{suffix}"] = (None, [_i32p, _i64, _i32p, tp, _int, tp])
        sig[f"sgp_diag_from_pairs_{suffix}"] = (None, [_i32p, _i64, _i32p, tp, tp, _int, tp])
        sig[f"sgp_gram_times_from_pairs_{suffix}"] = (None, [_i32p, _i64, _i32p, tp, tp, _int, tp])
    sig["sgp_build_table"] = (ctypes.c_int32, [_i32p, _i64, _int, _i32p, _i64, _i32p, _i32p, _i32p, _i32p])
    sig["sgp_build_neighbours"] = (None, [ctypes.c_int32, _int, _i32p, _i32p, _i32p, _i64, _i32p, _int, _i32p])
    sig["sgp_number_rows"] = (ctypes.c_int32, [_i32p, _i64, _int, _i64, _i32p, _i32p])
    sig["sgp_number_pairs"] = (ctypes.c_int32, [_i32p, _i64, _i64, _i32p, _i32p])
    sig["sgp_pair_keys"] = (None, [_i32p, _i64, _int, _i32p, _i32p])
    sig["sgp_max_d"] = (_int, [])
    return sig


def load_library() -> ctypes.CDLL:
    """The compiled CPU library (compiled and cached on first use), with its C signatures declared."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = ctypes.CDLL(str(cpu_library_path()))
            for name, (res, args) in _sigs().items():
                fn = getattr(lib, name)
                fn.restype = res
                fn.argtypes = args
            _LIB = lib
    return _LIB


def _ptr(a: np.ndarray):
    ct = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
          np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64}[a.dtype]
    return a.ctypes.data_as(ctypes.POINTER(ct))


def probe_plan(m: int, d: int, order: int, probes: int, dtype, exact=None, pairs=None
               ) -> tuple[int, bool, int, np.dtype]:
    """``(columns, exact, block, work)`` of the calibration of a lattice of ``m`` vertices and float dtype
    ``dtype`` whose simplices have ``pairs`` distinct vertex pairs (default ``m``). Exact (the ``m`` columns
    of ``B``, in ``dtype``) when ``exact`` is true, or, for ``exact=None``, when that costs no more
    element-operations than the probes, ``2 (d+1)(2r+1) m^2 <= max(EXACT_MIN, S ((d+1)(2r+1) m + pairs))``;
    else ``probes`` Rademacher columns, in :data:`PROBE_DTYPE`. ``work`` is that dtype. ``block`` columns
    per blur pass: at most 64 (measured fastest: the buffers stay in cache), and the two ``m x block``
    buffers of ``work`` values of a thread under 64 MiB."""
    if int(probes) != probes or probes < 1:
        raise ValueError(f"probes: must be a positive integer, got {probes!r}")
    if exact is None:
        taps = (d + 1) * (2 * order + 1)
        exact = 2 * taps * m * m <= max(EXACT_MIN, probes * (taps * m + (m if pairs is None else pairs)))
    total = m if exact else int(probes)
    work = np.dtype(dtype) if exact else PROBE_DTYPE
    block = int(max(1, min(64, total, _PROBE_BUFFER_BYTES // (2 * m * work.itemsize))))
    return total, bool(exact), block, work


#: slots of the CPU build's first vertex table (256 KiB, in cache), and of number_rows' by default (see _growing)
FIRST_TABLE = 1 << 16


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """A new uninitialized array whose data starts on an ``align``-byte boundary. JAX takes such a host
    array without copying it (``jnp.asarray``), where it copies one that numpy's allocator aligned to 16
    bytes only (158 MB: 74 ms)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _mapped(shape, dtype) -> np.ndarray:
    """A new array with its pages already mapped, written once here on one thread. The C loops that fill
    the lattice's arrays run on several threads, and page faults taken by several threads at once cost far
    more here: the 105 MB of per-point-vertex arrays of all flights rows took 110 ms to embed fresh against
    11 + 40 ms mapped first (2 threads)."""
    a = aligned_empty(shape, dtype)
    a.fill(0)
    return a


def table_capacity(n_pv: int) -> int:
    """Hash-table slots: the power of two at least twice the number of keys, ``n_pv`` point-vertices for the
    vertex table (load <= 1/2 however many are distinct; the GPU build's table, and the largest the CPU build
    tries)."""
    return 1 << max(4, int(2 * n_pv - 1).bit_length())


def _growing(first: int, n: int, attempt) -> tuple[int, int]:
    """``(count, capacity)`` of numbering ``n`` keys with a hash table sized for the distinct keys, which
    are often far fewer (7k vertices of 2.2M point-vertices on all flights rows), so that it stays in
    cache: ``attempt(capacity)`` numbers them with a table of that many slots, or returns -1 once more
    than half fill; it is tried with the power of two at least ``first`` (at least 16), then 8x larger,
    up to :func:`table_capacity` ``(n)``, which always suffices."""
    largest = table_capacity(n)
    cap = min(largest, 1 << max(4, int(first - 1).bit_length()))
    while True:
        count = attempt(cap)
        if count >= 0 or cap >= largest:
            break
        cap = min(8 * cap, largest)
    if count < 0:
        raise RuntimeError("kernels_cuda: hash table overflowed (internal error)")
    return count, cap


def number_rows(keys: np.ndarray, expect: int = FIRST_TABLE // 2) -> tuple[np.ndarray, np.ndarray]:
    """``(first, ids)`` of the rows of an int32 array ``keys`` (``n x len``): the distinct rows numbered
    ``0..K-1`` in the order of their first occurrence (by hashing), ``first`` (``K``) the index of each
    one's first row and ``ids`` (``n``) every row's number, so that ``keys[first][ids] == keys``. The hash
    table is sized for ``expect`` distinct rows first, and grown as needed (:func:`_growing`)."""
    keys = np.ascontiguousarray(keys, np.int32)
    n, width = keys.shape
    owner, ids = _mapped(n, np.int32), _mapped(n, np.int32)
    lib = load_library()
    k, _ = _growing(2 * int(expect), n,
                    lambda cap: lib.sgp_number_rows(_ptr(keys), n, width, cap, _ptr(owner), _ptr(ids)))
    return owner[:k].copy(), ids


def number_pairs(keys: np.ndarray, expect: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct, ids)`` of the vertex pairs ``keys`` (int32, ``n x 2``): the ``K`` distinct pairs
    (``K x 2``) numbered in the order of their hash-table slots, which can vary from run to run (all
    threaded; what depends on a pair does not depend on its number), and every key's number (``n``), so
    that ``distinct[ids] == keys``. The table is sized for ``expect`` distinct pairs first (:func:`_growing`)."""
    keys = np.ascontiguousarray(keys, np.int32)
    n = keys.shape[0]
    ids = _mapped(n, np.int32)
    lib = load_library()
    distinct = None

    def attempt(cap):
        nonlocal distinct
        distinct = np.empty((cap // 2, 2), np.int32)
        return lib.sgp_number_pairs(_ptr(keys), n, cap, _ptr(distinct), _ptr(ids))

    k, _ = _growing(2 * int(expect), n, attempt)
    return distinct[:k].copy(), ids


def _output(out, shape, dtype, xp=np):
    """``out`` checked to be a C-contiguous array of ``shape`` and ``dtype`` to write a result into, or a
    new one (``xp``: numpy or CuPy)."""
    if out is None:
        return xp.empty(shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return out


class CpuLattice:
    """The lattice of ``N`` scaled points ``z`` (``N x d``), built once.

    :param z: inputs divided by the lengthscales, float32 or float64.
    :param scale: per-axis elevation scales (``d``), same dtype.
    :param order: stencil order ``r`` (neighbours at steps ``1..r`` per side and direction).

    Attributes (numpy): ``bary``, ``rank``, ``greedy``, ``vid`` (``N x (d+1)``), ``m`` (vertices),
    ``nbr`` (``m x (d+1) x 2r``).
    """

    def __init__(self, z: np.ndarray, scale: np.ndarray, order: int):
        lib = load_library()
        z = np.ascontiguousarray(z)
        if z.dtype not in (np.float32, np.float64):
            raise ValueError(f"z: dtype must be float32 or float64, got {z.dtype}")
        n, d = z.shape
        if d > lib.sgp_max_d():
            raise ValueError(f"z: at most {lib.sgp_max_d()} input dimensions, got {d}")
        if n * (d + 1) >= 2**31:
            raise ValueError(f"z: N (d+1) = {n * (d + 1)} point-vertices exceed the 32-bit vertex ids")
        self.dtype = z.dtype
        self.suffix = SUFFIX[z.dtype]
        self.n, self.d, self.order = n, d, int(order)
        scale = np.ascontiguousarray(scale, dtype=z.dtype)
        dp1 = d + 1
        n_pv = n * dp1
        self.bary = _mapped((n, dp1), z.dtype)
        self.rank = _mapped((n, dp1), np.int32)
        self.greedy = _mapped((n, dp1), np.int32)
        pv_keys = _mapped((n_pv, d), np.int32)
        getattr(lib, f"sgp_embed_{self.suffix}")(
            _ptr(z), n, d, _ptr(scale), _ptr(self.bary), _ptr(self.rank), _ptr(self.greedy), _ptr(pv_keys))
        rep = _mapped(n_pv, np.int32)
        owner_vid = _mapped(n_pv, np.int32)
        vertex_owner = _mapped(n_pv, np.int32)
        self.vid = _mapped((n, dp1), np.int32)
        table = None

        def build_table(cap):
            nonlocal table
            table = np.empty(cap, np.int32)
            return lib.sgp_build_table(_ptr(pv_keys), n_pv, d, _ptr(table), cap - 1, _ptr(rep), _ptr(owner_vid),
                                       _ptr(vertex_owner), _ptr(self.vid))

        m, cap = _growing(FIRST_TABLE, n_pv, build_table)
        self.m = int(m)
        self.capacity = cap
        self.nbr = _mapped((self.m, dp1, 2 * self.order), np.int32)
        lib.sgp_build_neighbours(self.m, d, _ptr(vertex_owner), _ptr(pv_keys), _ptr(table), cap - 1,
                                 _ptr(owner_vid), self.order, _ptr(self.nbr))

    def _cols(self, v: np.ndarray, coef: np.ndarray, bary=None):
        v = np.asarray(v)
        if v.dtype != self.dtype:
            raise ValueError(f"v: dtype {v.dtype} differs from the lattice's {self.dtype}")
        if v.shape[0] != self.n:
            raise ValueError(f"v: expected {self.n} rows, got {v.shape[0]}")
        return (np.ascontiguousarray(v.reshape(self.n, -1)),) + self._stencil_weights(coef, bary)

    def _stencil_weights(self, coef: np.ndarray, bary=None):
        """``(coef, bary)`` checked, contiguous, in the lattice's dtype (``bary`` default: the lattice's own)."""
        coef = np.ascontiguousarray(coef, dtype=self.dtype)
        if coef.shape != (self.order + 1,):
            raise ValueError(f"coef: expected shape ({self.order + 1},), got {coef.shape}")
        if bary is None:
            return coef, self.bary
        bary = np.ascontiguousarray(bary, dtype=self.dtype)
        if bary.shape != self.bary.shape:
            raise ValueError(f"bary: expected shape {self.bary.shape}, got {bary.shape}")
        return coef, bary

    def splat_blur(self, v: np.ndarray, coef: np.ndarray, bary=None) -> np.ndarray:
        """Vertex values ``C^T C W v`` (``m x c``) for ``v`` of ``N`` rows; ``bary`` replaces the
        lattice's own weights (the frontends pass their differentiable copy)."""
        v2, coef, bary = self._cols(v, coef, bary)
        nc = v2.shape[1]
        vals = np.empty((self.m, nc), self.dtype)
        buf = np.empty((self.m, nc), self.dtype)
        getattr(load_library(), f"sgp_splat_blur_{self.suffix}")(
            _ptr(v2), self.n, nc, self.d, _ptr(self.vid), _ptr(bary), self.m, _ptr(self.nbr), self.order,
            _ptr(coef), _ptr(vals), _ptr(buf))
        return vals

    def filter(self, v: np.ndarray, coef: np.ndarray, bary=None, out=None) -> np.ndarray:
        """``W^T C^T C W v``, same shape as ``v`` (``N`` or ``N x c``); written into ``out`` where given (a
        C-contiguous array of that shape and the lattice's dtype, e.g. a buffer JAX hands over)."""
        v2, coef, bary = self._cols(v, coef, bary)
        nc = v2.shape[1]
        out = _output(out, np.shape(v), self.dtype).reshape(v2.shape)
        buf0 = np.empty((self.m, nc), self.dtype)
        buf1 = np.empty((self.m, nc), self.dtype)
        getattr(load_library(), f"sgp_filter_{self.suffix}")(
            _ptr(v2), _ptr(out), self.n, nc, self.d, _ptr(self.vid), _ptr(bary), self.m, _ptr(self.nbr),
            self.order, _ptr(coef), _ptr(buf0), _ptr(buf1))
        return out.reshape(np.shape(v))

    def blur_slice(self, u: np.ndarray, coef: np.ndarray, bary=None) -> np.ndarray:
        """``W^T C^T u`` (``N x c``) for vertex values ``u`` (``m x c``): the transpose of the one-pass splat-blur
        ``C W``, whose product with it is :meth:`filter`'s ``W^T C^T C W``; of standard normal ``u``, a draw of
        ``N(0, W^T C^T C W)``. Cost ``O((N d + m d r) c)``."""
        u2 = np.asarray(u)
        if u2.dtype != self.dtype or u2.ndim != 2 or u2.shape[0] != self.m:
            raise ValueError(f"u: expected a ({self.m}, c) {self.dtype} array, got {u2.dtype} {u2.shape}")
        coef, bary = self._stencil_weights(coef, bary)
        nc = u2.shape[1]
        work = np.array(u2, order="C")  # blurred in place
        out = np.empty((self.n, nc), self.dtype)
        getattr(load_library(), f"sgp_blur_slice_{self.suffix}")(
            _ptr(work), _ptr(out), self.n, nc, self.d, _ptr(self.vid), _ptr(bary), self.m, _ptr(self.nbr),
            self.order, _ptr(coef), _ptr(np.empty((self.m, nc), self.dtype)))
        return out

    def calibrate(self, coef: np.ndarray, *, probes: int = CALIBRATION_PROBES, exact=None) -> "Calibration":
        """The values of ``B = C^T C`` (``C`` the one-pass blur) at every distinct vertex pair ``(a, b)``
        of the distinct simplices (``P`` pairs), from which :class:`Calibration` gives each point's local
        Gram ``G_i[k, l] = B[a_ik, a_il]`` and diagonal ``diag(W^T B W)_i = w_i^T G_i w_i``. Exact from the
        ``m`` columns of ``B`` (cost ``2 (d+1)(2r+1) m^2``), or the unbiased estimate ``Z_a . Z_b / S``
        from ``Z = C^T P`` with ``S = probes`` Rademacher columns (cost ``((d+1)(2r+1) m + P) S``;
        relative error of ``w^T G w`` about ``sqrt(2 / S)`` per point, correlated between nearby points;
        computed in :data:`PROBE_DTYPE`). ``exact=None`` picks the cheaper (see :func:`probe_plan`)."""
        coef, _ = self._stencil_weights(coef)
        lib = load_library()
        first, simplex = number_rows(self.vid)
        all_keys = _mapped((first.size * (self.d + 1) * (self.d + 2) // 2, 2), np.int32)
        lib.sgp_pair_keys(_ptr(first), first.size, self.d, _ptr(self.vid), _ptr(all_keys))
        # distinct pairs: 14-19 a vertex on 8-D flights inputs, expected (d+1)(d+2)/4 (half of a simplex's)
        keys, pid = number_pairs(all_keys, expect=self.m * (self.d + 1) * (self.d + 2) // 4)
        total, exact, block, work = probe_plan(self.m, self.d, self.order, probes, self.dtype, exact, len(keys))
        values = np.empty(len(keys), work)
        getattr(lib, f"sgp_pair_gram_{SUFFIX[work]}")(
            _ptr(keys), len(keys), self.d, self.m, _ptr(self.nbr), self.order, _ptr(coef.astype(work)), total,
            int(exact), block, _ptr(values))
        return Calibration(self, simplex, pid.reshape(first.size, -1), values.astype(self.dtype, copy=False), exact)

    def local_gram(self, coef: np.ndarray, **kwargs) -> np.ndarray:
        """``self.calibrate(coef, **kwargs).gram()``: the local Grams ``N x (d+1) x (d+1)``."""
        return self.calibrate(coef, **kwargs).gram()

    def _from_pairs(self, what: str, cal: "Calibration", bary):
        lib = load_library()
        if what == "gram":
            out = aligned_empty((self.n, self.d + 1, self.d + 1), self.dtype)
            getattr(lib, f"sgp_gram_from_pairs_{self.suffix}")(
                _ptr(cal.simplex), self.n, _ptr(cal.pid), _ptr(cal.values), self.d, _ptr(out))
        else:  # "diag" (N) or "gram_times" (N x (d+1)), for the weights bary
            out = aligned_empty(self.n if what == "diag" else (self.n, self.d + 1), self.dtype)
            bary = np.ascontiguousarray(bary, dtype=self.dtype)
            getattr(lib, f"sgp_{what}_from_pairs_{self.suffix}")(
                _ptr(cal.simplex), self.n, _ptr(cal.pid), _ptr(cal.values), _ptr(bary), self.d, _ptr(out))
        return out


class Calibration:
    """The diagonal calibration of a lattice (CPU or GPU, see :meth:`CpuLattice.calibrate`): each point's
    distinct simplex ``simplex`` (``N``), the pair ids ``pid`` (``U x (d+1)(d+2)/2``, entries ``k <= l``
    row by row) and the values of ``B`` at the ``P`` distinct pairs ``values``; ``exact`` says how they
    were obtained. Costs: :meth:`diagonal` and :meth:`gram_times` ``O(N d^2)``; :meth:`gram` the same, and
    ``N (d+1)^2`` memory."""

    def __init__(self, lattice, simplex, pid, values, exact: bool):
        self.lattice, self.simplex, self.pid, self.values, self.exact = lattice, simplex, pid, values, bool(exact)

    def gram(self):
        """The local Grams ``G_i`` (``N x (d+1) x (d+1)``), formed in full (to inspect them; the frontends'
        gradients take :meth:`gram_times`)."""
        return self.lattice._from_pairs("gram", self, None)

    def diagonal(self, bary=None):
        """``w_i^T G_i w_i`` (``N``) for the weights ``bary`` (default: the lattice's own)."""
        return self.lattice._from_pairs("diag", self, self.lattice.bary if bary is None else bary)

    def gram_times(self, bary):
        """``G_i w_i`` (``N x (d+1)``) for the weights ``bary``, without forming the Grams: the gradient of
        the diagonal in the weights is twice it."""
        return self.lattice._from_pairs("gram_times", self, bary)
