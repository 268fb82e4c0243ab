// CPU implementation of the sequence ops (the C++ twin of the CUDA ones): the shared host loop
// with a per-step pointwise pass over (row, unit), the math of fastseq/rnn_layer.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastseq/rnn_layer.h"

namespace fastseq {
namespace {

constexpr int64_t kGrainUnits = 2048;  // as the cell step's pointwise pass

void forward_step_cpu(const LayerForwardStep& s) {
  const int64_t B = s.y.size(0), H = s.y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto io = layer_step_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      at::parallel_for(0, B * H, kGrainUnits, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit)
          layer_step_forward_element<M, scalar_t, acc_t>(io, unit / H, unit % H);
      });
    });
  });
}

void backward_step_cpu(const LayerBackwardStep& s) {
  const int64_t B = s.y.size(0), H = s.y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto io = layer_step_backward_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      at::parallel_for(0, B * H, kGrainUnits, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit)
          layer_step_backward_element<M, scalar_t, acc_t>(io, unit / H, unit % H);
      });
    });
  });
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
