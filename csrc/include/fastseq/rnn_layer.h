#pragma once
// One recurrent layer, one direction, over a sequence (the native rnn_layer_forward/backward
// ops): a device-agnostic host loop over time (csrc/rnn_layer_common.cpp) runs, per step, the
// recurrent GEMM through ATen (cuBLAS / MKL) and a fused pointwise step kernel of the device
// (csrc/cpu/rnn_layer.cpp, csrc/cuda/rnn_layer.cu), whose per-unit math below is CellMath's.
//
// Layout as the Triton op's: gates_x [T, B, G*H] (x W_ih^T + b_ih), y [T, B, H], workspace
// [T, B, WS*H] with WS = 5 for the LSTM (i, f, g, o, c_t), 4 for the GRU (r, z, n, hn), none
// for plain RNNs. The state runs in acc_t (fp32; fp64 for fp64 input). A row whose sequence
// has ended (t >= length) keeps its state and outputs zeros.
//
// Zoneout (Krueger et al. 2016; LSTM: h and c, GRU: h): per-step weights m [T, B, H] keep part
// of the previous state, h_t = m h_{t-1} + (1 - m) h~_t (likewise c_t), where h~_t is the
// cell's new state; training passes Bernoulli(p) masks, evaluation m = p. y_t and the workspace's
// c_t are the zoned-out states; the backward recomputes the LSTM's c~_t = f c_{t-1} + i g.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "fastseq/rnn_cell.h"

