#pragma once
// Functions shared by the C++ CPU kernels and the CUDA kernels are written once, as
// host+device inline functions, so CI (no GPU) runs the exact per-element math the GPU runs.
#if defined(__CUDACC__)
#define FASTSEQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSEQ_HOST_DEVICE inline
#endif

// Loop unrolling hint for the small compile-time loops over gates (4 at most); host compilers
// unroll those on their own at -O3.
#if defined(__CUDACC__)
#define FASTSEQ_UNROLL _Pragma("unroll")
#else
#define FASTSEQ_UNROLL
#endif
