// Argument checks and output allocation of the cell-step ops, shared by every device's kernel.
// The Python layer validates first with friendlier messages; these checks keep a direct
// torch.ops.fastseq call from ever reaching a kernel with bad arguments.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "fastseq/rnn_cell.h"

namespace fastseq {

// Tests set FASTSEQ_POISON_OUTPUTS=1 so that an element a kernel forgets to write reads NaN.
static bool poison_outputs() {
  static const bool poison = [] {
    const char* value = std::getenv("FASTSEQ_POISON_OUTPUTS");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return poison;
}

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (poison_outputs()) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(shape, options);
}

CellMode parse_cell_mode(c10::string_view mode) {
  if (mode == "lstm") return CellMode::kLSTM;
  if (mode == "gru") return CellMode::kGRU;
  if (mode == "rnn_tanh") return CellMode::kRNNTanh;
  if (mode == "rnn_relu") return CellMode::kRNNRelu;
  TORCH_CHECK(false, "fastseq: mode must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', got '",
              std::string(mode), "'");
}

int cell_gates(CellMode mode) {
  int gates = 0;
  dispatch_cell_mode(mode, [&](auto m) { gates = CellMath<decltype(m)::value>::kGates; });
  return gates;
}

int cell_workspace(CellMode mode) {
  int columns = 0;
  dispatch_cell_mode(mode, [&](auto m) { columns = CellMath<decltype(m)::value>::kWorkspace; });
  return columns;
}

void check_tensor_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastseq: ", name, " must have dtype ",
              like.scalar_type(), " (the dtype of ", like_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastseq: ", name, " must be on ", like.device(),
              " (the device of ", like_name, "), got ", t.device());
  TORCH_CHECK(t.sizes() == shape, "fastseq: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

namespace {

at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace

CellForwardArgs prepare_cell_forward(c10::string_view mode, const at::Tensor& input,
                                     const at::Tensor& hx, const std::optional<at::Tensor>& cx,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh, bool save_workspace) {
  CellForwardArgs a;
  a.mode = parse_cell_mode(mode);
  const int64_t G = cell_gates(a.mode);
  TORCH_CHECK(input.dim() == 2, "fastseq: input must be 2-D [batch, input_size], got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fastseq: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(hx.dim() == 2, "fastseq: hx must be 2-D [batch, hidden_size], got shape ",
              hx.sizes());
  a.batch = input.size(0);
  a.input_size = input.size(1);
  a.hidden_size = hx.size(1);
  const int64_t B = a.batch, I = a.input_size, H = a.hidden_size;
  check_tensor_like(hx, "hx", input, "input", {B, H});
  check_tensor_like(w_ih, "w_ih", input, "input", {G * H, I});
  check_tensor_like(w_hh, "w_hh", input, "input", {G * H, H});
  a.input = input.contiguous();
  a.hx = hx.contiguous();
  a.w_ih = w_ih.contiguous();
  a.w_hh = w_hh.contiguous();
  a.b_ih = optional_contiguous(b_ih);
  a.b_hh = optional_contiguous(b_hh);
  if (a.b_ih.defined()) check_tensor_like(a.b_ih, "b_ih", input, "input", {G * H});
  if (a.b_hh.defined()) check_tensor_like(a.b_hh, "b_hh", input, "input", {G * H});
  a.cx = optional_contiguous(cx);
  if (a.mode == CellMode::kLSTM) {
    TORCH_CHECK(a.cx.defined(), "fastseq: the lstm cell needs cx");
    check_tensor_like(a.cx, "cx", input, "input", {B, H});
  } else {
    TORCH_CHECK(!a.cx.defined(), "fastseq: cx is only for the lstm cell");
  }
  const auto options = input.options();
  a.hy = new_output({B, H}, options);
  a.cy = new_output({a.mode == CellMode::kLSTM ? B : 0, H}, options);
  const int64_t ws_columns = save_workspace ? cell_workspace(a.mode) * H : 0;
  a.workspace = new_output({ws_columns > 0 ? B : 0, ws_columns}, options);
  return a;
}

CellBackwardArgs prepare_cell_backward(c10::string_view mode, const at::Tensor& grad_hy,
                                       const std::optional<at::Tensor>& grad_cy,
                                       const at::Tensor& hx, const std::optional<at::Tensor>& cx,
                                       const at::Tensor& hy, const std::optional<at::Tensor>& cy,
                                       const at::Tensor& workspace) {
  CellBackwardArgs a;
  a.mode = parse_cell_mode(mode);
  const int64_t G = cell_gates(a.mode);
  TORCH_CHECK(hy.dim() == 2, "fastseq: hy must be 2-D [batch, hidden_size], got shape ",
              hy.sizes());
  a.batch = hy.size(0);
  a.hidden_size = hy.size(1);
  const int64_t B = a.batch, H = a.hidden_size;
  check_tensor_like(grad_hy, "grad_hy", hy, "hy", {B, H});
  check_tensor_like(hx, "hx", hy, "hy", {B, H});
  const int64_t ws_columns = cell_workspace(a.mode) * H;
  // An empty batch has an empty workspace however the forward ran (nothing to differentiate).
  const bool needs_workspace = ws_columns > 0 && B > 0;
  TORCH_CHECK(!needs_workspace || workspace.numel() > 0,
              "fastseq: the workspace is empty: the forward ran with save_workspace=False, so "
              "it cannot be differentiated");
  if (needs_workspace) check_tensor_like(workspace, "workspace", hy, "hy", {B, ws_columns});
  a.grad_hy = grad_hy.contiguous();
  a.hx = hx.contiguous();
  a.hy = hy.contiguous();
  a.workspace = workspace.contiguous();
  a.grad_cy = optional_contiguous(grad_cy);
  a.cx = optional_contiguous(cx);
  a.cy = optional_contiguous(cy);
  const bool lstm = a.mode == CellMode::kLSTM;
  if (lstm) {
    TORCH_CHECK(a.cx.defined() && a.cy.defined(), "fastseq: the lstm backward needs cx and cy");
    check_tensor_like(a.cx, "cx", hy, "hy", {B, H});
    check_tensor_like(a.cy, "cy", hy, "hy", {B, H});
    if (a.grad_cy.defined()) check_tensor_like(a.grad_cy, "grad_cy", hy, "hy", {B, H});
  } else {
    // Non-LSTM cells have no cell state; ignore whatever empty tensors the caller passed.
    a.grad_cy = a.cx = a.cy = at::Tensor();
  }
  const bool gru = a.mode == CellMode::kGRU;
  const auto options = hy.options();
  a.dgates_ih = new_output({B, G * H}, options);
  a.dgates_hh = new_output({gru ? B : 0, G * H}, options);
  a.dh_prev_direct = new_output({gru ? B : 0, H}, options);
  a.dcx = new_output({lstm ? B : 0, H}, options);
  return a;
}

}  // namespace fastseq
