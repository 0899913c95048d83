// CPU build of the lattice kernels: OpenMP loops over the per-element functions of sgp_lattice.h.
// C ABI only (plain pointers and integers); the Python side (kernels_cuda/cpu.py) loads it with ctypes.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>
#include <stdint.h>

#include "sgp_lattice.h"

namespace {

// Below about a millisecond of work (this many element-operations) a loop runs on one thread: on a
// loaded machine OpenMP's spinning barriers cost more than the loop (measured on 2 shared cores:
// 25 ms with 2 threads vs 1.2 ms on one for a 300-point product). OMP_WAIT_POLICY=PASSIVE helps
// further, but libgomp reads it once per process (torch loads its copy first).
constexpr int64_t kParallelMin = 1 << 20;
// Weight of an element-operation of the embedding and hashing loops (comparisons, branches, hashes, scattered reads)
// against one of the products' multiply-adds in that count: 10k 8-D flights points embed in 3.6 ms on one thread for
// 0.64M (N d^2) operations, their 90k point-vertices hash in 2.5 ms, about 8x a product's time per operation.
constexpr int64_t kHashWork = 8;
// Bytes of per-thread splat buffers beyond the output itself; past them the splat uses atomic adds.
constexpr int64_t kSplatPrivateMax = int64_t(128) << 20;
// Hash lookups whose cache misses the neighbour search overlaps (a batch of vertices' keys, hashed together).
constexpr int kLookupsInFlight = 256;

template <typename T>
void embed(const T* z, int64_t n, int d, const T* scale, T* bary, int32_t* rank, int32_t* greedy,
           int32_t* pv_keys) {
#pragma omp parallel for schedule(static) if (n * d * d * kHashWork >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_embed_point<T>(i, z, d, scale, bary, rank, greedy, pv_keys);
}

// vals (m x nc) = W v. Each thread scatters its static block of points into its own buffer with plain adds
// (thread 0 into vals), then the buffers are summed into vals in thread order: no atomics (whose lock
// cmpxchg loop was most of a product's time) and the same sums in every run for a given number of threads.
// Where the extra buffers would pass kSplatPrivateMax, atomic adds into vals instead.
template <typename T>
void splat(const T* v, int64_t n, int nc, int d, const int32_t* vid, const T* bary, int32_t m, T* vals) {
    const int64_t mv = (int64_t)m * nc;
    const int nt = n * nc * (d + 1) >= kParallelMin ? omp_get_max_threads() : 1;
    if (nt > 1 && (nt - 1) * mv * (int64_t)sizeof(T) > kSplatPrivateMax) {
#pragma omp parallel for schedule(static) if (mv >= kParallelMin)
        for (int64_t a = 0; a < mv; ++a) vals[a] = 0;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) sgp_splat_point<T>(i, v, nc, d, vid, bary, vals);
        return;
    }
    std::unique_ptr<T[]> extra(new T[(size_t)(nt - 1) * mv]);  // each thread zeroes its own, in parallel
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), used = omp_get_num_threads();
        T* own = t == 0 ? vals : extra.get() + (t - 1) * mv;
        for (int64_t a = 0; a < mv; ++a) own[a] = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) sgp_splat_point<T, false>(i, v, nc, d, vid, bary, own);
#pragma omp for schedule(static)
        for (int64_t a = 0; a < mv; ++a)
            for (int k = 0; k + 1 < used; ++k) vals[a] += extra[k * mv + a];
    }
}

