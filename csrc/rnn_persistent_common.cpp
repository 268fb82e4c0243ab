// Host side of the persistent recurrence, shared by the CUDA kernel and its CPU twin: the plan
// (which CTA owns which units, where shared memory goes, whether it fits) and the set-up
// around a device's launch. The kernels' phases are in fastseq/rnn_persistent.h.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

#include "fastseq/rnn_persistent.h"

namespace fastseq {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace

PersistentPlan plan_persistent(CellMode mode, bool backward, int64_t B, int64_t H,
                               int64_t elem_bytes, int64_t acc_bytes,
                               const PersistentTarget& target) {
  PersistentPlan plan;
  if (!target.refusal.empty()) {
    plan.refusal = target.refusal;
    return plan;
  }
  TORCH_CHECK(B > 0 && H > 0 && target.ctas_max > 0, "fastseq: plan_persistent needs B, H > 0");
  PersistentLayout& L = plan.layout;
  const int64_t G = cell_gates(mode);
  const int64_t tile = target.tensor_cores ? 16 : 1;
  L.units = ceil_div(H, target.ctas_max);
  L.ctas = ceil_div(H, L.units);
  L.rows = round_up(B, tile);
  L.cols = round_up(backward ? L.units : G * L.units, tile);
  L.depth = round_up(backward ? G * H : H, tile);
  // Row stride of A and W. Tensor cores: 8 more elements (16 bytes; WMMA wants a multiple of 8
  // for 16-bit types), so the 16 rows of a tile start in different banks. FMA loop: odd, so the
  // threads of a warp, which read the same column of consecutive W rows, hit distinct banks.
  L.ld = target.tensor_cores ? L.depth + 8 : (L.depth | 1);
  const int64_t warps = target.threads / 32;
  const int64_t tiles = (L.rows / 16) * (L.cols / 16);
  // Split K until every warp has a tile: B=16 and a 32-column forward slice are 2 tiles for 8
  // warps.
  L.splits = target.tensor_cores ? std::clamp<int64_t>(warps / std::max<int64_t>(tiles, 1), 1, L.depth / 16)
                                 : 1;
  const int64_t w_bytes = L.cols * L.ld * elem_bytes, a_bytes = L.rows * L.ld * elem_bytes;
  L.a_offset = round_up(w_bytes, 128);
  L.part_offset = round_up(L.a_offset + a_bytes, 128);
  L.smem_bytes = L.part_offset + L.splits * L.rows * L.cols * acc_bytes;
  if (L.smem_bytes > target.smem_max) {
    std::ostringstream why;
    why << "a CTA would need " << L.smem_bytes << " bytes of shared memory (" << w_bytes
        << " for its " << L.units << " units' slice of W_hh, " << a_bytes << " for the staged "
        << (backward ? "gate gradients" : "hidden state") << " of " << B
        << " rows), more than the " << target.smem_max << " the device offers";
    plan.refusal = why.str();
  }
  return plan;
}

bool rnn_persistent_forward(LayerForwardArgs& a, const PersistentDevice& device, bool required) {
  if (a.T == 0 || a.B == 0 || a.H == 0) return true;  // nothing to run; prepare set the outputs
  const PersistentPlan plan = plan_persistent(a.mode, /*backward=*/false, a.B, a.H,
                                              a.gates_x.element_size(), a.h.element_size(),
                                              device.target(a.gates_x));
  if (!plan.fits()) {
    TORCH_CHECK(!required, "fastseq: the persistent recurrence cannot run this call: ",
                plan.refusal);
    return false;
  }
  // h_{t-1} as the GEMM reads it (the input dtype), two slots; slot 0 starts as h0.
  at::Tensor exchange = at::empty({2, a.B, a.H}, a.gates_x.options());
  exchange[0].copy_(a.h);
  device.forward(a, plan.layout, exchange);
  return true;
}

bool rnn_persistent_backward(LayerBackwardArgs& a, const PersistentDevice& device, bool required) {
  if (a.T == 0 || a.B == 0 || a.H == 0) return true;
  const PersistentPlan plan = plan_persistent(a.mode, /*backward=*/true, a.B, a.H,
                                              a.y.element_size(), a.dh.element_size(),
                                              device.target(a.y));
  if (!plan.fits()) {
    TORCH_CHECK(!required, "fastseq: the persistent recurrence cannot run this call: ",
                plan.refusal);
    return false;
  }
  device.backward(a, plan.layout);
  return true;
}

}  // namespace fastseq
