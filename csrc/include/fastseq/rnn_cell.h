#pragma once
// Host-side pieces of the recurrent cell-step ops shared by the CPU and CUDA implementations:
// argument checks, output allocation and the compile-time dispatch on the cell mode.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <type_traits>

#include "fastseq/cell_mode.h"
#include "fastseq/rnn_cell_math.h"

namespace fastseq {

CellMode parse_cell_mode(c10::string_view mode);
// t has like's dtype and device and the given shape, else a clear error naming both tensors.
void check_tensor_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name, at::IntArrayRef shape);
// An output tensor; NaN-filled when FASTSEQ_POISON_OUTPUTS=1 (tests), so unwritten elements show.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options);
int cell_gates(CellMode mode);
int cell_workspace(CellMode mode);

template <typename F>
void dispatch_cell_mode(CellMode mode, F&& f) {
  switch (mode) {
    case CellMode::kLSTM: f(std::integral_constant<CellMode, CellMode::kLSTM>{}); break;
    case CellMode::kGRU: f(std::integral_constant<CellMode, CellMode::kGRU>{}); break;
    case CellMode::kRNNTanh: f(std::integral_constant<CellMode, CellMode::kRNNTanh>{}); break;
    case CellMode::kRNNRelu: f(std::integral_constant<CellMode, CellMode::kRNNRelu>{}); break;
  }
}

// Checked, contiguous arguments of rnn_cell_forward, and its allocated outputs.
struct CellForwardArgs {
  CellMode mode;
  int64_t batch, input_size, hidden_size;
  at::Tensor input, hx, cx, w_ih, w_hh, b_ih, b_hh;  // cx, b_ih, b_hh undefined when absent
  at::Tensor hy, cy, workspace;                      // cy/workspace empty when not produced
};
CellForwardArgs prepare_cell_forward(c10::string_view mode, const at::Tensor& input,
                                     const at::Tensor& hx, const std::optional<at::Tensor>& cx,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh, bool save_workspace);

struct CellBackwardArgs {
  CellMode mode;
  int64_t batch, hidden_size;
  at::Tensor grad_hy, grad_cy, hx, cx, hy, cy, workspace;  // grad_cy/cx/cy undefined when absent
  at::Tensor dgates_ih, dgates_hh, dh_prev_direct, dcx;    // empty when the mode has none
};
CellBackwardArgs prepare_cell_backward(c10::string_view mode, const at::Tensor& grad_hy,
                                       const std::optional<at::Tensor>& grad_cy,
                                       const at::Tensor& hx, const std::optional<at::Tensor>& cx,
                                       const at::Tensor& hy, const std::optional<at::Tensor>& cy,
                                       const at::Tensor& workspace);

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename scalar_t>
CellForwardIO<scalar_t> forward_io(const CellForwardArgs& a) {
  return {data_or_null<scalar_t>(a.b_ih), data_or_null<scalar_t>(a.b_hh),
          a.hx.data_ptr<scalar_t>(),      data_or_null<scalar_t>(a.cx),
          a.hy.data_ptr<scalar_t>(),      data_or_null<scalar_t>(a.cy),
          data_or_null<scalar_t>(a.workspace), a.hidden_size};
}

template <typename scalar_t>
CellBackwardIO<scalar_t> backward_io(const CellBackwardArgs& a) {
  return {a.grad_hy.data_ptr<scalar_t>(), data_or_null<scalar_t>(a.grad_cy),
          a.hx.data_ptr<scalar_t>(),      data_or_null<scalar_t>(a.cx),
          a.hy.data_ptr<scalar_t>(),      data_or_null<scalar_t>(a.cy),
          data_or_null<scalar_t>(a.workspace),
          a.dgates_ih.data_ptr<scalar_t>(), data_or_null<scalar_t>(a.dgates_hh),
          data_or_null<scalar_t>(a.dh_prev_direct), data_or_null<scalar_t>(a.dcx),
          a.hidden_size};
}

}  // namespace fastseq