// Blur the vertex values vals (m x nc) along passes first..2d+1 (pass p <= d is axis p, then axes d..0: B = C^T C
// from first = 0, C^T from first = d + 1), ping-ponging with buf, each pass threaded over the vertices; returns
// the buffer holding the result (vals after all 2(d+1) passes).
template <typename T>
T* blur(T* vals, T* buf, int32_t m, int nc, int d, const int32_t* nbr, int r, const T* coef, int first) {
    T* src = vals;
    T* dst = buf;
    for (int pass = first; pass < 2 * (d + 1); ++pass) {
        const int axis = pass <= d ? pass : 2 * d + 1 - pass;
#pragma omp parallel for schedule(static) if ((int64_t)m * nc * (2 * r + 1) >= kParallelMin)
        for (int32_t a = 0; a < m; ++a) sgp_blur_vertex<T>(a, axis, src, dst, nc, d, nbr, r, coef, 0, nc);
        T* t = src;
        src = dst;
        dst = t;
    }
    return src;
}

// vals (m x nc) = C^T C W v.
template <typename T>
void splat_blur(const T* v, int64_t n, int nc, int d, const int32_t* vid, const T* bary, int32_t m,
                const int32_t* nbr, int r, const T* coef, T* vals, T* buf) {
    splat<T>(v, n, nc, d, vid, bary, m, vals);
    blur<T>(vals, buf, m, nc, d, nbr, r, coef, 0);
}

// out (n x nc) = W^T C^T u for vertex values u (m x nc, overwritten; buf is scratch of m x nc): the transpose of the
// one-pass splat-blur C W, so that (W^T C^T)(C W) is the filter.
template <typename T>
void blur_slice(T* u, T* out, int64_t n, int nc, int d, const int32_t* vid, const T* bary, int32_t m,
                const int32_t* nbr, int r, const T* coef, T* buf) {
    const T* vals = blur<T>(u, buf, m, nc, d, nbr, r, coef, d + 1);
#pragma omp parallel for schedule(static) if (n * nc * (d + 1) >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_slice_point<T>(i, vals, out, nc, d, vid, bary);
}

template <typename T>
void filter(const T* v, T* out, int64_t n, int nc, int d, const int32_t* vid, const T* bary, int32_t m,
            const int32_t* nbr, int r, const T* coef, T* buf0, T* buf1) {
    splat_blur<T>(v, n, nc, d, vid, bary, m, nbr, r, coef, buf0, buf1);
#pragma omp parallel for schedule(static) if (n * nc * (d + 1) >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_slice_point<T>(i, buf0, out, nc, d, vid, bary);
}

// Blur one block of nc columns in place of buf0 (ping-pong with buf1) along passes first..2d+1 (pass p < d+1 is
// axis p, then axes d..0), serially; returns the buffer holding the result.
template <typename T>
T* blur_block(T* buf0, T* buf1, int32_t m, int nc, int d, const int32_t* nbr, int r, const T* coef, int first) {
    T* src = buf0;
    T* dst = buf1;
    for (int pass = first; pass < 2 * (d + 1); ++pass) {
        const int axis = pass <= d ? pass : 2 * d + 1 - pass;
        for (int32_t a = 0; a < m; ++a) sgp_blur_vertex<T>(a, axis, src, dst, nc, d, nbr, r, coef, 0, nc);
        T* t = src;
        src = dst;
        dst = t;
    }
    return src;
}

