// Permutohedral-lattice splat / blur / slice, written once as per-element functions.
//
// Every function here handles ONE element (a point, a point-vertex, or a lattice vertex) and is
// `__host__ __device__` under nvcc, plain inline C++ otherwise. `sgp_lattice.cu` wraps each in a
// thin `__global__` launcher; `sgp_lattice_cpu.cpp` runs the same functions in OpenMP loops.
//
// Data layout (all row-major, int32 indices, 64-bit hashes):
//   z       N x d          inputs divided by the lengthscales
//   scale   d              per-axis elevation scales
//   bary    N x (d+1)      barycentric weight of each point on each vertex of its simplex
//   rank    N x (d+1)      rank of each elevated coordinate's residual (for gradients)
//   greedy  N x (d+1)      the remainder-0 lattice point nearest the elevated point
//   pv_keys (N(d+1)) x d   full integer coordinates (the first d of d+1) of each point-vertex
//   table   cap            hash slots: -1 (empty) or the index of the point-vertex owning the key
//   vid     N x (d+1)      lattice vertex id of each point-vertex
//   nbr     M x (d+1) x 2r vertex ids of the neighbours at steps +1..+r then -1..-r along each
//                          lattice direction (-1 where absent)
//   values  M x nc         nc right-hand-side columns per vertex
// Keys are hashed from the full coordinate vector and compared in full, so there is no packing and
// no silent overflow for any d <= SGP_MAX_D (the Python layer checks |coordinates| < 2^30).
#ifndef SGP_LATTICE_H
#define SGP_LATTICE_H

#include "sgp_atomics.h"
#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

#define SGP_MAX_D 64

