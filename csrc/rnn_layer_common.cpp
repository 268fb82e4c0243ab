// The native sequence ops' host loops over time, shared by every device: per step, the
// recurrent GEMM through ATen (cuBLAS on GPUs, MKL on CPUs) and the device's fused pointwise
// step kernel. This is the GEMM-per-step path; a persistent kernel (weights on chip across
// steps) is meant to replace the loop on GPUs where W_hh fits on chip.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <string>

#include "fastseq/rnn_layer.h"

namespace fastseq {
namespace {

at::ScalarType accumulator_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
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

int layer_workspace_columns(CellMode mode) {
  return mode == CellMode::kLSTM ? 5 : cell_workspace(mode);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_loop(
    c10::string_view mode_name, const at::Tensor& gates_x_in, const at::Tensor& h0_in,
    const std::optional<at::Tensor>& c0_in, const at::Tensor& w_hh_in,
    const std::optional<at::Tensor>& b_hh_in, const std::optional<at::Tensor>& lengths_in,
    bool reverse, bool save_workspace, const LayerStepKernels& kernels) {
  const CellMode mode = parse_cell_mode(mode_name);
  const bool lstm = mode == CellMode::kLSTM;
  TORCH_CHECK(gates_x_in.dim() == 3, "fastseq: gates_x must be 3-D [T, B, G*H], got shape ",
              gates_x_in.sizes());
  TORCH_CHECK(h0_in.dim() == 2, "fastseq: h0 must be 2-D [B, H], got shape ", h0_in.sizes());
  const int64_t T = gates_x_in.size(0), B = gates_x_in.size(1), H = h0_in.size(1);
  const int64_t G = cell_gates(mode);
  check_tensor_like(gates_x_in, "gates_x", gates_x_in, "gates_x", {T, B, G * H});
  check_tensor_like(h0_in, "h0", gates_x_in, "gates_x", {B, H});
  check_tensor_like(w_hh_in, "w_hh", gates_x_in, "gates_x", {G * H, H});
  const at::Tensor gates_x = gates_x_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor b_hh;
  if (b_hh_in.has_value() && b_hh_in->defined()) {
    check_tensor_like(*b_hh_in, "b_hh", gates_x, "gates_x", {G * H});
    b_hh = b_hh_in->contiguous();
  }
  const at::Tensor lengths = checked_lengths(lengths_in, gates_x, B);
  const auto options = gates_x.options();
  const auto acc_options = options.dtype(accumulator_type(gates_x.scalar_type()));
  at::Tensor h = h0_in.to(acc_options, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor c;
  if (lstm) {
    TORCH_CHECK(c0_in.has_value() && c0_in->defined(), "fastseq: the lstm needs c0");
    check_tensor_like(*c0_in, "c0", gates_x, "gates_x", {B, H});
    c = c0_in->to(acc_options, false, true);
  }
  const int64_t ws_columns = save_workspace ? layer_workspace_columns(mode) * H : 0;
  at::Tensor y = new_output({T, B, H}, options);
  at::Tensor ws = new_output({ws_columns > 0 ? T : 0, B, ws_columns}, options);
  if (B > 0 && H > 0) {
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      LayerForwardStep s;
      s.mode = mode;
      s.gates_x = gates_x[t];
      s.gates_h = at::mm(h.to(gates_x.scalar_type()), w_hh.t());
      s.b_hh = b_hh;
      s.h = h;
      s.c = c;
      s.y = y[t];
      s.ws = ws_columns > 0 ? ws[t] : at::Tensor();
      s.lengths = lengths;
      s.t = t;
      kernels.forward(s);
    }
  } else if (T > 0) {
    y.zero_();
    ws.zero_();
  }
  at::Tensor h_n = h.to(gates_x.scalar_type());
  at::Tensor c_n = lstm ? c.to(gates_x.scalar_type()) : at::empty({0, H}, options);
  return {y, h_n, c_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_loop(
    c10::string_view mode_name, const at::Tensor& grad_y_in, const at::Tensor& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0_in,
    const std::optional<at::Tensor>& c0_in, const at::Tensor& w_hh_in, const at::Tensor& y_in,
    const at::Tensor& workspace_in, const std::optional<at::Tensor>& lengths_in, bool reverse,
    const LayerStepKernels& kernels) {
  const CellMode mode = parse_cell_mode(mode_name);
  const bool lstm = mode == CellMode::kLSTM, gru = mode == CellMode::kGRU;
  TORCH_CHECK(y_in.dim() == 3, "fastseq: y must be 3-D [T, B, H], got shape ", y_in.sizes());
  const int64_t T = y_in.size(0), B = y_in.size(1), H = y_in.size(2);
  const int64_t G = cell_gates(mode), WS = layer_workspace_columns(mode);
  check_tensor_like(grad_y_in, "grad_y", y_in, "y", {T, B, H});
  check_tensor_like(grad_h_n, "grad_h_n", y_in, "y", {B, H});
  check_tensor_like(h0_in, "h0", y_in, "y", {B, H});
  check_tensor_like(w_hh_in, "w_hh", y_in, "y", {G * H, H});
  TORCH_CHECK(WS == 0 || T == 0 || workspace_in.numel() > 0,
              "fastseq: the workspace is empty: the forward ran with save_workspace=False, so "
              "it cannot be differentiated");
  if (WS > 0 && T > 0) check_tensor_like(workspace_in, "workspace", y_in, "y", {T, B, WS * H});
  const at::Tensor grad_y = grad_y_in.contiguous(), y = y_in.contiguous();
  const at::Tensor h0 = h0_in.contiguous(), w_hh = w_hh_in.contiguous();
  const at::Tensor ws = workspace_in.contiguous();
  const at::Tensor lengths = checked_lengths(lengths_in, y, B);
  const auto options = y.options();
  const auto acc_options = options.dtype(accumulator_type(y.scalar_type()));
  at::Tensor dh = grad_h_n.to(acc_options, false, true);
  at::Tensor dc, c0;
  if (lstm) {
    TORCH_CHECK(c0_in.has_value() && c0_in->defined(), "fastseq: the lstm backward needs c0");
    check_tensor_like(*c0_in, "c0", y, "y", {B, H});
    c0 = c0_in->contiguous();
    if (grad_c_n.has_value() && grad_c_n->defined()) {
      check_tensor_like(*grad_c_n, "grad_c_n", y, "y", {B, H});
      dc = grad_c_n->to(acc_options, false, true);
    } else {
      dc = at::zeros({B, H}, acc_options);
    }
  }
  at::Tensor dgx = new_output({T, B, G * H}, options);
  at::Tensor dgh = new_output({gru ? T : 0, B, G * H}, options);
  if (B > 0 && H > 0) {
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? step : T - 1 - step;  // the forward's steps, backwards
      const int64_t t_prev = std::min<int64_t>(std::max<int64_t>(reverse ? t + 1 : t - 1, 0), T - 1);
      LayerBackwardStep s;
      s.mode = mode;
      s.grad_y = grad_y[t];
      s.dh = dh;
      s.dc = dc;
      s.y = y[t];
      s.y_prev = y[t_prev];
      s.h0 = h0;
      s.ws = WS > 0 ? ws[t] : at::Tensor();
      s.ws_prev = WS > 0 ? ws[t_prev] : at::Tensor();
      s.c0 = c0;
      s.dgx = dgx[t];
      s.dgh = gru ? dgh[t] : at::Tensor();
      s.lengths = lengths;
      s.t = t;
      s.T = T;
      s.reverse = reverse;
      kernels.backward(s);
      // dL/dh_{t-1} += dgates_rec(t) @ W_hh (zero rows for finished sequences).
      dh.add_(at::mm(gru ? dgh[t] : dgx[t], w_hh));
    }
  } else if (T > 0) {
    dgx.zero_();
    dgh.zero_();
  }
  at::Tensor dh0 = dh.to(y.scalar_type());
  at::Tensor dc0 = lstm ? dc.to(y.scalar_type()) : at::empty({0, H}, options);
  return {dgx, dgh, dh0, dc0};
}

}  // namespace fastseq
