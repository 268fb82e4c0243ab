// The persistent recurrence's C++ CPU twin: the CUDA kernel's per-CTA phases
// (fastseq/rnn_persistent.h) run for every CTA in turn, step by step, each CTA with its own
// "shared memory" buffer that keeps its slice of W_hh for the whole sequence. Not a fast CPU
// path (the loop with MKL GEMMs is that): it is what lets CI test the persistent algorithm,
// its partition into CTAs, its exchange between steps and its op binding without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastseq/rnn_persistent.h"

namespace fastseq {
namespace {

// The plan the twin follows: 8 CTAs at most, so test sizes (H = 63, 300) split into several
// CTAs with a short last one, as H = 768 does over an H100's 132 SMs; the H100's 227 KB of
// shared memory per CTA, so the twin refuses what the GPU refuses at the same ratio; A staged
// 64 columns at a time, so H = 63 and 300 take 1-19 chunks (the GPU stages what fits).
PersistentTarget cpu_target(at::ScalarType, c10::DeviceIndex) {
  return {/*ctas_max=*/8, /*smem_max=*/227 * 1024, /*tensor_cores=*/false, /*threads=*/1,
          /*chunk_max=*/64, /*rows_max=*/64, {}};
}

// One buffer per CTA, 16-byte aligned like the GPU's dynamic shared memory.
struct CtaMemory {
  std::vector<std::vector<long double>> buffers;
  CtaMemory(int64_t ctas, int64_t bytes)
      : buffers(ctas, std::vector<long double>((bytes + sizeof(long double) - 1) / sizeof(long double))) {}
  CtaContext cta(int64_t index) {
    return {index, 0, 1, reinterpret_cast<unsigned char*>(buffers[index].data())};
  }
};

// The CTAs of one step are independent (disjoint units; the exchange slot they read is not
// the one they write), so they run in parallel here as on the GPU.
template <typename F>
void for_each_cta(int64_t ctas, F&& f) {
  at::parallel_for(0, ctas, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c);
  });
}

void forward_cpu(const LayerForwardArgs& a, const PersistentLayout& L, const at::Tensor& exchange) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "rnn_persistent_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = persistent_forward_params<scalar_t, acc_t>(a, L, exchange);
    CtaMemory memory(L.ctas, L.smem_bytes);
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      for_each_cta(L.ctas, [&](int64_t c) { persistent_forward_setup<M>(p, memory.cta(c)); });
      for (int64_t step = 0; step < a.T; ++step)  // each step ends at a grid barrier
        for_each_cta(L.ctas, [&](int64_t c) { persistent_forward_step<M, FmaGemm>(p, memory.cta(c), step); });
    });
  });
}

void backward_cpu(const LayerBackwardArgs& a, const PersistentLayout& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "rnn_persistent_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = persistent_backward_params<scalar_t, acc_t>(a, L);
    CtaMemory memory(L.ctas, L.smem_bytes);
    dispatch_cell_mode(a.mode, [&](auto m) {
      constexpr CellMode M = decltype(m)::value;
      for_each_cta(L.ctas, [&](int64_t c) { persistent_backward_setup<M>(p, memory.cta(c)); });
      for (int64_t step = 0; step < a.T; ++step)
        for_each_cta(L.ctas, [&](int64_t c) { persistent_backward_step<M, FmaGemm>(p, memory.cta(c), step); });
      for_each_cta(L.ctas, [&](int64_t c) { persistent_backward_finish<M, FmaGemm>(p, memory.cta(c)); });
    });
  });
}

constexpr PersistentDevice kCpuTwin{&cpu_target, &forward_cpu, &backward_cpu};

void run_forward(LayerForwardArgs& a) { rnn_persistent_forward(a, kCpuTwin); }

void run_backward(LayerBackwardArgs& a) { rnn_persistent_backward(a, kCpuTwin); }

}  // namespace

const PersistentDevice& cpu_persistent_device() { return kCpuTwin; }

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_layer_forward_persistent", &layer_forward_op<&run_forward>);
  m.impl("rnn_layer_backward_persistent", &layer_backward_op<&run_backward>);
}

}  // namespace fastseq