// Values of B = C^T C at the P distinct vertex pairs (keys: P x 2) into acc. Exact (identity): blocks of `block`
// columns of B (all 2(d+1) blurs), each block entirely on one thread with its own buffers; every pair is written
// by the one block holding its column. Else `total` Rademacher columns: Z = C^T P (d+1 blurs along axes d..0) per
// block, each thread accumulating its blocks' Z_a . Z_b / S into its own copy of acc; the copies are summed in
// thread order (static schedule: the same result for the same thread count).
template <typename T>
void pair_gram(const int32_t* keys, int64_t npairs, int d, int32_t m, const int32_t* nbr, int r, const T* coef,
               int64_t total, int identity, int block, T* acc) {
    const int dp1 = d + 1;
    const int64_t nblocks = (total + block - 1) / block;
    const T scale = (T)1 / (T)total;
    for (int64_t p = 0; p < npairs; ++p) acc[p] = 0;
    std::vector<std::vector<T>> parts;
#pragma omp parallel if (nblocks > 1 && (int64_t)m * block * (2 * r + 1) * dp1 >= kParallelMin)
    {
#pragma omp single
        parts.resize(identity ? 0 : omp_get_num_threads());
        std::vector<T> buf0((size_t)m * block), buf1((size_t)m * block);
        T* own = acc;
        if (!identity) {
            parts[omp_get_thread_num()].assign((size_t)npairs, (T)0);
            own = parts[omp_get_thread_num()].data();
        }
#pragma omp for schedule(static, 1)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            const int64_t col0 = bi * block;
            const int nc = (int)(total - col0 < block ? total - col0 : block);
            for (int32_t v = 0; v < m; ++v) sgp_probe_fill_vertex<T>(v, col0, nc, identity, buf0.data());
            T* z = blur_block<T>(buf0.data(), buf1.data(), m, nc, d, nbr, r, coef, identity ? 0 : dp1);
            if (identity)
                for (int64_t p = 0; p < npairs; ++p) sgp_pair_extract<T>(p, keys, z, col0, nc, own);
            else
                for (int64_t p = 0; p < npairs; ++p) sgp_pair_dot<T>(p, keys, z, nc, scale, own);
        }
    }
    for (const std::vector<T>& part : parts)
        for (int64_t p = 0; p < npairs; ++p) acc[p] += part[p];
}

template <typename T>
void gram_from_pairs(const int32_t* simplex, int64_t n, const int32_t* pid, const T* acc, int d, T* gram) {
#pragma omp parallel for schedule(static) if (n * (d + 1) * (d + 1) >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_gram_from_pairs_point<T>(i, simplex, pid, acc, d, gram);
}

template <typename T>
void diag_from_pairs(const int32_t* simplex, int64_t n, const int32_t* pid, const T* acc, const T* bary, int d,
                     T* diag) {
#pragma omp parallel for schedule(static) if (n * (d + 1) * (d + 1) >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_diag_from_pairs_point<T>(i, simplex, pid, acc, bary, d, diag);
}

template <typename T>
void gram_times_from_pairs(const int32_t* simplex, int64_t n, const int32_t* pid, const T* acc, const T* bary, int d,
                           T* out) {
#pragma omp parallel for schedule(static) if (n * (d + 1) * (d + 1) >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) sgp_gram_times_from_pairs_point<T>(i, simplex, pid, acc, bary, d, out);
}

// The distinct keys inserted into a table of mask + 1 slots, counted by each thread and added to the shared count
// every `batch` insertions (one shared atomic per insertion, bouncing its cache line between the cores, was half of
// numbering the 380k vertex pairs of 10k flights points). Once the shared count passes half the slots the insertions
// stop (full(), which after the last flush also says whether the final count did). The batches keep the load under
// 5/8 meanwhile, so probing always finds an empty slot: at most threads x batch <= limit / 4 go uncounted.
class DistinctCount {
   public:
    explicit DistinctCount(int64_t mask)
        : limit_((mask + 1) / 2),
          batch_(std::max<int64_t>(1, std::min<int64_t>(1024, limit_ / (4 * omp_get_max_threads())))) {}
    bool full() const { return __atomic_load_n(&full_, __ATOMIC_RELAXED); }
    void set_full() { __atomic_store_n(&full_, 1, __ATOMIC_RELAXED); }

    class Local {  // one thread's uncounted insertions, added on destruction
       public:
        explicit Local(DistinctCount& shared) : shared_(shared) {}
        ~Local() { flush(); }
        void add() {
            if (++pending_ == shared_.batch_) flush();
        }

       private:
        void flush() {
            if (pending_ && __atomic_add_fetch(&shared_.count_, pending_, __ATOMIC_RELAXED) > shared_.limit_)
                shared_.set_full();
            pending_ = 0;
        }
        DistinctCount& shared_;
        int64_t pending_ = 0;
    };

   private:
    const int64_t limit_, batch_;
    int64_t count_ = 0;
    int full_ = 0;
};

