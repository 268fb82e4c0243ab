// Host side of the persistent recurrence, shared by the CUDA kernel and its CPU twin: the plan
// (which CTA owns which units, where shared memory goes, whether it fits) and the set-up
// around a device's launch. The kernels' phases are in fastseq/rnn_persistent.h.
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

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
  if (B > target.rows_max) {
    plan.refusal = "batch " + std::to_string(B) + " is more than the " +
                   std::to_string(target.rows_max) +
                   " rows it runs (each CTA re-reads the whole state every step; larger batches "
                   "run the GEMM-per-step loop)";
    return plan;
  }
  PersistentLayout& L = plan.layout;
  const int64_t G = cell_gates(mode);
  const int64_t tile = target.tensor_cores ? 16 : 1;
  L.units = ceil_div(H, target.ctas_max);
  L.ctas = ceil_div(H, L.units);
  L.rows = round_up(B, tile);
  L.cols = round_up(backward ? L.units : G * L.units, tile);
  L.depth = round_up(backward ? G * H : H, tile);
  // Row strides. Tensor cores: 8 more elements (16 bytes; WMMA wants a multiple of 8 for
  // 16-bit types), so the 16 rows of a tile start in different banks. FMA loop: odd, so the
  // threads of a warp, which read the same column of consecutive W rows, hit distinct banks.
  const auto stride = [&](int64_t width) { return target.tensor_cores ? width + 8 : (width | 1); };
  L.ldw = stride(L.depth);
  const int64_t warps = target.threads / 32;
  const int64_t tiles = (L.rows / 16) * (L.cols / 16);
  // Split K until every warp has a tile: B=16 and a 32-column forward slice are 2 tiles for 8
  // warps.
  L.splits = target.tensor_cores ? std::clamp<int64_t>(warps / std::max<int64_t>(tiles, 1), 1, L.depth / 16)
                                 : 1;
  const int64_t w_bytes = L.cols * L.ldw * elem_bytes;
  const int64_t part_bytes = L.splits * L.rows * L.cols * acc_bytes;
  L.a_offset = round_up(w_bytes, 128);
  // A's chunk: as wide as the shared memory left allows, up to the whole depth.
  const int64_t left = target.smem_max - L.a_offset - part_bytes - 128;
  const int64_t fit = left / (L.rows * elem_bytes) - (target.tensor_cores ? 8 : 1);  // widest padded row
  const int64_t chunk = std::min({L.depth, target.chunk_max, fit}) / tile * tile;
  L.chunk = std::max<int64_t>(chunk, tile);
  L.lda = stride(L.chunk);
  L.part_offset = round_up(L.a_offset + L.rows * L.lda * elem_bytes, 128);
  L.smem_bytes = L.part_offset + part_bytes;
  if (chunk < tile || L.smem_bytes > target.smem_max) {
    std::ostringstream why;
    why << "a CTA would need " << L.smem_bytes << " bytes of shared memory (" << w_bytes
        << " for its " << L.units << " units' slice of W_hh, " << L.rows * L.lda * elem_bytes
        << " for " << tile << " staged column(s) of the " << B << " rows' "
        << (backward ? "gate gradients" : "hidden state") << "), more than the "
        << target.smem_max << " the device offers";
    plan.refusal = why.str();
  }
  return plan;
}

void rnn_persistent_forward(LayerForwardArgs& a, const PersistentDevice& device) {
  if (a.T == 0 || a.B == 0 || a.H == 0) return;  // nothing to run; prepare set the outputs
  const PersistentPlan plan = plan_persistent(
      a.mode, /*backward=*/false, a.B, a.H, a.gates_x.element_size(), a.h.element_size(),
      device.target(a.gates_x.scalar_type(), a.gates_x.device().index()));
  TORCH_CHECK(plan.fits(), "fastseq: the persistent recurrence cannot run this call: ", plan.refusal);
  // h_{t-1} as the GEMM reads it (the input dtype), two slots; slot 0 starts as h0.
  at::Tensor exchange = at::empty({2, a.B, a.H}, a.gates_x.options());
  exchange[0].copy_(a.h);
  device.forward(a, plan.layout, exchange);
}

void rnn_persistent_backward(LayerBackwardArgs& a, const PersistentDevice& device) {
  if (a.T == 0 || a.B == 0 || a.H == 0) return;
  const PersistentPlan plan = plan_persistent(
      a.mode, /*backward=*/true, a.B, a.H, a.y.element_size(), a.dh.element_size(),
      device.target(a.y.scalar_type(), a.y.device().index()));
  TORCH_CHECK(plan.fits(), "fastseq: the persistent recurrence cannot run this call: ", plan.refusal);
  device.backward(a, plan.layout);
}

namespace {

// The sizes the ops' plans see for a dtype (rnn_persistent_forward: the input's element size
// and the running state's).
int64_t element_bytes(at::ScalarType dtype) { return c10::elementSize(dtype); }
int64_t accumulator_bytes(at::ScalarType dtype) {
  return c10::elementSize(layer_accumulator_type(dtype));
}

}  // namespace

PersistentTarget gpu_persistent_target(at::ScalarType dtype, int64_t multiprocessors,
                                       int64_t smem_optin, bool cooperative_launch) {
  PersistentTarget target{multiprocessors,
                          smem_optin,
                          dtype == at::kHalf || dtype == at::kBFloat16,
                          kPersistentThreads,
                          /*chunk_max=*/int64_t{1} << 40,  // all of A at once where it fits
                          /*rows_max=*/64,
                          {}};
  if (dtype == at::kDouble) {
    target.refusal = "fp64 runs the GEMM-per-step loop (the kernel serves fp32, fp16, bf16)";
  } else if (!cooperative_launch) {
    target.refusal = "the device has no cooperative launch (needed for the grid barrier)";
  }
  return target;
}

std::vector<int64_t> persistent_batch_limits(CellMode mode, bool backward, at::ScalarType dtype,
                                             const PersistentTarget& target) {
  std::vector<int64_t> limits;
  if (!target.refusal.empty()) return limits;
  const auto fits = [&](int64_t B, int64_t H) {
    return plan_persistent(mode, backward, B, H, element_bytes(dtype), accumulator_bytes(dtype),
                           target).fits();
  };
  limits.push_back(0);  // H = 0: nothing to run
  // Up to the first H at which even one row does not fit: the W_hh slice grows with H (units
  // = ceil(H / ctas) and the depth both grow), so no larger H fits either. Cost, once per
  // (mode, pass, dtype, device): the CPU twin's plain RNN in bf16, 961 sizes x 64 batches,
  // took 6.5 ms here; a 132-SM GPU's fp16 RNN table (~3,900 sizes) should take ~4x that.
  for (int64_t H = 1; fits(1, H); ++H) {
    int64_t B = 1;
    while (B < target.rows_max && fits(B + 1, H)) ++B;
    limits.push_back(B);
  }
  return limits;
}

std::string persistent_refusal(CellMode mode, bool backward, int64_t B, int64_t H,
                               at::ScalarType dtype, const PersistentTarget& target) {
  if (B <= 0 || H <= 0) return "";
  return plan_persistent(mode, backward, B, H, element_bytes(dtype), accumulator_bytes(dtype),
                         target).refusal;
}

}  // namespace fastseq
