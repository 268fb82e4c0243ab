// The pointwise pass of one step of the CPU sequence loop (forward and backward), one SIMD
// vector of a row's hidden units at a time for fp32/fp64, one unit at a time for fp16/bf16.
// The per-unit code is fastseq/rnn_layer.h's, run with V = Vectorized<acc_t> (lengths, zoneout
// and the workspace handled there once for every device). Compiled per CPU capability, as
// rnn_cell_pointwise.cpp.
//
// Why: the scalar pass (libm exp/tanh, ~85 ns per LSTM unit) made the LSTM sequence forward
// 0.22x of torch's at B=16 H=256 on 2 cores (bench/NOTES.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "fastseq/cpu_pointwise.h"

namespace fastseq {

// n <= size() consecutive units: loads and stores of the lanes that exist.
template <typename T>
struct Lanes<at::vec::CPU_CAPABILITY::Vectorized<T>> {
  using V = at::vec::CPU_CAPABILITY::Vectorized<T>;
  static V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store(T* p, const V& v, int64_t n) { v.store(p, n); }
};

namespace cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
constexpr bool kSimd = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// The lane type of scalar_t: a SIMD vector of it for fp32/fp64, else one fp32 unit.
template <typename scalar_t>
using LaneOf = std::conditional_t<kSimd<scalar_t>, at::vec::Vectorized<at::opmath_type<scalar_t>>,
                                  at::opmath_type<scalar_t>>;

template <typename scalar_t>
constexpr int64_t lanes() {
  if constexpr (kSimd<scalar_t>) {
    return at::vec::Vectorized<scalar_t>::size();
  } else {
    return 1;
  }
}

}  // namespace

void rnn_layer_forward_step(const LayerForwardStep& s) {
  const int64_t B = s.y.size(0), H = s.y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = LaneOf<scalar_t>;
    const auto io = layer_step_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      for_each_chunk(B, H, lanes<scalar_t>(), [&](int64_t b, int64_t j0, int64_t n) {
        layer_step_forward_element<M, scalar_t, acc_t, V>(io, b, j0, n);
      });
    });
  });
}

void rnn_layer_backward_step(const LayerBackwardStep& s) {
  const int64_t B = s.y.size(0), H = s.y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.y.scalar_type(), "rnn_layer_step_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = LaneOf<scalar_t>;
    const auto io = layer_step_backward_io<scalar_t, acc_t>(s);
    dispatch_cell_mode(s.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      for_each_chunk(B, H, lanes<scalar_t>(), [&](int64_t b, int64_t j0, int64_t n) {
        layer_step_backward_element<M, scalar_t, acc_t, V>(io, b, j0, n);
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastseq
