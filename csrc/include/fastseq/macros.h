#pragma once
// Functions shared by the C++ CPU kernels and the CUDA kernels are written once, as
// host+device inline functions, so CI (no GPU) runs the exact per-element math the GPU runs.
#if defined(__CUDACC__)
#define FASTSEQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSEQ_HOST_DEVICE inline
#endif
