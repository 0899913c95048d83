// CUDA build of the lattice kernels: thin __global__ launchers over the per-element functions of
// sgp_lattice.h (the same functions the OpenMP loops of sgp_lattice_cpu.cpp run). Kernels are
// extern "C" so CuPy's RawModule (NVRTC) finds them by name; kernels_cuda/gpu.py launches them in
// the same order as the CPU build: embed, clear/insert/number/resolve, neighbours, then per product
// zero + splat + 2(d+1) blurs + slice, and for the calibration pair keys + hash, per block fill + blurs + pair values, then the Grams.
// One thread per element (per vertex and column in the blur); grid-stride loops.
#include "sgp_lattice.h"

#define SGP_LOOP(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                            i += (int64_t)blockDim.x * gridDim.x)

extern "C" {

__global__ void sgp_embed_f32(const float* z, int64_t n, int d, const float* scale, float* bary, int32_t* rank,
                              int32_t* greedy, int32_t* pv_keys) {
    SGP_LOOP(i, n) sgp_embed_point<float>(i, z, d, scale, bary, rank, greedy, pv_keys);
}
__global__ void sgp_embed_f64(const double* z, int64_t n, int d, const double* scale, double* bary,
                              int32_t* rank, int32_t* greedy, int32_t* pv_keys) {
    SGP_LOOP(i, n) sgp_embed_point<double>(i, z, d, scale, bary, rank, greedy, pv_keys);
}

__global__ void sgp_fill_i32(int32_t* a, int64_t n, int32_t value) {
    SGP_LOOP(i, n) a[i] = value;
}

// failed is set to 1 if some key found no slot (impossible at load factor <= 1/2)
__global__ void sgp_insert_all(const int32_t* pv_keys, int64_t n_pv, int d, int32_t* table, int64_t mask,
                               int32_t* rep, int32_t* failed) {
    SGP_LOOP(j, n_pv) {
        rep[j] = sgp_insert((int32_t)j, pv_keys, d, table, mask);
        if (rep[j] < 0) *failed = 1;
    }
}

__global__ void sgp_number_owners(const int32_t* rep, int64_t n_pv, int32_t* owner_vid, int32_t* vertex_owner,
                                  int32_t* counter) {
    SGP_LOOP(j, n_pv) sgp_number_owner((int32_t)j, rep, owner_vid, vertex_owner, counter);
}

__global__ void sgp_resolve_vids(const int32_t* rep, int64_t n_pv, const int32_t* owner_vid, int32_t* vid) {
    SGP_LOOP(j, n_pv) sgp_resolve_vid((int32_t)j, rep, owner_vid, vid);
}

__global__ void sgp_build_neighbours(int32_t m, int d, const int32_t* vertex_owner, const int32_t* pv_keys,
                                     const int32_t* table, int64_t mask, const int32_t* owner_vid, int r,
                                     int32_t* nbr) {
    SGP_LOOP(e, (int64_t)m * (d + 1))
        sgp_neighbours((int32_t)(e / (d + 1)), (int)(e % (d + 1)), vertex_owner, pv_keys, d, table, mask,
                       owner_vid, r, nbr);
}

__global__ void sgp_zero_f32(float* a, int64_t n) { SGP_LOOP(i, n) a[i] = 0.0f; }
__global__ void sgp_zero_f64(double* a, int64_t n) { SGP_LOOP(i, n) a[i] = 0.0; }

__global__ void sgp_splat_f32(const float* v, int64_t n, int nc, int d, const int32_t* vid, const float* bary,
                              float* vals) {
    SGP_LOOP(i, n) sgp_splat_point<float>(i, v, nc, d, vid, bary, vals);
}
__global__ void sgp_splat_f64(const double* v, int64_t n, int nc, int d, const int32_t* vid, const double* bary,
                              double* vals) {
    SGP_LOOP(i, n) sgp_splat_point<double>(i, v, nc, d, vid, bary, vals);
}

__global__ void sgp_blur_f32(int32_t m, int axis, const float* in, float* out, int nc, int d, const int32_t* nbr,
                             int r, const float* coef) {
    SGP_LOOP(i, (int64_t)m * nc) sgp_blur_vertex<float>((int32_t)(i / nc), axis, in, out, nc, d, nbr, r, coef,
                                                         (int)(i % nc), (int)(i % nc) + 1);
}
__global__ void sgp_blur_f64(int32_t m, int axis, const double* in, double* out, int nc, int d,
                             const int32_t* nbr, int r, const double* coef) {
    SGP_LOOP(i, (int64_t)m * nc) sgp_blur_vertex<double>((int32_t)(i / nc), axis, in, out, nc, d, nbr, r, coef,
                                                          (int)(i % nc), (int)(i % nc) + 1);
}

__global__ void sgp_slice_f32(const float* vals, float* out, int64_t n, int nc, int d, const int32_t* vid,
                              const float* bary) {
    SGP_LOOP(i, n) sgp_slice_point<float>(i, vals, out, nc, d, vid, bary);
}
__global__ void sgp_slice_f64(const double* vals, double* out, int64_t n, int nc, int d, const int32_t* vid,
                              const double* bary) {
    SGP_LOOP(i, n) sgp_slice_point<double>(i, vals, out, nc, d, vid, bary);
}

// Diagonal calibration (see sgp_lattice.h): the distinct simplices and then the keys of their vertex pairs, each
// hashed and numbered by sgp_insert_all / sgp_number_owners / sgp_resolve_vids (key lengths d+1 and 2); per block of nc
// columns (m x nc) fill, blur (2(d+1) passes for exact columns of B, d+1 along axes d..0 for Rademacher probes)
// and extract or accumulate the value of every distinct pair (one thread per pair: no atomics); finally every
// point's diagonal (or Gram) from its simplex's pairs.
__global__ void sgp_pair_keys(const int32_t* idx, int64_t u, const int32_t* vid, int d, int32_t* keys) {
    SGP_LOOP(j, u) sgp_pair_keys_simplex(j, idx, vid, d, keys);
}
__global__ void sgp_probe_fill_f32(int32_t m, int64_t col0, int nc, int identity, float* out) {
    SGP_LOOP(v, m) sgp_probe_fill_vertex<float>((int32_t)v, col0, nc, identity, out);
}
__global__ void sgp_probe_fill_f64(int32_t m, int64_t col0, int nc, int identity, double* out) {
    SGP_LOOP(v, m) sgp_probe_fill_vertex<double>((int32_t)v, col0, nc, identity, out);
}
__global__ void sgp_pair_dot_f32(int64_t npairs, const int32_t* keys, const float* z, int nc, float scale,
                                 float* acc) {
    SGP_LOOP(p, npairs) sgp_pair_dot<float>(p, keys, z, nc, scale, acc);
}
__global__ void sgp_pair_dot_f64(int64_t npairs, const int32_t* keys, const double* z, int nc, double scale,
                                 double* acc) {
    SGP_LOOP(p, npairs) sgp_pair_dot<double>(p, keys, z, nc, scale, acc);
}
__global__ void sgp_pair_extract_f32(int64_t npairs, const int32_t* keys, const float* bcols, int64_t col0, int nc,
                                     float* acc) {
    SGP_LOOP(p, npairs) sgp_pair_extract<float>(p, keys, bcols, col0, nc, acc);
}
__global__ void sgp_pair_extract_f64(int64_t npairs, const int32_t* keys, const double* bcols, int64_t col0, int nc,
                                     double* acc) {
    SGP_LOOP(p, npairs) sgp_pair_extract<double>(p, keys, bcols, col0, nc, acc);
}
__global__ void sgp_gram_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid, const float* acc, int d,
                                        float* gram) {
    SGP_LOOP(i, n) sgp_gram_from_pairs_point<float>(i, simplex, pid, acc, d, gram);
}
__global__ void sgp_gram_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid, const double* acc,
                                        int d, double* gram) {
    SGP_LOOP(i, n) sgp_gram_from_pairs_point<double>(i, simplex, pid, acc, d, gram);
}

__global__ void sgp_diag_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid, const float* acc,
                                        const float* bary, int d, float* diag) {
    SGP_LOOP(i, n) sgp_diag_from_pairs_point<float>(i, simplex, pid, acc, bary, d, diag);
}
__global__ void sgp_diag_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid, const double* acc,
                                        const double* bary, int d, double* diag) {
    SGP_LOOP(i, n) sgp_diag_from_pairs_point<double>(i, simplex, pid, acc, bary, d, diag);
}

__global__ void sgp_gram_times_from_pairs_f32(const int32_t* simplex, int64_t n, const int32_t* pid,
                                              const float* acc, const float* bary, int d, float* out) {
    SGP_LOOP(i, n) sgp_gram_times_from_pairs_point<float>(i, simplex, pid, acc, bary, d, out);
}
__global__ void sgp_gram_times_from_pairs_f64(const int32_t* simplex, int64_t n, const int32_t* pid,
                                              const double* acc, const double* bary, int d, double* out) {
    SGP_LOOP(i, n) sgp_gram_times_from_pairs_point<double>(i, simplex, pid, acc, bary, d, out);
}

}  // extern "C"
