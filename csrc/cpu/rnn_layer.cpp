// CPU implementation of the sequence ops (the C++ twin of the CUDA ones): the shared host loop
// with a per-step pointwise pass over (row, units), the math of fastseq/rnn_layer.h, in SIMD
// vectors of units (csrc/cpu/vectorized/rnn_layer_pointwise.cpp, per CPU capability).
#include <torch/library.h>

#include "fastseq/cpu_pointwise.h"
#include "fastseq/rnn_layer.h"

namespace fastseq {
namespace {

void forward_step_cpu(const LayerForwardStep& s) {
  if (cpu::cpu_has_avx2()) {
    cpu::AVX2::rnn_layer_forward_step(s);
  } else {
    cpu::DEFAULT::rnn_layer_forward_step(s);
  }
}

void backward_step_cpu(const LayerBackwardStep& s) {
  if (cpu::cpu_has_avx2()) {
    cpu::AVX2::rnn_layer_backward_step(s);
  } else {
    cpu::DEFAULT::rnn_layer_backward_step(s);
  }
}

constexpr LayerStepKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_cpu(
    c10::string_view mode, const at::Tensor& gates_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    bool reverse, bool save_workspace) {
  LayerForwardArgs a = prepare_layer_forward(mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h,
                                             zoneout_c, reverse, save_workspace);
  rnn_layer_forward_loop(a, kCpuKernels);
  return finish_layer_forward(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_cpu(
    c10::string_view mode, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh, const at::Tensor& y,
    const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    bool reverse) {
  LayerBackwardArgs a = prepare_layer_backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y,
                                               workspace, lengths, zoneout_h, zoneout_c, reverse);
  rnn_layer_backward_loop(a, kCpuKernels);
  return finish_layer_backward(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_layer_forward", &rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cpu);
}

}  // namespace fastseq