namespace fastseq {

template <CellMode M>
constexpr int layer_workspace() {
  return M == CellMode::kLSTM ? 5 : CellMath<M>::kWorkspace;
}

// One forward step's pointers, each at step t.
template <typename scalar_t, typename acc_t>
struct LayerStepIO {
  const scalar_t* gates_x;  // [B, G*H]
  const scalar_t* gates_h;  // [B, G*H]: h_{t-1} W_hh^T
  const scalar_t* b_hh;     // [G*H] or null
  acc_t* h;                 // [B, H] state, updated in place
  acc_t* c;                 // [B, H] LSTM cell state, in place; null otherwise
  scalar_t* y;              // [B, H]
  scalar_t* ws;             // [B, WS*H] or null
  const int32_t* lengths;   // [B] or null
  const scalar_t* zoneout_h;  // [B, H] or null (no zoneout)
  const scalar_t* zoneout_c;  // [B, H] or null; LSTM only
  int64_t t, H;
};

// Loads and stores of the per-unit code below: one unit (V = acc_t: CUDA threads, the
// persistent kernel, half types on CPUs) or n <= V::size() consecutive units of one row (V =
// at::vec::Vectorized<acc_t> for fp32/fp64 on CPUs; specialised in csrc/cpu/vectorized/).
template <typename V>
struct Lanes {
  template <typename S>
  FASTSEQ_HOST_DEVICE static V load(const S* p, int64_t) { return static_cast<V>(*p); }
  template <typename S>
  FASTSEQ_HOST_DEVICE static void store(S* p, const V& v, int64_t) { *p = static_cast<S>(v); }
};

// Unit (row b, hidden unit j) of a forward step (units j..j+n-1 with SIMD lanes), given its
// recurrent pre-activations recurrent[g] = (h_{t-1} W_hh^T)[b, g*H + j] without b_hh
// (io.gates_h is not read): the GEMM-per-step loop loads them from its GEMM's output, the
// persistent kernel passes its own on-chip accumulators.
template <CellMode M, typename scalar_t, typename acc_t, typename V = acc_t>
FASTSEQ_HOST_DEVICE void layer_step_forward_unit(const LayerStepIO<scalar_t, acc_t>& io,
                                                 int64_t b, int64_t j, const V* recurrent,
                                                 int64_t n = 1) {
  using Math = CellMath<M>;
  using L = Lanes<V>;
  constexpr int G = Math::kGates, WS = layer_workspace<M>();
  const int64_t H = io.H, unit = b * H + j;
  const bool valid = io.lengths == nullptr || io.t < io.lengths[b];
  if (!valid) {  // the state stays; the output and the workspace read zero
    L::store(io.y + unit, V(0), n);
    if (io.ws != nullptr) {
      FASTSEQ_UNROLL
      for (int w = 0; w < WS; ++w) L::store(io.ws + b * WS * H + w * H + j, V(0), n);
    }
    return;
  }
  V pre_ih[G], pre_hh[G];
  FASTSEQ_UNROLL
  for (int g = 0; g < G; ++g) {
    pre_ih[g] = L::load(io.gates_x + b * G * H + g * H + j, n);
    pre_hh[g] = recurrent[g];
    if (io.b_hh != nullptr) pre_hh[g] = pre_hh[g] + L::load(io.b_hh + g * H + j, n);
  }
  const V h_prev = L::load(io.h + unit, n);
  const V c_prev = io.c != nullptr ? L::load(io.c + unit, n) : V(0);
  V h_new, c_new(0), saved[Math::kWorkspace > 0 ? Math::kWorkspace : 1];
  Math::forward(pre_ih, pre_hh, h_prev, c_prev, h_new, c_new, saved);
  if (io.zoneout_h != nullptr) {
    const V m = L::load(io.zoneout_h + unit, n);
    h_new = m * h_prev + (V(1) - m) * h_new;
  }
  if (io.zoneout_c != nullptr) {
    const V m = L::load(io.zoneout_c + unit, n);
    c_new = m * c_prev + (V(1) - m) * c_new;
  }
  L::store(io.h + unit, h_new, n);
  if (io.c != nullptr) L::store(io.c + unit, c_new, n);
  L::store(io.y + unit, h_new, n);
  if (io.ws != nullptr) {
    FASTSEQ_UNROLL
    for (int w = 0; w < Math::kWorkspace; ++w) L::store(io.ws + b * WS * H + w * H + j, saved[w], n);
    if constexpr (M == CellMode::kLSTM) L::store(io.ws + b * WS * H + 4 * H + j, c_new, n);
  }
}

template <CellMode M, typename scalar_t, typename acc_t, typename V = acc_t>
FASTSEQ_HOST_DEVICE void layer_step_forward_element(const LayerStepIO<scalar_t, acc_t>& io,
                                                    int64_t b, int64_t j, int64_t n = 1) {
  constexpr int G = CellMath<M>::kGates;
  V recurrent[G];
  FASTSEQ_UNROLL
  for (int g = 0; g < G; ++g) recurrent[g] = Lanes<V>::load(io.gates_h + b * G * io.H + g * io.H + j, n);
  layer_step_forward_unit<M, scalar_t, acc_t, V>(io, b, j, recurrent, n);
}

// One backward step's pointers, each at step t unless named _prev (the step this one's state
// came from: t-1 forwards, t+1 in reverse) or 0 (the initial state).
template <typename scalar_t, typename acc_t>
struct LayerStepBackwardIO {
  const scalar_t* grad_y;   // [B, H]
  acc_t* dh;                // [B, H] in: dL/dh_t from later steps; out: the part of dL/dh_{t-1}
                            // that skips W_hh (GRU z*dh; all of it for a finished row)
  acc_t* dc;                // [B, H] LSTM: dL/dc_t in, dL/dc_{t-1} out; null otherwise
  const scalar_t* y;        // [B, H] h_t
  const scalar_t* y_prev;   // [B, H] h_{t-1} where the row has a previous step
  const scalar_t* h0;       // [B, H]
  const scalar_t* ws;       // [B, WS*H]
  const scalar_t* ws_prev;  // [B, WS*H] (the LSTM's c_{t-1})
  const scalar_t* c0;       // [B, H] LSTM, else null
  scalar_t* dgx;            // [B, G*H]
  scalar_t* dgh;            // [B, G*H] GRU, else null
  const int32_t* lengths;   // [B] or null
  const scalar_t* zoneout_h;  // [B, H] or null
  const scalar_t* zoneout_c;  // [B, H] or null; LSTM only
  int64_t t, T, H;
  bool reverse;
};

template <CellMode M, typename scalar_t, typename acc_t, typename V = acc_t>
FASTSEQ_HOST_DEVICE void layer_step_backward_element(
    const LayerStepBackwardIO<scalar_t, acc_t>& io, int64_t b, int64_t j, int64_t n = 1) {
  using Math = CellMath<M>;
  using L = Lanes<V>;
  constexpr int G = Math::kGates, WS = layer_workspace<M>();
  const int64_t H = io.H, unit = b * H + j;
  const int64_t length = io.lengths != nullptr ? io.lengths[b] : io.T;
  const bool valid = io.t < length;
  if (!valid) {  // nothing happened at this step: gradients pass through (dh, dc unchanged)
    FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) L::store(io.dgx + b * G * H + g * H + j, V(0), n);
    if (io.dgh != nullptr) {
      FASTSEQ_UNROLL
      for (int g = 0; g < G; ++g) L::store(io.dgh + b * G * H + g * H + j, V(0), n);
    }
    return;
  }
  const V dh = L::load(io.dh + unit, n) + L::load(io.grad_y + unit, n);
  const bool has_prev = io.reverse ? io.t + 1 < length : io.t > 0;
  const V h_prev = L::load((has_prev ? io.y_prev : io.h0) + unit, n);
  const V h_new = L::load(io.y + unit, n);
  V c_prev(0), c_new(0), dc(0);
  if constexpr (M == CellMode::kLSTM) {
    c_prev = has_prev ? L::load(io.ws_prev + b * WS * H + 4 * H + j, n) : L::load(io.c0 + unit, n);
    c_new = L::load(io.ws + b * WS * H + 4 * H + j, n);
    dc = L::load(io.dc + unit, n);
  }
  V saved[Math::kWorkspace > 0 ? Math::kWorkspace : 1];
  FASTSEQ_UNROLL
  for (int w = 0; w < Math::kWorkspace; ++w) saved[w] = L::load(io.ws + b * WS * H + w * H + j, n);
  // Zoneout: the cell's own new state gets the (1 - m) share of the gradient, the previous
  // state the m share directly. Without zoneout m = 0 and this is exact arithmetic on dh, dc.
  const V m_h = io.zoneout_h != nullptr ? L::load(io.zoneout_h + unit, n) : V(0);
  const V m_c = io.zoneout_c != nullptr ? L::load(io.zoneout_c + unit, n) : V(0);
  if constexpr (M == CellMode::kLSTM) {
    if (io.zoneout_c != nullptr) c_new = saved[1] * c_prev + saved[0] * saved[2];  // c~_t = f c + i g
  }
  V dpre_ih[G], dpre_hh[G], dh_direct(0), dc_prev(0);
  Math::backward((V(1) - m_h) * dh, (V(1) - m_c) * dc, saved, h_prev, c_prev, h_new, c_new,
                 dpre_ih, dpre_hh, dh_direct, dc_prev);
  FASTSEQ_UNROLL
  for (int g = 0; g < G; ++g) L::store(io.dgx + b * G * H + g * H + j, dpre_ih[g], n);
  if (io.dgh != nullptr) {
    FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) L::store(io.dgh + b * G * H + g * H + j, dpre_hh[g], n);
  }
  L::store(io.dh + unit, dh_direct + m_h * dh, n);
  if (io.dc != nullptr) L::store(io.dc + unit, dc_prev + m_c * dc, n);
}

