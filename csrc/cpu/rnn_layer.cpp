// CPU implementation of the sequence ops (the C++ twin of the CUDA ones): the shared host loop
// with a per-step pointwise pass over (row, units), the math of fastseq/rnn_layer.h, in SIMD
// vectors of units (csrc/cpu/vectorized/rnn_layer_pointwise.cpp, per CPU capability).
#include <torch/library.h>

#include "fastseq/cpu_pointwise.h"
#include "fastseq/rnn_layer.h"

namespace fastseq {
namespace {

void forward_step_cpu(const LayerForwardStep& s) {
  if (cpu::cpu_has_avx2()) {
    cpu::AVX2::rnn_layer_forward_step(s);
  } else {
    cpu::DEFAULT::rnn_layer_forward_step(s);
  }
}

void backward_step_cpu(const LayerBackwardStep& s) {
  if (cpu::cpu_has_avx2()) {
    cpu::AVX2::rnn_layer_backward_step(s);
  } else {
    cpu::DEFAULT::rnn_layer_backward_step(s);
  }
}

constexpr LayerStepKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu};

void run_forward(LayerForwardArgs& a) { rnn_layer_forward_loop(a, kCpuKernels); }

void run_backward(LayerBackwardArgs& a) { rnn_layer_backward_loop(a, kCpuKernels); }

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_layer_forward", &layer_forward_op<&run_forward>);
  m.impl("rnn_layer_backward", &layer_backward_op<&run_backward>);
}

}  // namespace fastseq
