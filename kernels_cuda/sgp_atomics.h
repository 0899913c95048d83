// Portability layer: one spelling of the few atomics the lattice kernels need, for CUDA and the CPU.
//
// CUDA: atomicAdd / atomicCAS.
// CPU (OpenMP build): `#pragma omp atomic` for floating-point adds (GCC's __atomic builtins take
// only integers), __atomic_compare_exchange_n for the hash-table slots, __atomic_fetch_add / load.
#ifndef SGP_ATOMICS_H
#define SGP_ATOMICS_H

#if defined(__CUDACC_RTC__)
// NVRTC (CuPy RawModule) has no C library headers
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define SGP_HD __host__ __device__
#define SGP_DEVICE_CODE 1
#else
#define SGP_HD
#endif

#if defined(__CUDA_ARCH__)

__device__ inline void sgp_atomic_add(float* addr, float val) { atomicAdd(addr, val); }
__device__ inline void sgp_atomic_add(double* addr, double val) {
#if __CUDA_ARCH__ >= 600
    atomicAdd(addr, val);
#else
    unsigned long long* p = reinterpret_cast<unsigned long long*>(addr);
    unsigned long long old = *p, assumed;
    do {
        assumed = old;
        old = atomicCAS(p, assumed, __double_as_longlong(val + __longlong_as_double(assumed)));
    } while (assumed != old);
#endif
}
// returns the value found in *addr before the call (== expected on success)
__device__ inline int32_t sgp_atomic_cas(int32_t* addr, int32_t expected, int32_t desired) {
    return atomicCAS(reinterpret_cast<int*>(addr), expected, desired);
}
__device__ inline int32_t sgp_atomic_inc(int32_t* addr) { return atomicAdd(reinterpret_cast<int*>(addr), 1); }
__device__ inline int32_t sgp_atomic_load(const int32_t* addr) {
    return *reinterpret_cast<const volatile int32_t*>(addr);
}

#else  // CPU

template <typename T>
inline void sgp_atomic_add(T* addr, T val) {
#pragma omp atomic
    *addr += val;
}
inline int32_t sgp_atomic_cas(int32_t* addr, int32_t expected, int32_t desired) {
    __atomic_compare_exchange_n(addr, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;  // on failure, holds the value found
}
inline int32_t sgp_atomic_inc(int32_t* addr) { return __atomic_fetch_add(addr, 1, __ATOMIC_SEQ_CST); }
inline int32_t sgp_atomic_load(const int32_t* addr) { return __atomic_load_n(addr, __ATOMIC_SEQ_CST); }

#endif

#endif  // SGP_ATOMICS_H
