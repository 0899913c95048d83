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
    for (int j = 0; j < d; ++j)
        for (int k = j + 1; k <= d; ++k) {
            if (el[j] - (T)greedy[j] < el[k] - (T)greedy[k]) rank[j]++;
            else rank[k]++;
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
    int64_t s = (int64_t)(sgp_hash(key, d) & (uint64_t)mask);
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

// Owner index of `key`, or -1 if it is not in the table.
SGP_HD inline int32_t sgp_lookup(const int32_t* key, const int32_t* pv_keys, int d, const int32_t* table,
                                 int64_t mask) {
    int64_t s = (int64_t)(sgp_hash(key, d) & (uint64_t)mask);
    for (int64_t probe = 0; probe <= mask; ++probe) {
        int32_t cur = table[s];
        if (cur == -1) return -1;
        if (sgp_keys_equal(pv_keys + (int64_t)cur * d, key, d)) return cur;
        s = (s + 1) & mask;
    }
    return -1;
}

// Owners take the next vertex id.
SGP_HD inline void sgp_number_owner(int32_t j, const int32_t* rep, int32_t* owner_vid, int32_t* vertex_owner,
                                    int32_t* counter) {
    if (rep[j] == j) {
        int32_t v = sgp_atomic_inc(counter);
        owner_vid[j] = v;
        vertex_owner[v] = j;
    }
}

// Every point-vertex reads its owner's vertex id.
SGP_HD inline void sgp_resolve_vid(int32_t j, const int32_t* rep, const int32_t* owner_vid, int32_t* vid) {
    vid[j] = owner_vid[rep[j]];
}

// Neighbours of vertex a along lattice direction `axis` at steps +-1..+-r: key - t u_axis with
// u_axis = (d+1) e_axis - 1 (only the first d coordinates are stored).
SGP_HD inline void sgp_neighbours(int32_t a, int axis, const int32_t* vertex_owner, const int32_t* pv_keys, int d,
                                  const int32_t* table, int64_t mask, const int32_t* owner_vid, int r,
                                  int32_t* nbr) {
    int32_t key[SGP_MAX_D];
    const int32_t* base = pv_keys + (int64_t)vertex_owner[a] * d;
    int32_t* out = nbr + ((int64_t)a * (d + 1) + axis) * 2 * r;
    for (int side = 0; side < 2; ++side) {
        for (int t = 1; t <= r; ++t) {
            int32_t step = side == 0 ? t : -t;
            for (int j = 0; j < d; ++j) key[j] = base[j] + step;
            if (axis < d) key[axis] = base[axis] - step * d;
            int32_t owner = sgp_lookup(key, pv_keys, d, table, mask);
            out[side * r + t - 1] = owner < 0 ? -1 : owner_vid[owner];
        }
    }
}

// Splat point i's nc columns onto its d+1 vertices (scatter: atomic adds).
template <typename T>
SGP_HD inline void sgp_splat_point(int64_t i, const T* v, int nc, int d, const int32_t* vid, const T* bary,
                                   T* values) {
    for (int k = 0; k <= d; ++k) {
        const int64_t pv = i * (d + 1) + k;
        const T w = bary[pv];
        T* dst = values + (int64_t)vid[pv] * nc;
        for (int c = 0; c < nc; ++c) sgp_atomic_add(dst + c, w * v[i * nc + c]);
    }
}

// One 1-D blur along `axis` at vertex a (gather: no atomics; symmetric because the neighbour
// relation is and the stencil coef[0..r] is used for both sides).
template <typename T>
SGP_HD inline void sgp_blur_vertex(int32_t a, int axis, const T* in, T* out, int nc, int d, const int32_t* nbr,
                                   int r, const T* coef) {
    const int32_t* nb = nbr + ((int64_t)a * (d + 1) + axis) * 2 * r;
    for (int c = 0; c < nc; ++c) {
        T acc = coef[0] * in[(int64_t)a * nc + c];
        for (int t = 1; t <= r; ++t) {
            int32_t p = nb[t - 1], m = nb[r + t - 1];
            if (p >= 0) acc += coef[t] * in[(int64_t)p * nc + c];
            if (m >= 0) acc += coef[t] * in[(int64_t)m * nc + c];
        }
        out[(int64_t)a * nc + c] = acc;
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

// ---- exact local Gram of the blur, for the diagonal calibration ----------------------------------
// For point i with simplex vertices a_0..a_d, Y = C [e_{a_0} .. e_{a_d}] (C = one blur pass along
// axes 0..d, missing vertices dropped exactly as in the product) is propagated as a sparse block of
// d+1 columns, and gram_out[i] = Y^T Y ((d+1) x (d+1)), so diag(W^T C^T C W)_i = w_i^T gram_i w_i.
// Scratch (per thread): two open-addressing tables of `cap` slots (a power of two, filled with -1 by
// the caller and left so on return) holding at most cap/2 entries each. Returns 0, or 1 if the
// support outgrew cap/2 (the caller retries with a larger cap).
struct SgpLocalScratch {
    int32_t* slots;   // 2 * cap
    int32_t* vertex;  // 2 * cap
    int32_t* slot;    // 2 * cap
};

template <typename T>
SGP_HD inline int32_t sgp_local_find(int32_t* slots, int32_t* vertex, int32_t* slot, T* vals, int32_t cap,
                                     int32_t* count, int32_t v, int dp1) {
    uint32_t s = ((uint32_t)v * 2654435761u) & (uint32_t)(cap - 1);
    while (true) {
        int32_t e = slots[s];
        if (e == -1) {
            if (*count >= cap / 2) return -1;
            e = (*count)++;
            slots[s] = e;
            vertex[e] = v;
            slot[e] = (int32_t)s;
            for (int k = 0; k < dp1; ++k) vals[(int64_t)e * dp1 + k] = 0;
            return e;
        }
        if (vertex[e] == v) return e;
        s = (s + 1) & (uint32_t)(cap - 1);
    }
}

template <typename T>
SGP_HD inline int sgp_local_gram_point(int64_t i, int d, const int32_t* vid, const int32_t* nbr, int r,
                                       const T* coef, int32_t cap, SgpLocalScratch sc, T* vals, T* gram_out) {
    const int dp1 = d + 1;
    int32_t count[2] = {0, 0};
    int cur = 0, status = 0;
    for (int k = 0; k < dp1; ++k) {
        int32_t e = sgp_local_find<T>(sc.slots, sc.vertex, sc.slot, vals, cap, &count[0], vid[i * dp1 + k], dp1);
        vals[(int64_t)e * dp1 + k] = 1;
    }
    for (int axis = 0; axis <= d && status == 0; ++axis) {
        const int nxt = 1 - cur;
        int32_t* s_n = sc.slots + (int64_t)nxt * cap;
        int32_t* v_n = sc.vertex + (int64_t)nxt * cap;
        int32_t* p_n = sc.slot + (int64_t)nxt * cap;
        T* x_n = vals + (int64_t)nxt * cap * dp1;
        const T* x_c = vals + (int64_t)cur * cap * dp1;
        for (int32_t e = 0; e < count[cur] && status == 0; ++e) {
            const int32_t b = sc.vertex[(int64_t)cur * cap + e];
            const int32_t* nb = nbr + ((int64_t)b * dp1 + axis) * 2 * r;
            for (int t = -r; t <= r; ++t) {
                const int32_t target = t == 0 ? b : (t > 0 ? nb[t - 1] : nb[r - t - 1]);
                if (target < 0) continue;
                const int32_t f = sgp_local_find<T>(s_n, v_n, p_n, x_n, cap, &count[nxt], target, dp1);
                if (f < 0) { status = 1; break; }
                const T c = coef[t < 0 ? -t : t];
                for (int k = 0; k < dp1; ++k) x_n[(int64_t)f * dp1 + k] += c * x_c[(int64_t)e * dp1 + k];
            }
        }
        for (int32_t e = 0; e < count[cur]; ++e) sc.slots[(int64_t)cur * cap + sc.slot[(int64_t)cur * cap + e]] = -1;
        count[cur] = 0;
        cur = nxt;
    }
    if (status == 0) {
        const T* x = vals + (int64_t)cur * cap * dp1;
        for (int k = 0; k < dp1; ++k)
            for (int l = k; l < dp1; ++l) {
                T acc = 0;
                for (int32_t e = 0; e < count[cur]; ++e) acc += x[(int64_t)e * dp1 + k] * x[(int64_t)e * dp1 + l];
                gram_out[(i * dp1 + k) * dp1 + l] = acc;
                gram_out[(i * dp1 + l) * dp1 + k] = acc;
            }
    }
    for (int32_t e = 0; e < count[cur]; ++e) sc.slots[(int64_t)cur * cap + sc.slot[(int64_t)cur * cap + e]] = -1;
    return status;
}

#endif  // SGP_LATTICE_H
