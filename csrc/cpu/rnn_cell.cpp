// CPU implementation of the cell-step ops: the two gate GEMMs through ATen's BLAS (the fastest
// GEMM on a CPU), then one fused SIMD pass for biases, activations and the state update
// (csrc/cpu/vectorized/, built per CPU capability), with the per-unit math shared with the CUDA
// kernel (fastseq/rnn_cell_math.h).
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "fastseq/cpu_pointwise.h"
#include "fastseq/rnn_cell.h"

namespace fastseq {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_forward_cpu(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    bool save_workspace) {
  CellForwardArgs a =
      prepare_cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace);
  if (a.batch == 0 || a.hidden_size == 0) return {a.hy, a.cy, a.workspace};
  // Biases are added in the pointwise pass, as the CUDA kernel does, so both run the same math.
  const at::Tensor gates_ih = at::mm(a.input, a.w_ih.t());
  const at::Tensor gates_hh = at::mm(a.hx, a.w_hh.t());
  if (cpu::cpu_has_avx2()) {
    cpu::AVX2::rnn_cell_forward_pointwise(a, gates_ih, gates_hh);
  } else {
    cpu::DEFAULT::rnn_cell_forward_pointwise(a, gates_ih, gates_hh);
  }
  return {a.hy, a.cy, a.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_cpu(
    c10::string_view mode, const at::Tensor& grad_hy, const std::optional<at::Tensor>& grad_cy,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& hy,
    const std::optional<at::Tensor>& cy, const at::Tensor& workspace) {
  CellBackwardArgs a = prepare_cell_backward(mode, grad_hy, grad_cy, hx, cx, hy, cy, workspace);
  if (a.batch > 0 && a.hidden_size > 0) {
    if (cpu::cpu_has_avx2()) {
      cpu::AVX2::rnn_cell_backward_pointwise(a);
    } else {
      cpu::DEFAULT::rnn_cell_backward_pointwise(a);
    }
  }
  return {a.dgates_ih, a.dgates_hh, a.dh_prev_direct, a.dcx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_cell_forward", &rnn_cell_forward_cpu);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cpu);
}

}  // namespace fastseq
