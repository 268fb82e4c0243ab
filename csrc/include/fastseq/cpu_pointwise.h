#pragma once
// The CPU cell-step pointwise passes, compiled once per CPU capability from
// csrc/cpu/vectorized/ (ATen's own scheme: -DCPU_CAPABILITY=DEFAULT | AVX2, each in its own
// namespace) and chosen at run time by what the processor supports.
#include <ATen/core/Tensor.h>

#include "fastseq/rnn_cell.h"

namespace fastseq::cpu {

#define FASTSEQ_DECLARE_CPU_POINTWISE(capability)                                        \
  namespace capability {                                                                 \
  void rnn_cell_forward_pointwise(const CellForwardArgs& args, const at::Tensor& gates_ih, \
                                  const at::Tensor& gates_hh);                           \
  void rnn_cell_backward_pointwise(const CellBackwardArgs& args);                        \
  }

FASTSEQ_DECLARE_CPU_POINTWISE(DEFAULT)
FASTSEQ_DECLARE_CPU_POINTWISE(AVX2)
#undef FASTSEQ_DECLARE_CPU_POINTWISE

}  // namespace fastseq::cpu
