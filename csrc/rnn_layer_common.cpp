// The native sequence ops' argument checks and set-up (shared with the persistent kernel's
// host side), and their GEMM-per-step host loop over time, shared by every device: per step,
// the recurrent GEMM through ATen (cuBLAS on GPUs, MKL on CPUs) and the device's fused
// pointwise step kernel. On GPUs the persistent kernel (csrc/cuda/rnn_persistent.cu) replaces
// this loop where W_hh fits on chip.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <string>

#include "fastseq/rnn_layer.h"

namespace fastseq {

at::ScalarType layer_accumulator_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// A fresh, contiguous copy the loop updates in place. Tensor::to(copy=true) alone keeps the
// source's strides (MemoryFormat::Preserve): a transposed c0 came back transposed and the
// kernels, which index rows as contiguous, read it scrambled.
at::Tensor contiguous_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return t.to(options, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& like,
                           int64_t batch) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  TORCH_CHECK(lengths->scalar_type() == at::kInt, "fastseq: lengths must be int32, got ",
              lengths->scalar_type());
  TORCH_CHECK(lengths->device() == like.device(), "fastseq: lengths must be on ", like.device(),
              ", got ", lengths->device());
  TORCH_CHECK(lengths->sizes() == at::IntArrayRef({batch}), "fastseq: lengths must have shape [",
              batch, "], got ", lengths->sizes());
  return lengths->contiguous();
}

// A zoneout mask: like `like` (dtype, device), [T, B, H], contiguous; LSTM h and c, GRU h only.
at::Tensor checked_zoneout(const std::optional<at::Tensor>& mask, const char* name, CellMode mode,
                           bool is_c, const at::Tensor& like, int64_t T, int64_t B, int64_t H) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mode == CellMode::kLSTM || (mode == CellMode::kGRU && !is_c), "fastseq: ", name,
              " is for ", is_c ? "the LSTM only" : "the LSTM and the GRU only");
  check_tensor_like(*mask, name, like, like.dim() == 3 && like.size(2) == H ? "y" : "gates_x",
                    {T, B, H});
  return mask->contiguous();
}

int layer_workspace_columns(CellMode mode) {
  return mode == CellMode::kLSTM ? 5 : cell_workspace(mode);
}

}  // namespace