// Hash the n keys (key length `len`) into table (cap = mask + 1 slots), number the distinct keys 0..K-1 in the
// order of their first occurrence (whichever occurrence won the slot, so ids do not depend on thread scheduling)
// and write each occurrence's id. Returns K, or -1 once more than cap / 2 distinct keys arrive (the insertions stop
// there; the caller retries with a larger table, sized at least 2 n for certain success): the table is sized for
// the distinct keys, which are often far fewer than n (7k vertices of 2.2M point-vertices on all flights rows),
// so that it stays in cache. rep and first_id are scratch of n entries; owner_of (n entries) maps an id to the
// first occurrence of its key.
int32_t number_keys(const int32_t* keys, int64_t n, int len, int32_t* table, int64_t mask, int32_t* rep,
                    int32_t* first_id, int32_t* owner_of, int32_t* id) {
#pragma omp parallel for schedule(static) if (mask >= kParallelMin)
    for (int64_t s = 0; s <= mask; ++s) table[s] = -1;
    DistinctCount distinct(mask);
#pragma omp parallel if (n * len * kHashWork >= kParallelMin)
    {
        DistinctCount::Local mine(distinct);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            if (distinct.full()) continue;
            rep[j] = sgp_insert((int32_t)j, keys, len, table, mask);
            if (rep[j] < 0) distinct.set_full();
            else if (rep[j] == j) mine.add();
            first_id[j] = -1;
        }
    }
    if (distinct.full()) return -1;
    int32_t count = 0;
    for (int64_t j = 0; j < n; ++j)
        if (first_id[rep[j]] < 0) {
            first_id[rep[j]] = count;
            owner_of[count++] = (int32_t)j;
        }
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t j = 0; j < n; ++j) sgp_resolve_vid((int32_t)j, rep, first_id, id);
    return count;
}

// The distinct vertex pairs (keys: n x 2 int32) numbered 0..K-1 in the order of their table slots, every step
// threaded: each pair is packed into one 64-bit word held in the table itself (no indirection to a key array of n
// rows), the slots are counted and numbered by each thread over its share of the table, and each pair's id read
// from its slot. Where a key lands depends on the threads' order of insertion, so the numbering can differ from run
// to run; what is computed per distinct pair does not (a value of B depends only on its two vertices, and a point
// reads its simplex's pairs in a fixed order). The numbering in order of first occurrence that this replaces read
// the n slots on one thread (3.7M pair keys, 131k distinct, on all flights rows). Writes the distinct pairs to
// distinct (at most (mask + 1) / 2 rows) and each key's id; slot_of (n) and slot_id (mask + 1) are scratch.
// Returns K, or -1 once more than half the slots fill.
int32_t number_pairs(const int32_t* keys, int64_t n, uint64_t* table, int64_t mask, int32_t* slot_of,
                     int32_t* slot_id, int32_t* distinct, int32_t* id) {
    constexpr uint64_t kEmpty = ~uint64_t(0);  // (-1, -1): not a pair of vertex ids
#pragma omp parallel for schedule(static) if (mask >= kParallelMin)
    for (int64_t s = 0; s <= mask; ++s) table[s] = kEmpty;
    DistinctCount count(mask);
    const bool threaded = n * 2 * kHashWork >= kParallelMin;
#pragma omp parallel if (threaded)
    {
        DistinctCount::Local mine(count);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            if (count.full()) continue;
            const uint64_t key = ((uint64_t)(uint32_t)keys[2 * j] << 32) | (uint32_t)keys[2 * j + 1];
            int64_t s = (int64_t)(sgp_mix64(key) & (uint64_t)mask);
            for (;;) {
                uint64_t cur = __atomic_load_n(table + s, __ATOMIC_RELAXED);
                if (cur == kEmpty) {
                    if (__atomic_compare_exchange_n(table + s, &cur, key, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                        mine.add();
                        break;
                    }  // else cur holds the key that took the slot
                }
                if (cur == key) break;
                s = (s + 1) & mask;
            }
            slot_of[j] = (int32_t)s;
        }
    }
    if (count.full()) return -1;
    std::vector<int64_t> first(1, 0);  // first[t]: the first id of thread t's share of the slots
#pragma omp parallel if (threaded)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = (mask + 1) * t / nt, hi = (mask + 1) * (t + 1) / nt;
#pragma omp single
        first.assign(nt + 1, 0);
        int64_t used = 0;
        for (int64_t s = lo; s < hi; ++s) used += table[s] != kEmpty;
        first[t + 1] = used;
#pragma omp barrier
#pragma omp single
        for (int u = 0; u < nt; ++u) first[u + 1] += first[u];
        int64_t k = first[t];
        for (int64_t s = lo; s < hi; ++s)
            if (table[s] != kEmpty) {
                slot_id[s] = (int32_t)k;
                distinct[2 * k] = (int32_t)(table[s] >> 32);
                distinct[2 * k + 1] = (int32_t)(uint32_t)table[s];
                ++k;
            }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; ++j) id[j] = slot_id[slot_of[j]];
    }
    return (int32_t)first.back();
}

}  // namespace

