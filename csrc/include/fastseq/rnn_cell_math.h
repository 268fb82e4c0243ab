#pragma once
// Per-element math of one recurrent cell step, forward and backward, in PyTorch's gate order
// and formulas (LSTM: i, f, g, o; GRU: r, z, n with the reset gate applied to W_hn h + b_hn).
// Used by csrc/cpu/rnn_cell.cpp and csrc/cuda/rnn_cell.cu alike.
#include <cmath>
#include <cstdint>

#include "fastseq/cell_mode.h"
#include "fastseq/macros.h"

namespace fastseq {

// The math below is written once for T = float or double (one unit per call, CUDA threads and
// the CPU's scalar path) and for T = at::vec::Vectorized<float/double> (8 or 4 units per call,
// the CPU's SIMD path), so both devices run the same formulas. Scalars use libm; vector types
// bring their own SLEEF exp/tanh as members.
FASTSEQ_HOST_DEVICE float exp_(float x) { return ::expf(x); }
FASTSEQ_HOST_DEVICE double exp_(double x) { return ::exp(x); }
FASTSEQ_HOST_DEVICE float tanh_(float x) { return ::tanhf(x); }
FASTSEQ_HOST_DEVICE double tanh_(double x) { return ::tanh(x); }
FASTSEQ_HOST_DEVICE float relu_(float x) { return x > 0.f ? x : 0.f; }
FASTSEQ_HOST_DEVICE double relu_(double x) { return x > 0.0 ? x : 0.0; }
// value where h > 0, else 0: the relu derivative applied to an incoming gradient.
FASTSEQ_HOST_DEVICE float where_positive_(float h, float value) { return h > 0.f ? value : 0.f; }
FASTSEQ_HOST_DEVICE double where_positive_(double h, double value) { return h > 0.0 ? value : 0.0; }

template <typename V>
inline V exp_(const V& x) { return x.exp(); }
template <typename V>
inline V tanh_(const V& x) { return x.tanh(); }
template <typename V>
inline V relu_(const V& x) { return V::blendv(V(0), x, x > V(0)); }
template <typename V>
inline V where_positive_(const V& h, const V& value) { return V::blendv(V(0), value, h > V(0)); }

template <typename T>
FASTSEQ_HOST_DEVICE T sigmoid_(T x) { return T(1) / (T(1) + exp_(-x)); }

template <CellMode M>
struct CellMath;

// LSTM: c' = f*c + i*g, h' = o*tanh(c'). Workspace per unit: the activated gates i, f, g, o.
template <>
struct CellMath<CellMode::kLSTM> {
  static constexpr int kGates = 4;
  static constexpr int kWorkspace = 4;

  template <typename T>
  FASTSEQ_HOST_DEVICE static void forward(const T* pre_ih, const T* pre_hh, T h_prev, T c_prev,
                                          T& h_new, T& c_new, T* ws) {
    const T i = sigmoid_(pre_ih[0] + pre_hh[0]);
    const T f = sigmoid_(pre_ih[1] + pre_hh[1]);
    const T g = tanh_(pre_ih[2] + pre_hh[2]);
    const T o = sigmoid_(pre_ih[3] + pre_hh[3]);
    c_new = f * c_prev + i * g;
    h_new = o * tanh_(c_new);
    ws[0] = i; ws[1] = f; ws[2] = g; ws[3] = o;
  }

  // dpre_hh equals dpre_ih for the LSTM (the callers store only dpre_ih).
  template <typename T>
  FASTSEQ_HOST_DEVICE static void backward(T dh, T dc_next, const T* ws, T h_prev, T c_prev,
                                           T h_new, T c_new, T* dpre_ih, T* dpre_hh,
                                           T& dh_prev_direct, T& dc_prev) {
    const T i = ws[0], f = ws[1], g = ws[2], o = ws[3];
    const T tanh_c = tanh_(c_new);
    const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
    dpre_ih[0] = dc * g * i * (T(1) - i);
    dpre_ih[1] = dc * c_prev * f * (T(1) - f);
    dpre_ih[2] = dc * i * (T(1) - g * g);
    dpre_ih[3] = dh * tanh_c * o * (T(1) - o);
    FASTSEQ_UNROLL
    for (int g = 0; g < kGates; ++g) dpre_hh[g] = dpre_ih[g];
    dc_prev = dc * f;
  }
};

// GRU: n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h.
// Workspace per unit: r, z, n and hn = W_hn h + b_hn (needed for dr).
template <>
struct CellMath<CellMode::kGRU> {
  static constexpr int kGates = 3;
  static constexpr int kWorkspace = 4;

  template <typename T>
  FASTSEQ_HOST_DEVICE static void forward(const T* pre_ih, const T* pre_hh, T h_prev, T c_prev,
                                          T& h_new, T& c_new, T* ws) {
    const T r = sigmoid_(pre_ih[0] + pre_hh[0]);
    const T z = sigmoid_(pre_ih[1] + pre_hh[1]);
    const T hn = pre_hh[2];
    const T n = tanh_(pre_ih[2] + r * hn);
    h_new = (T(1) - z) * n + z * h_prev;
    ws[0] = r; ws[1] = z; ws[2] = n; ws[3] = hn;
  }

  template <typename T>
  FASTSEQ_HOST_DEVICE static void backward(T dh, T dc_next, const T* ws, T h_prev, T c_prev,
                                           T h_new, T c_new, T* dpre_ih, T* dpre_hh,
                                           T& dh_prev_direct, T& dc_prev) {
    const T r = ws[0], z = ws[1], n = ws[2], hn = ws[3];
    const T dn_pre = dh * (T(1) - z) * (T(1) - n * n);
    const T dz_pre = dh * (h_prev - n) * z * (T(1) - z);
    const T dr_pre = dn_pre * hn * r * (T(1) - r);
    dpre_ih[0] = dr_pre; dpre_ih[1] = dz_pre; dpre_ih[2] = dn_pre;
    dpre_hh[0] = dr_pre; dpre_hh[1] = dz_pre; dpre_hh[2] = dn_pre * r;
    dh_prev_direct = dh * z;
  }
};

// Plain RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh). No workspace: the derivative is read off h'.
template <CellMode M>
struct PlainRnnMath {
  static constexpr int kGates = 1;
  static constexpr int kWorkspace = 0;

  template <typename T>
  FASTSEQ_HOST_DEVICE static void forward(const T* pre_ih, const T* pre_hh, T h_prev, T c_prev,
                                          T& h_new, T& c_new, T* ws) {
    const T pre = pre_ih[0] + pre_hh[0];
    if constexpr (M == CellMode::kRNNTanh) {
      h_new = tanh_(pre);
    } else {
      h_new = relu_(pre);
    }
  }

  template <typename T>
  FASTSEQ_HOST_DEVICE static void backward(T dh, T dc_next, const T* ws, T h_prev, T c_prev,
                                           T h_new, T c_new, T* dpre_ih, T* dpre_hh,
                                           T& dh_prev_direct, T& dc_prev) {
    if constexpr (M == CellMode::kRNNTanh) {
      dpre_ih[0] = dh * (T(1) - h_new * h_new);
    } else {
      dpre_ih[0] = where_positive_(h_new, dh);
    }
    dpre_hh[0] = dpre_ih[0];
  }
};
template <>
struct CellMath<CellMode::kRNNTanh> : PlainRnnMath<CellMode::kRNNTanh> {};
template <>
struct CellMath<CellMode::kRNNRelu> : PlainRnnMath<CellMode::kRNNRelu> {};

// Pointers of one cell step's forward; every tensor is contiguous, [B, H] or [B, G*H] with
// gate-major columns (column g*H + j is gate g of unit j). Null where the step has none.
template <typename scalar_t>
struct CellForwardIO {
  const scalar_t* b_ih;
  const scalar_t* b_hh;
  const scalar_t* hx;
  const scalar_t* cx;
  scalar_t* hy;
  scalar_t* cy;
  scalar_t* ws;  // null when no gradient is needed: the gates never reach memory then
  int64_t H;
};

// Adds the biases to the GEMM results of unit (b, j), applies the cell and stores the outputs.
template <CellMode M, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void cell_forward_epilogue(const CellForwardIO<scalar_t>& io, int64_t b,
                                               int64_t j, acc_t* pre_ih, acc_t* pre_hh) {
  using Math = CellMath<M>;
  constexpr int G = Math::kGates;
  const int64_t H = io.H;
  if (io.b_ih != nullptr) {
FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) pre_ih[g] += static_cast<acc_t>(io.b_ih[g * H + j]);
  }
  if (io.b_hh != nullptr) {
FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) pre_hh[g] += static_cast<acc_t>(io.b_hh[g * H + j]);
  }
  const int64_t unit = b * H + j;
  const acc_t h_prev = static_cast<acc_t>(io.hx[unit]);
  const acc_t c_prev = io.cx != nullptr ? static_cast<acc_t>(io.cx[unit]) : acc_t(0);
  acc_t h_new, c_new = acc_t(0);
  acc_t ws[Math::kWorkspace > 0 ? Math::kWorkspace : 1];
  Math::forward(pre_ih, pre_hh, h_prev, c_prev, h_new, c_new, ws);
  io.hy[unit] = static_cast<scalar_t>(h_new);
  if (io.cy != nullptr) io.cy[unit] = static_cast<scalar_t>(c_new);
  if (io.ws != nullptr) {
FASTSEQ_UNROLL
    for (int w = 0; w < Math::kWorkspace; ++w)
      io.ws[b * Math::kWorkspace * H + w * H + j] = static_cast<scalar_t>(ws[w]);
  }
}