LayerForwardArgs prepare_layer_forward(c10::string_view mode_name, const at::Tensor& gates_x_in,
                                       const at::Tensor& h0_in,
                                       const std::optional<at::Tensor>& c0_in,
                                       const at::Tensor& w_hh_in,
                                       const std::optional<at::Tensor>& b_hh_in,
                                       const std::optional<at::Tensor>& lengths_in,
                                       const std::optional<at::Tensor>& zoneout_h,
                                       const std::optional<at::Tensor>& zoneout_c, bool reverse,
                                       bool save_workspace) {
  LayerForwardArgs a;
  a.mode = parse_cell_mode(mode_name);
  a.reverse = reverse;
  const bool lstm = a.mode == CellMode::kLSTM;
  TORCH_CHECK(gates_x_in.dim() == 3, "fastseq: gates_x must be 3-D [T, B, G*H], got shape ",
              gates_x_in.sizes());
  TORCH_CHECK(h0_in.dim() == 2, "fastseq: h0 must be 2-D [B, H], got shape ", h0_in.sizes());
  a.T = gates_x_in.size(0);
  a.B = gates_x_in.size(1);
  a.H = h0_in.size(1);
  const int64_t G = cell_gates(a.mode);
  check_tensor_like(gates_x_in, "gates_x", gates_x_in, "gates_x", {a.T, a.B, G * a.H});
  check_tensor_like(h0_in, "h0", gates_x_in, "gates_x", {a.B, a.H});
  check_tensor_like(w_hh_in, "w_hh", gates_x_in, "gates_x", {G * a.H, a.H});
  a.gates_x = gates_x_in.contiguous();
  a.w_hh = w_hh_in.contiguous();
  if (b_hh_in.has_value() && b_hh_in->defined()) {
    check_tensor_like(*b_hh_in, "b_hh", a.gates_x, "gates_x", {G * a.H});
    a.b_hh = b_hh_in->contiguous();
  }
  a.lengths = checked_lengths(lengths_in, a.gates_x, a.B);
  a.zoneout_h = checked_zoneout(zoneout_h, "zoneout_h", a.mode, false, a.gates_x, a.T, a.B, a.H);
  a.zoneout_c = checked_zoneout(zoneout_c, "zoneout_c", a.mode, true, a.gates_x, a.T, a.B, a.H);
  const auto options = a.gates_x.options();
  const auto acc_options = options.dtype(layer_accumulator_type(a.gates_x.scalar_type()));
  a.h = contiguous_copy(h0_in, acc_options);
  if (lstm) {
    TORCH_CHECK(c0_in.has_value() && c0_in->defined(), "fastseq: the lstm needs c0");
    check_tensor_like(*c0_in, "c0", a.gates_x, "gates_x", {a.B, a.H});
    a.c = contiguous_copy(*c0_in, acc_options);
  }
  const int64_t ws_columns = save_workspace ? layer_workspace_columns(a.mode) * a.H : 0;
  a.y = new_output({a.T, a.B, a.H}, options);
  a.ws = new_output({ws_columns > 0 ? a.T : 0, a.B, ws_columns}, options);
  if ((a.B == 0 || a.H == 0) && a.T > 0) {  // nothing runs; outputs of zero width or rows
    a.y.zero_();
    a.ws.zero_();
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_layer_forward(
    const LayerForwardArgs& a) {
  const auto dtype = a.gates_x.scalar_type();
  at::Tensor h_n = a.h.to(dtype);
  at::Tensor c_n = a.c.defined() ? a.c.to(dtype) : at::empty({0, a.H}, a.gates_x.options());
  return {a.y, h_n, c_n, a.ws};
}

LayerBackwardArgs prepare_layer_backward(c10::string_view mode_name, const at::Tensor& grad_y_in,
                                         const at::Tensor& grad_h_n,
                                         const std::optional<at::Tensor>& grad_c_n,
                                         const at::Tensor& h0_in,
                                         const std::optional<at::Tensor>& c0_in,
                                         const at::Tensor& w_hh_in, const at::Tensor& y_in,
                                         const at::Tensor& workspace_in,
                                         const std::optional<at::Tensor>& lengths_in,
                                         const std::optional<at::Tensor>& zoneout_h,
                                         const std::optional<at::Tensor>& zoneout_c,
                                         bool reverse) {
  LayerBackwardArgs a;
  a.mode = parse_cell_mode(mode_name);
  a.reverse = reverse;
  const bool lstm = a.mode == CellMode::kLSTM, gru = a.mode == CellMode::kGRU;
  TORCH_CHECK(y_in.dim() == 3, "fastseq: y must be 3-D [T, B, H], got shape ", y_in.sizes());
  a.T = y_in.size(0);
  a.B = y_in.size(1);
  a.H = y_in.size(2);
  const int64_t T = a.T, B = a.B, H = a.H;
  const int64_t G = cell_gates(a.mode), WS = layer_workspace_columns(a.mode);
  check_tensor_like(grad_y_in, "grad_y", y_in, "y", {T, B, H});
  check_tensor_like(grad_h_n, "grad_h_n", y_in, "y", {B, H});
  check_tensor_like(h0_in, "h0", y_in, "y", {B, H});
  check_tensor_like(w_hh_in, "w_hh", y_in, "y", {G * H, H});
  // No step or no row: an empty workspace however the forward ran (nothing to differentiate).
  const bool needs_workspace = WS > 0 && T > 0 && B > 0;
  TORCH_CHECK(!needs_workspace || workspace_in.numel() > 0,
              "fastseq: the workspace is empty: the forward ran with save_workspace=False, so "
              "it cannot be differentiated");
  if (needs_workspace) check_tensor_like(workspace_in, "workspace", y_in, "y", {T, B, WS * H});
  a.grad_y = grad_y_in.contiguous();
  a.y = y_in.contiguous();
  a.h0 = h0_in.contiguous();
  a.w_hh = w_hh_in.contiguous();
  a.ws = workspace_in.contiguous();
  a.lengths = checked_lengths(lengths_in, a.y, B);
  a.zoneout_h = checked_zoneout(zoneout_h, "zoneout_h", a.mode, false, a.y, T, B, H);
  a.zoneout_c = checked_zoneout(zoneout_c, "zoneout_c", a.mode, true, a.y, T, B, H);
  const auto options = a.y.options();
  const auto acc_options = options.dtype(layer_accumulator_type(a.y.scalar_type()));
  a.dh = contiguous_copy(grad_h_n, acc_options);
  if (lstm) {
    TORCH_CHECK(c0_in.has_value() && c0_in->defined(), "fastseq: the lstm backward needs c0");
    check_tensor_like(*c0_in, "c0", a.y, "y", {B, H});
    a.c0 = c0_in->contiguous();
    if (grad_c_n.has_value() && grad_c_n->defined()) {
      check_tensor_like(*grad_c_n, "grad_c_n", a.y, "y", {B, H});
      a.dc = contiguous_copy(*grad_c_n, acc_options);
    } else {
      a.dc = at::zeros({B, H}, acc_options);
    }
  }
  a.dgx = new_output({T, B, G * H}, options);
  a.dgh = new_output({gru ? T : 0, B, G * H}, options);
  if ((B == 0 || H == 0) && T > 0) {
    a.dgx.zero_();
    a.dgh.zero_();
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_layer_backward(
    const LayerBackwardArgs& a) {
  const auto dtype = a.y.scalar_type();
  at::Tensor dh0 = a.dh.to(dtype);
  at::Tensor dc0 = a.dc.defined() ? a.dc.to(dtype) : at::empty({0, a.H}, a.y.options());
  return {a.dgx, a.dgh, dh0, dc0};
}

void rnn_layer_forward_loop(LayerForwardArgs& a, const LayerStepKernels& kernels) {
  const bool reverse = a.reverse;
  if (a.B > 0 && a.H > 0) {
    const bool saves = a.ws.numel() > 0;
    for (int64_t step = 0; step < a.T; ++step) {
      const int64_t t = reverse ? a.T - 1 - step : step;
      LayerForwardStep s;
      s.mode = a.mode;
      s.gates_x = a.gates_x[t];
      s.gates_h = at::mm(a.h.to(a.gates_x.scalar_type()), a.w_hh.t());
      s.b_hh = a.b_hh;
      s.h = a.h;
      s.c = a.c;
      s.y = a.y[t];
      s.ws = saves ? a.ws[t] : at::Tensor();
      s.lengths = a.lengths;
      if (a.zoneout_h.defined()) s.zoneout_h = a.zoneout_h[t];
      if (a.zoneout_c.defined()) s.zoneout_c = a.zoneout_c[t];
      s.t = t;
      kernels.forward(s);
    }
  }
}

void rnn_layer_backward_loop(LayerBackwardArgs& a, const LayerStepKernels& kernels) {
  const bool reverse = a.reverse;
  const bool gru = a.mode == CellMode::kGRU, saves = a.ws.numel() > 0;
  if (a.B > 0 && a.H > 0) {
    for (int64_t step = 0; step < a.T; ++step) {
      const int64_t t = reverse ? step : a.T - 1 - step;  // the forward's steps, backwards
      const int64_t t_prev = previous_step(t, a.T, reverse);
      LayerBackwardStep s;
      s.mode = a.mode;
      s.grad_y = a.grad_y[t];
      s.dh = a.dh;
      s.dc = a.dc;
      s.y = a.y[t];
      s.y_prev = a.y[t_prev];
      s.h0 = a.h0;
      s.ws = saves ? a.ws[t] : at::Tensor();
      s.ws_prev = saves ? a.ws[t_prev] : at::Tensor();
      s.c0 = a.c0;
      s.dgx = a.dgx[t];
      s.dgh = gru ? a.dgh[t] : at::Tensor();
      s.lengths = a.lengths;
      if (a.zoneout_h.defined()) s.zoneout_h = a.zoneout_h[t];
      if (a.zoneout_c.defined()) s.zoneout_c = a.zoneout_c[t];
      s.t = t;
      s.T = a.T;
      s.reverse = reverse;
      kernels.backward(s);
      // dL/dh_{t-1} += dgates_rec(t) @ W_hh (zero rows for finished sequences).
      a.dh.add_(at::mm(gru ? a.dgh[t] : a.dgx[t], a.w_hh));
    }
  }
}

}  // namespace fastseq
