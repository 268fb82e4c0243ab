// CUDA implementation of the sequence ops' GEMM-per-step loop: the shared host loop issues the
// recurrent GEMM through cuBLAS (at::mm, current stream) and this file's fused pointwise step
// kernel, 2 launches per step. The persistent kernel has its own ops
// (csrc/cuda/rnn_persistent.cu); which of the two runs a call is decided in Python
// (fastseq/ops/native_recurrence.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "fastseq/rnn_layer.h"

namespace fastseq {
namespace {

constexpr int kThreads = 256;

template <CellMode M, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    layer_step_forward_kernel(LayerStepIO<scalar_t, acc_t> io, int64_t units) {
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    layer_step_forward_element<M, scalar_t, acc_t>(io, unit / io.H, unit % io.H);
  }
}

template <CellMode M, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    layer_step_backward_kernel(LayerStepBackwardIO<scalar_t, acc_t> io, int64_t units) {
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    layer_step_backward_element<M, scalar_t, acc_t>(io, unit / io.H, unit % io.H);
  }
}

int grid_for(int64_t units) {
  // Grid-stride: 4096 blocks of 256 cover 1M units a pass, plenty for 132 SMs.
  return static_cast<int>(std::min<int64_t>((units + kThreads - 1) / kThreads, 4096));
}

void forward_step_cuda(const LayerForwardStep& s) {
  const int64_t units = s.y.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto io = layer_step_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      layer_step_forward_kernel<M, scalar_t, acc_t><<<grid_for(units), kThreads, 0, stream>>>(io, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_step_cuda(const LayerBackwardStep& s) {
  const int64_t units = s.y.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto io = layer_step_backward_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      layer_step_backward_kernel<M, scalar_t, acc_t><<<grid_for(units), kThreads, 0, stream>>>(io, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

constexpr LayerStepKernels kCudaKernels{&forward_step_cuda, &backward_step_cuda};

void run_forward(LayerForwardArgs& a) { rnn_layer_forward_loop(a, kCudaKernels); }

void run_backward(LayerBackwardArgs& a) { rnn_layer_backward_loop(a, kCudaKernels); }

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("rnn_layer_forward", &layer_forward_op<&run_forward>);
  m.impl("rnn_layer_backward", &layer_backward_op<&run_backward>);
}

}  // namespace fastseq