SGP_HD inline uint64_t sgp_hash(const int32_t* key, int d) {
    uint64_t h = 1469598103934665603ULL;  // FNV-1a over 32-bit words, then a 64-bit finalizer
    for (int i = 0; i < d; ++i) {
        h ^= (uint64_t)(uint32_t)key[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

SGP_HD inline bool sgp_keys_equal(const int32_t* a, const int32_t* b, int d) {
    for (int i = 0; i < d; ++i)
        if (a[i] != b[i]) return false;
    return true;
}

// Home slot of `key` in a table of mask + 1 slots.
SGP_HD inline int64_t sgp_home_slot(const int32_t* key, int d, int64_t mask) {
    return (int64_t)(sgp_hash(key, d) & (uint64_t)mask);
}

// Embed point i: elevate z_i onto the hyperplane sum = 0 of R^{d+1}, find its enclosing simplex
// (Adams et al. 2010), write barycentric weights, ranks, the remainder-0 point, and the d+1 vertex keys.
template <typename T>
SGP_HD inline void sgp_embed_point(int64_t i, const T* z, int d, const T* scale, T* bary_out,
                                   int32_t* rank_out, int32_t* greedy_out, int32_t* pv_keys) {
    T el[SGP_MAX_D + 1];
    T bary[SGP_MAX_D + 2];
    int32_t greedy[SGP_MAX_D + 1];
    int32_t rank[SGP_MAX_D + 1];
    const T* x = z + i * d;
    const int dp1 = d + 1;

    el[d] = -(T)d * x[d - 1] * scale[d - 1];
    for (int j = d - 1; j > 0; --j)
        el[j] = el[j + 1] - (T)j * x[j - 1] * scale[j - 1] + (T)(j + 2) * x[j] * scale[j];
    el[0] = el[1] + (T)2 * x[0] * scale[0];

    const T inv = (T)1 / (T)dp1;
    int sum = 0;
    for (int j = 0; j <= d; ++j) {
        T v = el[j] * inv;
        T up = ceil(v) * (T)dp1;
        T down = floor(v) * (T)dp1;
        greedy[j] = (int32_t)((up - el[j] < el[j] - down) ? up : down);
        sum += greedy[j];
        rank[j] = 0;
    }
    sum /= dp1;
    T res[SGP_MAX_D + 1];
    for (int j = 0; j <= d; ++j) res[j] = el[j] - (T)greedy[j];
    for (int j = 0; j < d; ++j) {  // without branches: the comparisons are unpredictable (CPU: 69 -> 57 ms on 244k points)
        int rj = rank[j];
        for (int k = j + 1; k <= d; ++k) {
            const int lt = res[j] < res[k];
            rj += lt;
            rank[k] += 1 - lt;
        }
        rank[j] = rj;
    }
    if (sum > 0) {
        for (int j = 0; j <= d; ++j) {
            if (rank[j] >= dp1 - sum) { greedy[j] -= dp1; rank[j] += sum - dp1; }
            else rank[j] += sum;
        }
    } else if (sum < 0) {
        for (int j = 0; j <= d; ++j) {
            if (rank[j] < -sum) { greedy[j] += dp1; rank[j] += dp1 + sum; }
            else rank[j] += sum;
        }
    }
    for (int j = 0; j <= d + 1; ++j) bary[j] = 0;
    for (int j = 0; j <= d; ++j) {
        T delta = (el[j] - (T)greedy[j]) * inv;
        bary[d - rank[j]] += delta;
        bary[d + 1 - rank[j]] -= delta;
    }
    bary[0] += (T)1 + bary[d + 1];

    for (int k = 0; k <= d; ++k) {
        bary_out[i * dp1 + k] = bary[k];
        rank_out[i * dp1 + k] = rank[k];
        greedy_out[i * dp1 + k] = greedy[k];
        int32_t* key = pv_keys + (i * dp1 + k) * d;
        for (int j = 0; j < d; ++j)  // canonical simplex vertex k, shifted to the remainder-0 point
            key[j] = greedy[j] + ((rank[j] <= d - k) ? k : k - dp1);
    }
}

// Insert point-vertex j's key by linear probing with compare-and-swap: exactly one point-vertex
// owns each distinct key. Returns the owner's index (j itself if it inserted the key).
SGP_HD inline int32_t sgp_insert(int32_t j, const int32_t* pv_keys, int d, int32_t* table, int64_t mask) {
    const int32_t* key = pv_keys + (int64_t)j * d;
    int64_t s = sgp_home_slot(key, d, mask);
    for (int64_t probe = 0; probe <= mask; ++probe) {
        int32_t cur = sgp_atomic_load(table + s);
        if (cur == -1) {
            cur = sgp_atomic_cas(table + s, -1, j);
            if (cur == -1) return j;
        }
        if (sgp_keys_equal(pv_keys + (int64_t)cur * d, key, d)) return cur;
        s = (s + 1) & mask;
    }
    return -1;  // unreachable at load factor <= 1/2; reported as an error by the caller
}

// Owner index of `key`, or -1 if it is not in the table, probing from slot s whose entry `cur` is already read
// (the CPU build reads the home slots of a batch of keys ahead, so that their cache misses overlap).
SGP_HD inline int32_t sgp_probe_from(const int32_t* key, int64_t s, int32_t cur, const int32_t* pv_keys, int d,
                                     const int32_t* table, int64_t mask) {
    for (int64_t probe = 0; probe <= mask; ++probe) {
        if (cur == -1) return -1;
        if (sgp_keys_equal(pv_keys + (int64_t)cur * d, key, d)) return cur;
        s = (s + 1) & mask;
        cur = table[s];
    }
    return -1;
}

// Owner index of `key`, or -1 if it is not in the table.
SGP_HD inline int32_t sgp_lookup(const int32_t* key, const int32_t* pv_keys, int d, const int32_t* table,
                                 int64_t mask) {
    const int64_t s = sgp_home_slot(key, d, mask);
    return sgp_probe_from(key, s, table[s], pv_keys, d, table, mask);
}

// Owners take the next id from an atomic counter (the CUDA build; ids then depend on scheduling). The CPU
// build numbers keys serially in the order of their first occurrence instead (number_keys), so its ids,
// and the probe signs hashed from them, are the same in every run.
SGP_HD inline void sgp_number_owner(int32_t j, const int32_t* rep, int32_t* owner_vid, int32_t* vertex_owner,
                                    int32_t* counter) {
    if (rep[j] == j) {
        int32_t v = sgp_atomic_inc(counter);
        owner_vid[j] = v;
        vertex_owner[v] = j;
    }
}

// Every point-vertex (or key occurrence) reads its owner's id.
SGP_HD inline void sgp_resolve_vid(int32_t j, const int32_t* rep, const int32_t* owner_vid, int32_t* vid) {
    vid[j] = owner_vid[rep[j]];
}

// Key of neighbour k of the vertex with key `base` along lattice direction `axis`, k = 0..2r-1 for the steps
// +1..+r then -1..-r: base - step u_axis with u_axis = (d+1) e_axis - 1 (only the first d coordinates are stored).
SGP_HD inline void sgp_neighbour_key(const int32_t* base, int axis, int k, int r, int d, int32_t* key) {
    const int32_t step = k < r ? k + 1 : r - 1 - k;
    for (int j = 0; j < d; ++j) key[j] = base[j] + step;
    if (axis < d) key[axis] = base[axis] - step * d;
}

// Neighbours of vertex a along lattice direction `axis` at steps +-1..+-r (nbr: -1 where absent): a GPU thread's
// element. The CPU build runs the same pieces (sgp_neighbour_key, sgp_home_slot, sgp_probe_from) over batches of
// vertices, so that the cache misses of their lookups overlap (sgp_build_neighbours).
SGP_HD inline void sgp_neighbours(int32_t a, int axis, const int32_t* vertex_owner, const int32_t* pv_keys, int d,
                                  const int32_t* table, int64_t mask, const int32_t* owner_vid, int r,
                                  int32_t* nbr) {
    int32_t key[SGP_MAX_D];
    const int32_t* base = pv_keys + (int64_t)vertex_owner[a] * d;
    int32_t* out = nbr + ((int64_t)a * (d + 1) + axis) * 2 * r;
    for (int k = 0; k < 2 * r; ++k) {
        sgp_neighbour_key(base, axis, k, r, d, key);
        const int32_t owner = sgp_lookup(key, pv_keys, d, table, mask);
        out[k] = owner < 0 ? -1 : owner_vid[owner];
    }
}

// Splat point i's nc columns onto its d+1 vertices (scatter: atomic adds, or plain adds where `values` is
// written by one thread only, as in the CPU build's per-thread buffers).
template <typename T, bool Atomic = true>
SGP_HD inline void sgp_splat_point(int64_t i, const T* v, int nc, int d, const int32_t* vid, const T* bary,
                                   T* values) {
    for (int k = 0; k <= d; ++k) {
        const int64_t pv = i * (d + 1) + k;
        const T w = bary[pv];
        T* dst = values + (int64_t)vid[pv] * nc;
        for (int c = 0; c < nc; ++c) {
            if (Atomic)
                sgp_atomic_add(dst + c, w * v[i * nc + c]);
            else
                dst[c] += w * v[i * nc + c];
        }
    }
}

// One 1-D blur along `axis` at vertex a, columns c0..c1-1 of its nc (gather: no atomics; symmetric
// because the neighbour relation is and the stencil coef[0..r] is used for both sides). The CPU loops
// take a vertex's whole row (c0 = 0, c1 = nc); a GPU thread one column, so that small lattices with
// many columns (the calibration's) still fill the device and neighbouring threads read adjacent values.
template <typename T>
SGP_HD inline void sgp_blur_vertex(int32_t a, int axis, const T* in, T* out, int nc, int d, const int32_t* nbr,
                                   int r, const T* coef, int c0, int c1) {
    const int32_t* nb = nbr + ((int64_t)a * (d + 1) + axis) * 2 * r;
    T* o = out + (int64_t)a * nc;
    const T* x = in + (int64_t)a * nc;
    for (int c = c0; c < c1; ++c) o[c] = coef[0] * x[c];
    for (int t = 1; t <= r; ++t) {  // neighbour rows outside, columns inside: contiguous, vectorizable
        for (int side = 0; side < 2; ++side) {
            const int32_t p = nb[side * r + t - 1];
            if (p < 0) continue;
            const T* y = in + (int64_t)p * nc;
            for (int c = c0; c < c1; ++c) o[c] += coef[t] * y[c];
        }
    }
}

// Slice: interpolate the vertex values back to point i (gather).
template <typename T>
SGP_HD inline void sgp_slice_point(int64_t i, const T* values, T* out, int nc, int d, const int32_t* vid,
                                   const T* bary) {
    for (int c = 0; c < nc; ++c) out[i * nc + c] = 0;
    for (int k = 0; k <= d; ++k) {
        const int64_t pv = i * (d + 1) + k;
        const T w = bary[pv];
        const T* src = values + (int64_t)vid[pv] * nc;
        for (int c = 0; c < nc; ++c) out[i * nc + c] += w * src[c];
    }
}

// ---- diagonal calibration: the local Gram of the blur between each point's simplex vertices -------
// G_i[k][l] = <C e_{a_ik}, C e_{a_il}> = B[a_ik][a_il] (C = one blur pass along axes 0..d on the lattice
// actually built, B = C^T C), so that diag(W^T B W)_i = w_i^T G_i w_i. Neighbouring simplices share most
// vertex pairs (on the 8-D flights inputs 125k distinct pairs serve 3.7M entries of 82k distinct simplices),
// so B is evaluated once per distinct pair (a <= b) and the Grams are filled from those values:
//   1. the distinct simplices (rows of vid) are found by hashing (sgp_insert with key length d+1);
//      sgp_pair_keys_simplex writes the (d+1)(d+2)/2 keys (a, b) of each, and these are hashed
//      (key length 2) and numbered like the vertices;
//   2. per block of columns: exact, the block's columns of B (identity columns through all 2(d+1) blurs)
//      and sgp_pair_extract; estimated, Z = C^T P for S Rademacher columns P (d+1 blurs) and
//      sgp_pair_dot, B[a][b] ~= Z_a . Z_b / S;
//   3. sgp_diag_from_pairs_point computes every point's diagonal w_i^T G_i w_i from its simplex's pairs, and
//      sgp_gram_from_pairs_point fills its Gram where the gradient needs it.
// A Rademacher sign is a bit of a hash of (vertex id, column / 64), so no probe matrix is ever stored whole.
SGP_HD inline uint64_t sgp_mix64(uint64_t x) {  // splitmix64 finalizer
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// Row v of columns col0 .. col0+nc-1 of the identity, or of the probes: the sign of column col is bit col % 64 of the
// hash of (v, col / 64), one hash for 64 columns (one a column was most of the time of filling and blurring them).
template <typename T>
SGP_HD inline void sgp_probe_fill_vertex(int32_t v, int64_t col0, int nc, int identity, T* out) {
    uint64_t bits = 0;
    for (int c = 0; c < nc; ++c) {
        const int64_t col = col0 + c;
        T val;
        if (identity) {
            val = (int64_t)v == col ? (T)1 : (T)0;
        } else {
            if (c == 0 || (col & 63) == 0) bits = sgp_mix64(((uint64_t)(uint32_t)v << 32) ^ (uint64_t)(col >> 6));
            val = ((bits >> (col & 63)) & 1) ? (T)1 : (T)-1;
        }
        out[(int64_t)v * nc + c] = val;
    }
}

// Pairs k <= l of a simplex's d+1 vertices, in row-major upper-triangle order.
SGP_HD inline int sgp_pairs_per_simplex(int d) { return (d + 1) * (d + 2) / 2; }

// keys[j][t] = (min, max) vertex ids of pair t of the simplex of point idx[j].
SGP_HD inline void sgp_pair_keys_simplex(int64_t j, const int32_t* idx, const int32_t* vid, int d, int32_t* keys) {
    const int dp1 = d + 1;
    const int32_t* a = vid + (int64_t)idx[j] * dp1;
    int32_t* out = keys + j * sgp_pairs_per_simplex(d) * 2;
    for (int k = 0; k < dp1; ++k)
        for (int l = k; l < dp1; ++l, out += 2) {
            out[0] = a[k] < a[l] ? a[k] : a[l];
            out[1] = a[k] < a[l] ? a[l] : a[k];
        }
}

// acc[p] += scale * Z_a . Z_b for distinct pair p = (a, b) (keys: P x 2, z: m x nc).
template <typename T>
SGP_HD inline void sgp_pair_dot(int64_t p, const int32_t* keys, const T* z, int nc, T scale, T* acc) {
    const T* za = z + (int64_t)keys[2 * p] * nc;
    const T* zb = z + (int64_t)keys[2 * p + 1] * nc;
    // 8 partial sums: one running sum is a chain of dependent adds that the compiler may not reorder (strict
    // floating point), so it neither vectorizes nor overlaps them
    T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int c = 0;
    for (; c + 8 <= nc; c += 8)
        for (int l = 0; l < 8; ++l) part[l] += za[c + l] * zb[c + l];
    for (; c < nc; ++c) part[c & 7] += za[c] * zb[c];
    T s = 0;
    for (int l = 0; l < 8; ++l) s += part[l];
    acc[p] += scale * s;
}

// acc[p] = B[a][b] if column b of pair p = (a, b) is among the block's columns col0 .. col0+nc-1
// (bcols: m x nc, column c = B e_{col0 + c}); every pair is written by exactly one block.
template <typename T>
SGP_HD inline void sgp_pair_extract(int64_t p, const int32_t* keys, const T* bcols, int64_t col0, int nc, T* acc) {
    const int64_t c = (int64_t)keys[2 * p + 1] - col0;
    if (c >= 0 && c < nc) acc[p] = bcols[(int64_t)keys[2 * p] * nc + c];
}

// gram_i[k][l] = gram_i[l][k] = acc[pid[simplex[i]][t]] for pair t = (k, l) of point i's simplex.
template <typename T>
SGP_HD inline void sgp_gram_from_pairs_point(int64_t i, const int32_t* simplex, const int32_t* pid, const T* acc,
                                             int d, T* gram) {
    const int dp1 = d + 1;
    const int32_t* p = pid + (int64_t)simplex[i] * sgp_pairs_per_simplex(d);
    T* g = gram + i * dp1 * dp1;
    for (int k = 0; k < dp1; ++k)
        for (int l = k; l < dp1; ++l) {
            const T v = acc[*p++];
            g[k * dp1 + l] = v;
            g[l * dp1 + k] = v;
        }
}

// out_i = G_i w_i (d+1 values) from the pair values of point i's simplex, without forming G_i.
template <typename T>
SGP_HD inline void sgp_gram_times_from_pairs_point(int64_t i, const int32_t* simplex, const int32_t* pid,
                                                   const T* acc, const T* bary, int d, T* out) {
    const int dp1 = d + 1;
    const int32_t* p = pid + (int64_t)simplex[i] * sgp_pairs_per_simplex(d);
    const T* w = bary + i * dp1;
    T* o = out + i * dp1;
    for (int k = 0; k < dp1; ++k) o[k] = 0;
    for (int k = 0; k < dp1; ++k) {
        o[k] += acc[*p++] * w[k];
        for (int l = k + 1; l < dp1; ++l) {
            const T v = acc[*p++];
            o[k] += v * w[l];
            o[l] += v * w[k];
        }
    }
}

// diag_i = w_i^T G_i w_i from the pair values of point i's simplex, without forming G_i.
template <typename T>
SGP_HD inline void sgp_diag_from_pairs_point(int64_t i, const int32_t* simplex, const int32_t* pid, const T* acc,
                                             const T* bary, int d, T* diag) {
    const int dp1 = d + 1;
    const int32_t* p = pid + (int64_t)simplex[i] * sgp_pairs_per_simplex(d);
    const T* w = bary + i * dp1;
    T s = 0;
    for (int k = 0; k < dp1; ++k) {
        s += w[k] * w[k] * acc[*p++];
        for (int l = k + 1; l < dp1; ++l) s += (T)2 * w[k] * w[l] * acc[*p++];
    }
    diag[i] = s;
}

#endif  // SGP_LATTICE_H