extern "C" {

int sgp_max_d() { return SGP_MAX_D; }

void sgp_embed_f32(const float* z, int64_t n, int d, const float* scale, float* bary, int32_t* rank,
                   int32_t* greedy, int32_t* pv_keys) {
    embed<float>(z, n, d, scale, bary, rank, greedy, pv_keys);
}
void sgp_embed_f64(const double* z, int64_t n, int d, const double* scale, double* bary, int32_t* rank,
                   int32_t* greedy, int32_t* pv_keys) {
    embed<double>(z, n, d, scale, bary, rank, greedy, pv_keys);
}

// Hash the n_pv point-vertex keys into `table` (cap = mask + 1 slots, filled with -1 here), number
// the distinct keys 0..M-1 and write each point-vertex's vertex id. Returns M, or -1 if more than cap / 2 distinct
// keys arrived (cannot happen for cap >= 2 n_pv; the caller retries with a larger table). owner_vid and rep are
// scratch of n_pv entries; vertex_owner (n_pv entries) maps a vertex id to the point-vertex holding its key.
int32_t sgp_build_table(const int32_t* pv_keys, int64_t n_pv, int d, int32_t* table, int64_t mask, int32_t* rep,
                        int32_t* owner_vid, int32_t* vertex_owner, int32_t* vid) {
    return number_keys(pv_keys, n_pv, d, table, mask, rep, owner_vid, vertex_owner, vid);
}

// nbr (m x (d+1) x 2r): every vertex's neighbours (sgp_neighbours), the lookups of a batch of vertices interleaved:
// all their keys hashed and home slots prefetched, then each first occupant read and its key prefetched, then the
// probes finished. One lookup after another each waited on two or three cache misses: on the 274k vertices of 100k
// flights points at GPyTorch's default lengthscale 220-350 ms against 100-140 ms batched (2 threads, alternating
// runs); no change where the table and keys stay in cache.
void sgp_build_neighbours(int32_t m, int d, const int32_t* vertex_owner, const int32_t* pv_keys,
                          const int32_t* table, int64_t mask, const int32_t* owner_vid, int r, int32_t* nbr) {
    const int per = (d + 1) * 2 * r;  // lookups per vertex
    const int batch = std::max(1, kLookupsInFlight / per);
#pragma omp parallel if ((int64_t)m * (d + 1) * d * r * kHashWork >= kParallelMin)
    {
        std::vector<int32_t> keys((size_t)batch * per * d), cur((size_t)batch * per);
        std::vector<int64_t> slot((size_t)batch * per);
#pragma omp for schedule(static)
        for (int64_t a0 = 0; a0 < m; a0 += batch) {
            const int64_t a1 = std::min<int64_t>(a0 + batch, m);
            int q = 0;
            for (int64_t a = a0; a < a1; ++a) {
                const int32_t* base = pv_keys + (int64_t)vertex_owner[a] * d;
                for (int axis = 0; axis <= d; ++axis)
                    for (int k = 0; k < 2 * r; ++k, ++q) {
                        int32_t* key = keys.data() + (size_t)q * d;
                        sgp_neighbour_key(base, axis, k, r, d, key);
                        slot[q] = sgp_home_slot(key, d, mask);
                        __builtin_prefetch(table + slot[q]);
                    }
            }
            for (int i = 0; i < q; ++i) {
                cur[i] = table[slot[i]];
                if (cur[i] >= 0) {
                    __builtin_prefetch(pv_keys + (int64_t)cur[i] * d);
                    __builtin_prefetch(owner_vid + cur[i]);
                }
            }
            int32_t* out = nbr + a0 * per;
            for (int i = 0; i < q; ++i) {
                const int32_t owner = sgp_probe_from(keys.data() + (size_t)i * d, slot[i], cur[i], pv_keys, d, table,
                                                     mask);
                out[i] = owner < 0 ? -1 : owner_vid[owner];
            }
        }
    }
}

// out (n x nc) = W^T C^T C W v for v (n x nc); buf0, buf1 are scratch of m x nc.
void sgp_filter_f32(const float* v, float* out, int64_t n, int nc, int d, const int32_t* vid, const float* bary,
                    int32_t m, const int32_t* nbr, int r, const float* coef, float* buf0, float* buf1) {
    filter<float>(v, out, n, nc, d, vid, bary, m, nbr, r, coef, buf0, buf1);
}
void sgp_filter_f64(const double* v, double* out, int64_t n, int nc, int d, const int32_t* vid,
                    const double* bary, int32_t m, const int32_t* nbr, int r, const double* coef, double* buf0,
                    double* buf1) {
    filter<double>(v, out, n, nc, d, vid, bary, m, nbr, r, coef, buf0, buf1);
}

// B W v only (the vertex values before slicing, m x nc), for the gradient with respect to the
// barycentric weights; vals and buf are m x nc, the result is in vals.
void sgp_splat_blur_f32(const float* v, int64_t n, int nc, int d, const int32_t* vid, const float* bary, int32_t m,
                        const int32_t* nbr, int r, const float* coef, float* vals, float* buf) {
    splat_blur<float>(v, n, nc, d, vid, bary, m, nbr, r, coef, vals, buf);
}
void sgp_splat_blur_f64(const double* v, int64_t n, int nc, int d, const int32_t* vid, const double* bary,
                        int32_t m, const int32_t* nbr, int r, const double* coef, double* vals, double* buf) {
    splat_blur<double>(v, n, nc, d, vid, bary, m, nbr, r, coef, vals, buf);
}

// out (n x nc) = W^T C^T u for vertex values u (m x nc, overwritten; buf: m x nc scratch): with C W the one-pass
// splat-blur, a draw of N(0, W^T C^T C W) is W^T C^T of standard normal vertex values.
void sgp_blur_slice_f32(float* u, float* out, int64_t n, int nc, int d, const int32_t* vid, const float* bary,
                        int32_t m, const int32_t* nbr, int r, const float* coef, float* buf) {
    blur_slice<float>(u, out, n, nc, d, vid, bary, m, nbr, r, coef, buf);
}
void sgp_blur_slice_f64(double* u, double* out, int64_t n, int nc, int d, const int32_t* vid, const double* bary,
                        int32_t m, const int32_t* nbr, int r, const double* coef, double* buf) {
    blur_slice<double>(u, out, n, nc, d, vid, bary, m, nbr, r, coef, buf);
}

// Number the distinct rows of keys (n x len) 0..K-1 in the order of their first occurrence: id[j] is row j's
// number, owner_of[k] the first row holding key k. Returns K, or -1 if more than cap / 2 distinct keys arrived in a
// table of cap slots (cannot happen for cap >= 2 n; the caller retries larger). Used for the distinct simplices
// (rows of vid).
int32_t sgp_number_rows(const int32_t* keys, int64_t n, int len, int64_t cap, int32_t* owner_of, int32_t* id) {
    std::vector<int32_t> rep((size_t)n), table((size_t)cap), first_id((size_t)n);
    return number_keys(keys, n, len, table.data(), cap - 1, rep.data(), first_id.data(), owner_of, id);
}

// The distinct vertex pairs of keys (n x 2), numbered in table order (see number_pairs) with a table of cap slots:
// distinct (cap / 2 x 2) and every key's id (n). Returns their number K, or -1 if more than cap / 2 arrived (the
// caller retries larger).
int32_t sgp_number_pairs(const int32_t* keys, int64_t n, int64_t cap, int32_t* distinct, int32_t* id) {
    std::vector<uint64_t> table((size_t)cap);
    std::vector<int32_t> slot_of((size_t)n), slot_id((size_t)cap);
    return number_pairs(keys, n, table.data(), cap - 1, slot_of.data(), slot_id.data(), distinct, id);
}

// keys (u (d+1)(d+2)/2 x 2): the vertex pairs (a <= b) of the simplices of the points idx[0..u).
void sgp_pair_keys(const int32_t* idx, int64_t u, int d, const int32_t* vid, int32_t* keys) {
#pragma omp parallel for schedule(static) if (u * (d + 1) * (d + 2) >= kParallelMin)
    for (int64_t j = 0; j < u; ++j) sgp_pair_keys_simplex(j, idx, vid, d, keys);
}

// acc (P) = B at the P distinct pairs (keys: P x 2): exact from the total = m columns of B if identity, else
// estimated from `total` Rademacher probes; `block` columns at a time (two m x block buffers per thread).
void sgp_pair_gram_f32(const int32_t* keys, int64_t npairs, int d, int32_t m, const int32_t* nbr, int r,
                       const float* coef, int64_t total, int identity, int block, float* acc) {
    pair_gram<float>(keys, npairs, d, m, nbr, r, coef, total, identity, block, acc);
}
void sgp_pair_gram_f64(const int32_t* keys, int64_t npairs, int d, int32_t m, const int32_t* nbr, int r,
                       const double* coef, int64_t total, int identity, int block, double* acc) {
    pair_gram<double>(keys, npairs, d, m, nbr, r, coef, total, identity, block, acc);
}

// gram (n x (d+1) x (d+1)): point i's Gram from the pair values acc of its simplex simplex[i] (pid: the pair ids
// of each distinct simplex's (d+1)(d+2)/2 entries).
void sgp_gram_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid, const float* acc, int d,
                             float* gram) {
    gram_from_pairs<float>(simplex, n, pid, acc, d, gram);
}
void sgp_gram_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid, const double* acc, int d,
                             double* gram) {
    gram_from_pairs<double>(simplex, n, pid, acc, d, gram);
}

// diag (n) = w_i^T G_i w_i for the weights bary (n x (d+1)), from the same pair values.
void sgp_diag_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid, const float* acc,
                             const float* bary, int d, float* diag) {
    diag_from_pairs<float>(simplex, n, pid, acc, bary, d, diag);
}
void sgp_diag_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid, const double* acc,
                             const double* bary, int d, double* diag) {
    diag_from_pairs<double>(simplex, n, pid, acc, bary, d, diag);
}

// out (n x (d+1)) = G_i w_i for the weights bary (n x (d+1)), from the same pair values.
void sgp_gram_times_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid, const float* acc,
                                   const float* bary, int d, float* out) {
    gram_times_from_pairs<float>(simplex, n, pid, acc, bary, d, out);
}
void sgp_gram_times_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid, const double* acc,
                                   const double* bary, int d, double* out) {
    gram_times_from_pairs<double>(simplex, n, pid, acc, bary, d, out);
}

}  // extern "C"