// What a device's step kernel receives (tensors sliced at step t; state tensors whole).
struct LayerForwardStep {
  CellMode mode;
  at::Tensor gates_x, gates_h, b_hh, h, c, y, ws, lengths;  // b_hh/c/ws/lengths undefined if absent
  at::Tensor zoneout_h, zoneout_c;                          // at step t; undefined if absent
  int64_t t;
};
struct LayerBackwardStep {
  CellMode mode;
  at::Tensor grad_y, dh, dc, y, y_prev, h0, ws, ws_prev, c0, dgx, dgh, lengths;
  at::Tensor zoneout_h, zoneout_c;
  int64_t t, T;
  bool reverse;
};
struct LayerStepKernels {
  void (*forward)(const LayerForwardStep&);
  void (*backward)(const LayerBackwardStep&);
};

// The dtype the sequence ops keep their running state in (h, c, dh, dc): fp64 for fp64, else
// fp32 (at::opmath_type's rule).
at::ScalarType layer_accumulator_type(at::ScalarType dtype);

// Checked, contiguous arguments of rnn_layer_forward with its outputs allocated and its state
// initialised: where the GEMM-per-step loop and the persistent kernel both start.
struct LayerForwardArgs {
  CellMode mode;
  int64_t T, B, H;
  bool reverse;
  at::Tensor gates_x, w_hh, b_hh, lengths;  // b_hh, lengths undefined when absent
  at::Tensor zoneout_h, zoneout_c;          // [T, B, H]; undefined when absent
  at::Tensor h, c;  // the running state in acc_t, from h0/c0 (c undefined unless LSTM)
  at::Tensor y, ws;  // outputs; ws empty unless save_workspace and the mode saves any
};
LayerForwardArgs prepare_layer_forward(c10::string_view mode, const at::Tensor& gates_x,
                                       const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                       const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                       const std::optional<at::Tensor>& lengths,
                                       const std::optional<at::Tensor>& zoneout_h,
                                       const std::optional<at::Tensor>& zoneout_c, bool reverse,
                                       bool save_workspace);
// (y, h_n, c_n, workspace) of the op, h_n/c_n in the input dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_layer_forward(
    const LayerForwardArgs& a);

