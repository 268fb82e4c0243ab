// CPU implementation of the cell-step ops: the two gate GEMMs through ATen's BLAS (the fastest
// GEMM on a CPU), then one fused pass for biases, activations and the state update, with the
// per-element math shared with the CUDA kernel (fastseq/rnn_cell_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "fastseq/rnn_cell.h"

namespace fastseq {
namespace {

// Elements per parallel chunk: an LSTM unit is ~40 flops, so 4096 units amortise a task.
constexpr int64_t kGrainSize = 4096;

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_forward_cpu(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    bool save_workspace) {
  CellForwardArgs a =
      prepare_cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace);
  const int64_t B = a.batch, H = a.hidden_size;
  if (B == 0 || H == 0) return {a.hy, a.cy, a.workspace};
  // Biases are added in the epilogue, as the CUDA kernel does, so both run the same math.
  const at::Tensor gates_ih = at::mm(a.input, a.w_ih.t());
  const at::Tensor gates_hh = at::mm(a.hx, a.w_hh.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(),
                                  "rnn_cell_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CellForwardIO<scalar_t> io = forward_io<scalar_t>(a);
    const scalar_t* pre_ih_all = gates_ih.data_ptr<scalar_t>();
    const scalar_t* pre_hh_all = gates_hh.data_ptr<scalar_t>();
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      constexpr int G = CellMath<M>::kGates;
      at::parallel_for(0, B * H, kGrainSize, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t b = unit / H, j = unit % H;
          acc_t pre_ih[G], pre_hh[G];
          for (int g = 0; g < G; ++g) {
            pre_ih[g] = static_cast<acc_t>(pre_ih_all[b * G * H + g * H + j]);
            pre_hh[g] = static_cast<acc_t>(pre_hh_all[b * G * H + g * H + j]);
          }
          cell_forward_epilogue<M, scalar_t, acc_t>(io, b, j, pre_ih, pre_hh);
        }
      });
    });
  });
  return {a.hy, a.cy, a.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_cpu(
    c10::string_view mode, const at::Tensor& grad_hy, const std::optional<at::Tensor>& grad_cy,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& hy,
    const std::optional<at::Tensor>& cy, const at::Tensor& workspace) {
  CellBackwardArgs a = prepare_cell_backward(mode, grad_hy, grad_cy, hx, cx, hy, cy, workspace);
  const int64_t B = a.batch, H = a.hidden_size;
  if (B > 0 && H > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hy.scalar_type(),
                                    "rnn_cell_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const CellBackwardIO<scalar_t> io = backward_io<scalar_t>(a);
      dispatch_cell_mode(a.mode, [&](auto m) {
        constexpr CellMode M = decltype(m)::value;
        at::parallel_for(0, B * H, kGrainSize, [&](int64_t begin, int64_t end) {
          for (int64_t unit = begin; unit < end; ++unit)
            cell_backward_element<M, scalar_t, acc_t>(io, unit / H, unit % H);
        });
      });
    });
  }
  return {a.dgates_ih, a.dgates_hh, a.dh_prev_direct, a.dcx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_cell_forward", &rnn_cell_forward_cpu);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cpu);
}

}  // namespace fastseq
