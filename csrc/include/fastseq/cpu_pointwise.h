#pragma once
// The CPU pointwise passes (cell step; sequence-loop step), compiled once per CPU capability from
// csrc/cpu/vectorized/ (ATen's own scheme: -DCPU_CAPABILITY=DEFAULT | AVX2, each in its own
// namespace) and chosen at run time by what the processor supports.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "fastseq/rnn_cell.h"
#include "fastseq/rnn_layer.h"

namespace fastseq::cpu {

// The AVX2 builds need what they are compiled for: -mavx2 -mfma -mf16c.
inline bool cpu_has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") &&
                                __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
}

// Units per parallel task of the pointwise passes: an LSTM unit is ~40 flops, so 2048 units
// amortise a task's start.
constexpr int64_t kGrainUnits = 2048;

// Runs fn(b, j0, count) over every row b and every chunk [j0, j0 + count) of `width` units,
// count <= `vector` (the last chunk of a row may be partial), in parallel.
template <typename F>
void for_each_chunk(int64_t rows, int64_t width, int64_t vector, const F& fn) {
  const int64_t chunks_per_row = (width + vector - 1) / vector;
  const int64_t grain = std::max<int64_t>(1, kGrainUnits / vector);
  at::parallel_for(0, rows * chunks_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / chunks_per_row;
      const int64_t j0 = (chunk % chunks_per_row) * vector;
      fn(b, j0, std::min(vector, width - j0));
    }
  });
}

#define FASTSEQ_DECLARE_CPU_POINTWISE(capability)                                        \
  namespace capability {                                                                 \
  void rnn_cell_forward_pointwise(const CellForwardArgs& args, const at::Tensor& gates_ih, \
                                  const at::Tensor& gates_hh);                           \
  void rnn_cell_backward_pointwise(const CellBackwardArgs& args);                        \
  void rnn_layer_forward_step(const LayerForwardStep& step);                             \
  void rnn_layer_backward_step(const LayerBackwardStep& step);                           \
  }

FASTSEQ_DECLARE_CPU_POINTWISE(DEFAULT)
FASTSEQ_DECLARE_CPU_POINTWISE(AVX2)
#undef FASTSEQ_DECLARE_CPU_POINTWISE

}  // namespace fastseq::cpu
