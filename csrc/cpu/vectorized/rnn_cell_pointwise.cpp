// The pointwise half of the CPU cell step (biases, activations, state update; and its
// backward), one SIMD vector of hidden units at a time. Compiled once per CPU capability
// (CMakeLists.txt: DEFAULT, and AVX2+FMA) inside namespace CPU_CAPABILITY; rnn_cell.cpp picks
// the build the processor runs. The formulas are CellMath's, shared with the CUDA kernel.
//
// Why: the scalar loop with libm exp/tanh cost ~14 ns per unit, making the op 0.3x-0.8x of
// torch's own (SLEEF-vectorised, multi-pass) cells on 2 cores; see bench/NOTES.md.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "fastseq/cpu_pointwise.h"

namespace fastseq::cpu {
namespace CPU_CAPABILITY {
namespace {

// float and double: whole vectors of units through CellMath<M> with T = Vectorized.
template <typename scalar_t, CellMode M>
void forward_vectorized(const CellForwardArgs& a, const scalar_t* pre_ih_all,
                        const scalar_t* pre_hh_all) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using Math = CellMath<M>;
  constexpr int G = Math::kGates, W = Math::kWorkspace;
  const CellForwardIO<scalar_t> io = forward_io<scalar_t>(a);
  const int64_t H = a.hidden_size;
  for_each_chunk(a.batch, H, Vec::size(), [&](int64_t b, int64_t j0, int64_t n) {
    Vec pre_ih[G], pre_hh[G];
    for (int g = 0; g < G; ++g) {
      pre_ih[g] = Vec::loadu(pre_ih_all + b * G * H + g * H + j0, n);
      pre_hh[g] = Vec::loadu(pre_hh_all + b * G * H + g * H + j0, n);
      if (io.b_ih != nullptr) pre_ih[g] = pre_ih[g] + Vec::loadu(io.b_ih + g * H + j0, n);
      if (io.b_hh != nullptr) pre_hh[g] = pre_hh[g] + Vec::loadu(io.b_hh + g * H + j0, n);
    }
    const int64_t unit = b * H + j0;
    const Vec h_prev = Vec::loadu(io.hx + unit, n);
    const Vec c_prev = io.cx != nullptr ? Vec::loadu(io.cx + unit, n) : Vec(0);
    Vec h_new, c_new(0), ws[W > 0 ? W : 1];
    Math::forward(pre_ih, pre_hh, h_prev, c_prev, h_new, c_new, ws);
    h_new.store(io.hy + unit, n);
    if (io.cy != nullptr) c_new.store(io.cy + unit, n);
    if (io.ws != nullptr) {
      for (int w = 0; w < W; ++w) ws[w].store(io.ws + b * W * H + w * H + j0, n);
    }
  });
}

template <typename scalar_t, CellMode M>
void backward_vectorized(const CellBackwardArgs& a) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using Math = CellMath<M>;
  constexpr int G = Math::kGates, W = Math::kWorkspace;
  const CellBackwardIO<scalar_t> io = backward_io<scalar_t>(a);
  const int64_t H = a.hidden_size;
  for_each_chunk(a.batch, H, Vec::size(), [&](int64_t b, int64_t j0, int64_t n) {
    const int64_t unit = b * H + j0;
    Vec ws[W > 0 ? W : 1];
    for (int w = 0; w < W; ++w) ws[w] = Vec::loadu(io.ws + b * W * H + w * H + j0, n);
    const Vec dh = Vec::loadu(io.grad_hy + unit, n);
    const Vec dc = io.grad_cy != nullptr ? Vec::loadu(io.grad_cy + unit, n) : Vec(0);
    const Vec h_prev = Vec::loadu(io.hx + unit, n);
    const Vec c_prev = io.cx != nullptr ? Vec::loadu(io.cx + unit, n) : Vec(0);
    const Vec h_new = Vec::loadu(io.hy + unit, n);
    const Vec c_new = io.cy != nullptr ? Vec::loadu(io.cy + unit, n) : Vec(0);
    Vec dpre_ih[G], dpre_hh[G], dh_direct(0), dc_prev(0);
    Math::backward(dh, dc, ws, h_prev, c_prev, h_new, c_new, dpre_ih, dpre_hh, dh_direct, dc_prev);
    for (int g = 0; g < G; ++g) dpre_ih[g].store(io.dgates_ih + b * G * H + g * H + j0, n);
    if (io.dgates_hh != nullptr) {
      for (int g = 0; g < G; ++g) dpre_hh[g].store(io.dgates_hh + b * G * H + g * H + j0, n);
    }
    if (io.dh_prev_direct != nullptr) dh_direct.store(io.dh_prev_direct + unit, n);
    if (io.dcx != nullptr) dc_prev.store(io.dcx + unit, n);
  });
}

// float16 and bfloat16: one unit at a time in fp32 (the shared scalar epilogue); rarer on CPUs.
template <typename scalar_t, CellMode M>
void forward_scalar(const CellForwardArgs& a, const scalar_t* pre_ih_all,
                    const scalar_t* pre_hh_all) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = CellMath<M>::kGates;
  const CellForwardIO<scalar_t> io = forward_io<scalar_t>(a);
  const int64_t H = a.hidden_size;
  for_each_chunk(a.batch, H, 1, [&](int64_t b, int64_t j, int64_t) {
    acc_t pre_ih[G], pre_hh[G];
    for (int g = 0; g < G; ++g) {
      pre_ih[g] = static_cast<acc_t>(pre_ih_all[b * G * H + g * H + j]);
      pre_hh[g] = static_cast<acc_t>(pre_hh_all[b * G * H + g * H + j]);
    }
    cell_forward_epilogue<M, scalar_t, acc_t>(io, b, j, pre_ih, pre_hh);
  });
}

template <typename scalar_t, CellMode M>
void backward_scalar(const CellBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const CellBackwardIO<scalar_t> io = backward_io<scalar_t>(a);
  for_each_chunk(a.batch, a.hidden_size, 1, [&](int64_t b, int64_t j, int64_t) {
    cell_backward_element<M, scalar_t, acc_t>(io, b, j);
  });
}

}  // namespace

void rnn_cell_forward_pointwise(const CellForwardArgs& a, const at::Tensor& gates_ih,
                                const at::Tensor& gates_hh) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(),
                                  "rnn_cell_forward_pointwise", [&] {
    const scalar_t* pre_ih = gates_ih.data_ptr<scalar_t>();
    const scalar_t* pre_hh = gates_hh.data_ptr<scalar_t>();
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        forward_vectorized<scalar_t, M>(a, pre_ih, pre_hh);
      } else {
        forward_scalar<scalar_t, M>(a, pre_ih, pre_hh);
      }
    });
  });
}

void rnn_cell_backward_pointwise(const CellBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hy.scalar_type(),
                                  "rnn_cell_backward_pointwise", [&] {
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        backward_vectorized<scalar_t, M>(a);
      } else {
        backward_scalar<scalar_t, M>(a);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastseq::cpu