template <typename scalar_t>
struct CellBackwardIO {
  const scalar_t* grad_hy;
  const scalar_t* grad_cy;  // null: zero
  const scalar_t* hx;
  const scalar_t* cx;
  const scalar_t* hy;
  const scalar_t* cy;
  const scalar_t* ws;
  scalar_t* dgates_ih;       // [B, G*H]
  scalar_t* dgates_hh;       // [B, G*H], GRU only
  scalar_t* dh_prev_direct;  // [B, H], GRU only (the z*dh path that skips W_hh)
  scalar_t* dcx;             // [B, H], LSTM only
  int64_t H;
};

// Gradient of the gate pre-activations (and the direct state paths) of unit (b, j).
template <CellMode M, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void cell_backward_element(const CellBackwardIO<scalar_t>& io, int64_t b,
                                               int64_t j) {
  using Math = CellMath<M>;
  constexpr int G = Math::kGates;
  const int64_t H = io.H;
  const int64_t unit = b * H + j;
  acc_t ws[Math::kWorkspace > 0 ? Math::kWorkspace : 1];
FASTSEQ_UNROLL
  for (int w = 0; w < Math::kWorkspace; ++w)
    ws[w] = static_cast<acc_t>(io.ws[b * Math::kWorkspace * H + w * H + j]);
  const acc_t dh = static_cast<acc_t>(io.grad_hy[unit]);
  const acc_t dc = io.grad_cy != nullptr ? static_cast<acc_t>(io.grad_cy[unit]) : acc_t(0);
  const acc_t h_prev = io.hx != nullptr ? static_cast<acc_t>(io.hx[unit]) : acc_t(0);
  const acc_t c_prev = io.cx != nullptr ? static_cast<acc_t>(io.cx[unit]) : acc_t(0);
  const acc_t h_new = static_cast<acc_t>(io.hy[unit]);
  const acc_t c_new = io.cy != nullptr ? static_cast<acc_t>(io.cy[unit]) : acc_t(0);
  acc_t dpre_ih[G], dpre_hh[G];
  acc_t dh_direct = acc_t(0), dc_prev = acc_t(0);
  Math::backward(dh, dc, ws, h_prev, c_prev, h_new, c_new, dpre_ih, dpre_hh, dh_direct, dc_prev);
FASTSEQ_UNROLL
  for (int g = 0; g < G; ++g) io.dgates_ih[b * G * H + g * H + j] = static_cast<scalar_t>(dpre_ih[g]);
  if (io.dgates_hh != nullptr) {
FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) io.dgates_hh[b * G * H + g * H + j] = static_cast<scalar_t>(dpre_hh[g]);
  }
  if (io.dh_prev_direct != nullptr) io.dh_prev_direct[unit] = static_cast<scalar_t>(dh_direct);
  if (io.dcx != nullptr) io.dcx[unit] = static_cast<scalar_t>(dc_prev);
}

}  // namespace fastseq
