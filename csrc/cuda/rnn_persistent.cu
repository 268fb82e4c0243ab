// The persistent recurrence on CUDA: one cooperative launch per layer and direction, one CTA
// per SM (256 threads), the CTA's slice of W_hh in shared memory for every step, a grid
// barrier between steps (cooperative_groups: header-only since CUDA 11, no -rdc). The phases
// each CTA runs are fastseq/rnn_persistent.h's, shared with the CPU twin; this file adds the
// tensor-core GEMM (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate), the kernels and launches.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "fastseq/rnn_persistent.h"

namespace fastseq {
namespace {

constexpr int kThreads = kPersistentThreads;

template <typename scalar_t>
struct WmmaElement;
template <>
struct WmmaElement<c10::Half> {
  using type = __half;
};
template <>
struct WmmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// C = A W^T on tensor cores: each warp takes (tile, K split) items; a 16x16 fp32 accumulator
// per item, written to its split's partial sums (the cell update adds the splits).
struct WmmaGemm {
  template <typename scalar_t, typename acc_t>
  __device__ static void run(const scalar_t* A, const scalar_t* W, acc_t* part,
                             const PersistentLayout& L, int64_t, int64_t, int64_t depth,
                             bool accumulate, int tid, int threads) {
    namespace wmma = nvcuda::wmma;
    using T = typename WmmaElement<scalar_t>::type;
    static_assert(std::is_same_v<acc_t, float>, "tensor-core partial sums are fp32");
    const T* a = reinterpret_cast<const T*>(A);
    const T* w = reinterpret_cast<const T*>(W);
    const int lda = static_cast<int>(L.lda), ldw = static_cast<int>(L.ldw);
    const int splits = static_cast<int>(L.splits), col_tiles = static_cast<int>(L.cols / 16);
    const int tiles = static_cast<int>(L.rows / 16) * col_tiles, k_tiles = static_cast<int>(depth / 16);
    const unsigned ldp = static_cast<unsigned>(L.cols);
    // The same (tile, split) items go to the same warp at every chunk, so a warp adds to the
    // partial sums it stored itself.
    for (int item = tid / 32; item < tiles * splits; item += threads / 32) {
      const int tile = item / splits, split = item % splits;
      const int tm = tile / col_tiles, tn = tile % col_tiles;
      float* out = part + (split * L.rows + tm * 16) * L.cols + tn * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, out, ldp, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int kt = split; kt < k_tiles; kt += splits) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B[k][n] = W[n][k]
        wmma::load_matrix_sync(fa, a + tm * 16 * lda + kt * 16, lda);
        wmma::load_matrix_sync(fb, w + tn * 16 * ldw + kt * 16, ldw);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(out, acc, ldp, wmma::mem_row_major);
    }
  }
};

template <typename scalar_t>
using GemmFor = std::conditional_t<std::is_same_v<scalar_t, float>, FmaGemm, WmmaGemm>;

template <CellMode M, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const PersistentForwardParams<scalar_t, float> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const CtaContext cta{blockIdx.x, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), smem};
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  persistent_forward_setup<M>(p, cta);
  for (int64_t step = 0; step < p.T; ++step) {
    persistent_forward_step<M, GemmFor<scalar_t>>(p, cta, step);
    if (step + 1 < p.T) grid.sync();
  }
}

template <CellMode M, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_kernel(const PersistentBackwardParams<scalar_t, float> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const CtaContext cta{blockIdx.x, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), smem};
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  persistent_backward_setup<M>(p, cta);
  for (int64_t step = 0; step < p.io.T; ++step) {
    persistent_backward_step<M, GemmFor<scalar_t>>(p, cta, step);
    grid.sync();
  }
  persistent_backward_finish<M, GemmFor<scalar_t>>(p, cta);
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

PersistentTarget cuda_target(at::ScalarType dtype, c10::DeviceIndex index) {
  const int device = index >= 0 ? index : c10::cuda::current_device();
  return gpu_persistent_target(dtype, device_attribute(cudaDevAttrMultiProcessorCount, device),
                               device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                               device_attribute(cudaDevAttrCooperativeLaunch, device) != 0);
}

// A cooperative launch of `kernel` over the plan's CTAs, all resident at once (the grid
// barrier needs them all; the launch fails rather than deadlock when they cannot be).
template <typename Kernel, typename Params>
void launch_cooperative(Kernel kernel, const Params& params, const PersistentLayout& L) {
  const int smem = static_cast<int>(L.smem_bytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0, device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t resident = static_cast<int64_t>(per_sm) * device_attribute(cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(resident >= L.ctas, "fastseq: the persistent recurrence needs ", L.ctas,
              " resident CTAs of ", smem, " bytes of shared memory; the device holds ", resident);
  Params copy = params;
  void* args[] = {&copy};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                             dim3(static_cast<unsigned>(L.ctas)), dim3(kThreads),
                                             args, static_cast<size_t>(smem),
                                             c10::cuda::getCurrentCUDAStream()));
}

void forward_cuda(const LayerForwardArgs& a, const PersistentLayout& L, const at::Tensor& exchange) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "rnn_persistent_forward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "fastseq: the persistent recurrence has no fp64 kernel");
    } else {
      const auto p = persistent_forward_params<scalar_t, float>(a, L, exchange);
      dispatch_cell_mode(a.mode, [&](auto m) {
        launch_cooperative(persistent_forward_kernel<decltype(m)::value, scalar_t>, p, L);
      });
    }
  });
}

void backward_cuda(const LayerBackwardArgs& a, const PersistentLayout& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "rnn_persistent_backward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "fastseq: the persistent recurrence has no fp64 kernel");
    } else {
      const auto p = persistent_backward_params<scalar_t, float>(a, L);
      dispatch_cell_mode(a.mode, [&](auto m) {
        launch_cooperative(persistent_backward_kernel<decltype(m)::value, scalar_t>, p, L);
      });
    }
  });
}

void run_forward(LayerForwardArgs& a) { rnn_persistent_forward(a, cuda_persistent_device()); }

void run_backward(LayerBackwardArgs& a) { rnn_persistent_backward(a, cuda_persistent_device()); }

}  // namespace

const PersistentDevice& cuda_persistent_device() {
  static const PersistentDevice device{&cuda_target, &forward_cuda, &backward_cuda};
  return device;
}

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("rnn_layer_forward_persistent", &layer_forward_op<&run_forward>);
  m.impl("rnn_layer_backward_persistent", &layer_backward_op<&run_backward>);
}

}  // namespace fastseq
