// CUDA implementation of the cell-step ops.
//
// Forward: one kernel per step. A block owns TB batch rows x TH hidden units and computes all
// G gates of those units, so the state update needs no second pass: both gate GEMMs
// (x @ W_ih^T and h @ W_hh^T, K-tiled through shared memory, fp32 accumulation), the biases,
// activations and the state update happen in one launch, and the gates reach memory only when
// a backward will need them. Two tile shapes: TB=8 for batches above 4, TB=2 (wider in H) for
// the small batches of autoregressive decoding, where each weight tile then feeds 2 rows
// instead of 8 mostly-idle ones. Tile sizes are first guesses, to be tuned on an H100.
//
// Backward: one elementwise kernel for the gate gradients; the weight/input/state gradients are
// GEMMs over them (cuBLAS, issued by the caller), as cuDNN's RNN backward does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastseq/rnn_cell.h"

namespace fastseq {
namespace {

constexpr int kThreads = 256;

// acc[g] += sum_k A[b, k] * W[g*H + j, k] for this thread's (b, j), with A [B, K] and
// W [G*H, K] row-major. Tiles of A and W pass through shared memory K-slice by K-slice.
template <typename scalar_t, typename acc_t, int G, int TB, int TH, int TK>
__device__ void accumulate_gate_gemm(const scalar_t* __restrict__ A,
                                     const scalar_t* __restrict__ W, int64_t B, int64_t K,
                                     int64_t H, int64_t b0, int64_t j0, acc_t (&a_tile)[TB][TK],
                                     acc_t (&w_tile)[G][TH][TK + 1], acc_t* acc) {
  const int tx = threadIdx.x % TH;
  const int ty = threadIdx.x / TH;
  for (int64_t k0 = 0; k0 < K; k0 += TK) {
    for (int e = threadIdx.x; e < TB * TK; e += kThreads) {
      const int r = e / TK, kk = e % TK;
      const int64_t gb = b0 + r, gk = k0 + kk;
      a_tile[r][kk] = (gb < B && gk < K) ? static_cast<acc_t>(A[gb * K + gk]) : acc_t(0);
    }
    // Consecutive threads read consecutive k of one weight row: coalesced.
    for (int e = threadIdx.x; e < G * TH * TK; e += kThreads) {
      const int g = e / (TH * TK), rem = e % (TH * TK);
      const int r = rem / TK, kk = rem % TK;
      const int64_t gj = j0 + r, gk = k0 + kk;
      w_tile[g][r][kk] =
          (gj < H && gk < K) ? static_cast<acc_t>(W[(g * H + gj) * K + gk]) : acc_t(0);
    }
    __syncthreads();
FASTSEQ_UNROLL
    for (int kk = 0; kk < TK; ++kk) {
      const acc_t a = a_tile[ty][kk];  // broadcast within the row of threads
FASTSEQ_UNROLL
      for (int g = 0; g < G; ++g) acc[g] += a * w_tile[g][tx][kk];  // TK+1 pad: no bank conflict
    }
    __syncthreads();
  }
}

template <typename scalar_t, CellMode M, int TB, int TH, int TK>
__global__ void __launch_bounds__(kThreads)
    rnn_cell_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_ih,
                            const scalar_t* __restrict__ w_hh, CellForwardIO<scalar_t> io,
                            int64_t B, int64_t I) {
  static_assert(TB * TH == kThreads, "one thread per (batch row, hidden unit) of the tile");
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = CellMath<M>::kGates;
  __shared__ acc_t a_tile[TB][TK];
  __shared__ acc_t w_tile[G][TH][TK + 1];
  const int64_t H = io.H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * TH;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * TB;
  acc_t pre_ih[G], pre_hh[G];
FASTSEQ_UNROLL
  for (int g = 0; g < G; ++g) pre_ih[g] = pre_hh[g] = acc_t(0);
  accumulate_gate_gemm<scalar_t, acc_t, G, TB, TH, TK>(x, w_ih, B, I, H, b0, j0, a_tile, w_tile,
                                                       pre_ih);
  accumulate_gate_gemm<scalar_t, acc_t, G, TB, TH, TK>(io.hx, w_hh, B, H, H, b0, j0, a_tile,
                                                       w_tile, pre_hh);
  const int64_t j = j0 + threadIdx.x % TH;
  const int64_t b = b0 + threadIdx.x / TH;
  if (b < B && j < H) cell_forward_epilogue<M, scalar_t, acc_t>(io, b, j, pre_ih, pre_hh);
}

template <typename scalar_t, CellMode M, int TB, int TH, int TK>
void launch_forward(const CellForwardArgs& a, cudaStream_t stream) {
  const dim3 grid((a.hidden_size + TH - 1) / TH, (a.batch + TB - 1) / TB);
  rnn_cell_forward_kernel<scalar_t, M, TB, TH, TK><<<grid, kThreads, 0, stream>>>(
      a.input.data_ptr<scalar_t>(), a.w_ih.data_ptr<scalar_t>(), a.w_hh.data_ptr<scalar_t>(),
      forward_io<scalar_t>(a), a.batch, a.input_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, CellMode M>
__global__ void __launch_bounds__(kThreads)
    rnn_cell_backward_kernel(CellBackwardIO<scalar_t> io, int64_t units) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cell_backward_element<M, scalar_t, acc_t>(io, unit / io.H, unit % io.H);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_forward_cuda(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    bool save_workspace) {
  const c10::cuda::CUDAGuard guard(input.device());
  CellForwardArgs a =
      prepare_cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace);
  if (a.batch == 0 || a.hidden_size == 0) return {a.hy, a.cy, a.workspace};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(),
                                  "rnn_cell_forward_cuda", [&] {
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      if (a.batch > 4) {
        launch_forward<scalar_t, M, 8, 32, 32>(a, stream);
      } else {
        launch_forward<scalar_t, M, 2, 128, 8>(a, stream);
      }
    });
  });
  return {a.hy, a.cy, a.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_cuda(
    c10::string_view mode, const at::Tensor& grad_hy, const std::optional<at::Tensor>& grad_cy,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& hy,
    const std::optional<at::Tensor>& cy, const at::Tensor& workspace) {
  const c10::cuda::CUDAGuard guard(hy.device());
  CellBackwardArgs a = prepare_cell_backward(mode, grad_hy, grad_cy, hx, cx, hy, cy, workspace);
  const int64_t units = a.batch * a.hidden_size;
  if (units > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // Grid-stride loop; 4096 blocks of 256 cover 1M units per pass, plenty for 132 SMs.
    const int blocks = static_cast<int>(std::min<int64_t>((units + kThreads - 1) / kThreads, 4096));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hy.scalar_type(),
                                    "rnn_cell_backward_cuda", [&] {
      dispatch_cell_mode(a.mode, [&](auto m) {
        constexpr CellMode M = decltype(m)::value;
        rnn_cell_backward_kernel<scalar_t, M>
            <<<blocks, kThreads, 0, stream>>>(backward_io<scalar_t>(a), units);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {a.dgates_ih, a.dgates_hh, a.dh_prev_direct, a.dcx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("rnn_cell_forward", &rnn_cell_forward_cuda);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cuda);
}

}  // namespace fastseq