struct LayerBackwardArgs {
  CellMode mode;
  int64_t T, B, H;
  bool reverse;
  at::Tensor grad_y, y, h0, c0, w_hh, ws, lengths;  // c0, lengths undefined when absent
  at::Tensor zoneout_h, zoneout_c;                  // undefined when absent
  at::Tensor dh, dc;  // running dL/dh, dL/dc in acc_t, from grad_h_n/grad_c_n (dc: LSTM only)
  at::Tensor dgx, dgh;  // outputs; dgh empty unless GRU
};
LayerBackwardArgs prepare_layer_backward(c10::string_view mode, const at::Tensor& grad_y,
                                         const at::Tensor& grad_h_n,
                                         const std::optional<at::Tensor>& grad_c_n,
                                         const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                         const at::Tensor& w_hh, const at::Tensor& y,
                                         const at::Tensor& workspace,
                                         const std::optional<at::Tensor>& lengths,
                                         const std::optional<at::Tensor>& zoneout_h,
                                         const std::optional<at::Tensor>& zoneout_c, bool reverse);
// (dgates_x, dgates_h, dh0, dc0) of the op.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_layer_backward(
    const LayerBackwardArgs& a);

// The op implementations (CPU loop, CPU persistent twin, CUDA loop or persistent, CUDA
// persistent) differ only in what runs between prepare and finish: Run.
template <void (*Run)(LayerForwardArgs&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_op(
    c10::string_view mode, const at::Tensor& gates_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    bool reverse, bool save_workspace) {
  const c10::DeviceGuard guard(gates_x.device());
  LayerForwardArgs a = prepare_layer_forward(mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h,
                                             zoneout_c, reverse, save_workspace);
  Run(a);
  return finish_layer_forward(a);
}

template <void (*Run)(LayerBackwardArgs&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_backward_op(
    c10::string_view mode, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_hh, const at::Tensor& y,
    const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    bool reverse) {
  const c10::DeviceGuard guard(y.device());
  LayerBackwardArgs a = prepare_layer_backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y,
                                               workspace, lengths, zoneout_h, zoneout_c, reverse);
  Run(a);
  return finish_layer_backward(a);
}

// The step a backward step's state came from: t-1 forwards, t+1 in reverse (clamped; the
// element functions use h0/c0 where a row has no previous step).
FASTSEQ_HOST_DEVICE int64_t previous_step(int64_t t, int64_t T, bool reverse) {
  const int64_t p = reverse ? t + 1 : t - 1;
  return p < 0 ? 0 : (p > T - 1 ? T - 1 : p);
}

// The GEMM-per-step loop over time on prepared arguments (outputs and state in place).
void rnn_layer_forward_loop(LayerForwardArgs& a, const LayerStepKernels& kernels);
void rnn_layer_backward_loop(LayerBackwardArgs& a, const LayerStepKernels& kernels);

// The step kernels' pointers for a (scalar_t, acc_t) pair.
template <typename scalar_t, typename acc_t>
LayerStepIO<scalar_t, acc_t> layer_step_io(const LayerForwardStep& s) {
  return {s.gates_x.data_ptr<scalar_t>(), s.gates_h.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(s.b_hh), s.h.data_ptr<acc_t>(), data_or_null<acc_t>(s.c),
          s.y.data_ptr<scalar_t>(), data_or_null<scalar_t>(s.ws), data_or_null<int32_t>(s.lengths),
          data_or_null<scalar_t>(s.zoneout_h), data_or_null<scalar_t>(s.zoneout_c), s.t, s.h.size(1)};
}

template <typename scalar_t, typename acc_t>
LayerStepBackwardIO<scalar_t, acc_t> layer_step_backward_io(const LayerBackwardStep& s) {
  return {s.grad_y.data_ptr<scalar_t>(), s.dh.data_ptr<acc_t>(), data_or_null<acc_t>(s.dc),
          s.y.data_ptr<scalar_t>(), s.y_prev.data_ptr<scalar_t>(), s.h0.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(s.ws), data_or_null<scalar_t>(s.ws_prev), data_or_null<scalar_t>(s.c0),
          s.dgx.data_ptr<scalar_t>(), data_or_null<scalar_t>(s.dgh), data_or_null<int32_t>(s.lengths),
          data_or_null<scalar_t>(s.zoneout_h), data_or_null<scalar_t>(s.zoneout_c), s.t, s.T,
          s.dh.size(1), s.reverse};
}

}  // namespace fastseq
