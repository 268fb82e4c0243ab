#pragma once
// The persistent recurrence: one launch runs every step of one layer in one direction, with the
// recurrent weights on chip for the whole sequence (cuDNN's persistent algorithm, Baidu's
// Persistent RNNs). CTA c owns hidden units [c*units, c*units + units) and every gate of them:
//
//   forward, per step:  stage h_{t-1} [B, H] (all units, written by every CTA at the step
//                       before) in shared memory; gates[B, G*units] = h_{t-1} @ (its rows of
//                       W_hh, in shared memory since the launch)^T; the cell update of its
//                       units (fastseq/rnn_layer.h, the loop's own per-unit code); write its
//                       slice of h_t; grid barrier.
//   backward, per step: stage dgates_{t+1} [B, G*H]; dh[B, units] += dgates_{t+1} @ (its
//                       columns of W_hh); the backward cell update of its units; grid barrier.
//
// One barrier per step suffices: h_t goes to the other half of a two-slot exchange buffer, and
// every CTA has staged slot t%2 before anyone passes the barrier of step t. The state (h, c,
// dh, dc) of a unit lives where the loop keeps it, in fp32 [B, H] tensors, and is touched only
// by the CTA that owns the unit. Inputs, outputs and the workspace have the loop's layout, so
// a persistent forward pairs with a loop backward and the other way round (the backward's
// plan needs less shared memory per row, so it fits at batches where the forward does not).
//
// The per-CTA phases below are host+device functions: the CUDA kernel runs them with a grid
// barrier between steps (csrc/cuda/rnn_persistent.cu); the C++ CPU twin runs the same phases
// for every CTA in turn, step by step (csrc/cpu/rnn_persistent.cpp), so CI exercises the
// partition into CTAs, the shared-memory layout and the exchange on this very code.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fastseq/rnn_layer.h"

namespace fastseq {

// A CTA's shared memory and its per-step GEMM C[b][n] = sum_k A[b][k] * W[n][k]:
//   forward:  A = h_{t-1} [B, H];         W row n = g*units + u is W_hh[g*H + u0 + u, :]
//   backward: A = dgates_{t+1} [B, G*H];  W row n = u is W_hh[:, u0 + u]
// Shared memory: W [cols, ldw] at 0 (all of depth, for the whole launch), one chunk of A
// [rows, lda] at a_offset (A is staged `chunk` columns at a time, so a large B or the
// backward's G*H-deep A need not fit at once), the GEMM's partial sums [splits, rows, cols]
// (acc_t) at part_offset. Padding rows and columns hold zeros.
struct PersistentLayout {
  int64_t units;   // hidden units per CTA (the last CTA may own fewer)
  int64_t ctas;
  int64_t rows;    // B, rounded up to 16 for tensor cores
  int64_t cols;    // forward G*units, backward units; rounded up to 16 for tensor cores
  int64_t depth;   // forward H, backward G*H; rounded up to 16 for tensor cores
  int64_t chunk;   // columns of A staged at a time (a multiple of 16 for tensor cores)
  int64_t ldw, lda;  // row strides of W and of the staged A chunk, in elements
  int64_t splits;  // K splits of the GEMM (one warp each; their partial sums meet in the update)
  int64_t a_offset, part_offset, smem_bytes;
};

// What a plan must fit in.
struct PersistentTarget {
  int64_t ctas_max;   // CTAs that can all be resident at once (one per SM)
  int64_t smem_max;   // shared memory a CTA may have, in bytes
  bool tensor_cores;  // 16x16x16 WMMA tiles (fp16/bf16 on GPUs), else an FMA loop
  int threads;        // per CTA
  int64_t chunk_max;  // most columns of A staged at a time (the CPU twin's is small, to test
                      // the chunking on small sizes)
  int64_t rows_max;   // largest batch run persistently (see plan_persistent)
  std::string refusal;  // set when the device cannot run this call persistently at all
};

struct PersistentPlan {
  PersistentLayout layout{};
  std::string refusal;  // why the recurrence cannot run persistently; empty when it can
  bool fits() const { return refusal.empty(); }
};

// The plan (stated once: the CUDA op, its CPU twin and Python's choice through
// persistent_batch_limits all read it): units per CTA =
// ceil(H / ctas_max), the fewest that keep every SM busy; the recurrence runs persistently
// when that CTA's W slice, its partial sums and a chunk of A at least 16 (tensor cores) or 1
// column wide fit in smem_max; the chunk is as wide as what is left allows; and B <= rows_max
// (64): every CTA re-reads the whole [B, H] state (forward) or [B, G*H] gate gradients
// (backward) each step, 128 CTAs x 64 x 768 x 2 bytes = 12.6 MB of L2 reads a step at B=64,
// while at large B the loop's per-step GEMMs are big enough for cuBLAS to run well (64 is
// a first guess, to be tuned on a GPU; cuDNN's persistent algorithm also stops at small
// batches). Otherwise the GEMM-per-step loop runs (e.g. LSTM H=2048 bf16: W_hh alone is
// 33.5 MB, more than the 132 SMs x 227 KB = 30 MB of an H100's shared memory).
PersistentPlan plan_persistent(CellMode mode, bool backward, int64_t B, int64_t H,
                               int64_t elem_bytes, int64_t acc_bytes,
                               const PersistentTarget& target);

// A CTA: its index, this thread's index and the CTA's thread count (the CPU twin: 0 and 1),
// and its shared memory.
struct CtaContext {
  int64_t cta;
  int tid, threads;
  unsigned char* smem;
};

FASTSEQ_HOST_DEVICE void cta_sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

// A load of data another CTA wrote during this launch: through L2 (ld.global.cg), never from
// a possibly stale L1 line of an earlier step.
template <typename T>
FASTSEQ_HOST_DEVICE T load_from_other_cta(const T* p) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "unsupported element size");
  T value;
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&value, &bits, 2);
  } else if constexpr (sizeof(T) == 4) {
    const unsigned int bits = __ldcg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&value, &bits, 4);
  } else {
    const unsigned long long bits = __ldcg(reinterpret_cast<const unsigned long long*>(p));
    memcpy(&value, &bits, 8);
  }
  return value;
#else
  return *p;
#endif
}

// The GEMM on CUDA cores (fp32 on GPUs, every dtype in the CPU twin): part[b][n] (+)=
// sum_{k < depth} A[b][k] * W[n][k], a thread per output, four independent partial sums so the
// FMAs pipeline instead of waiting on each other. `accumulate`: add to part (chunks after the
// first) instead of overwriting it.
struct FmaGemm {
  template <typename scalar_t, typename acc_t>
  FASTSEQ_HOST_DEVICE static void run(const scalar_t* A, const scalar_t* W, acc_t* part,
                                      const PersistentLayout& L, int64_t rows, int64_t cols,
                                      int64_t depth, bool accumulate, int tid, int threads) {
    for (int64_t idx = tid; idx < rows * cols; idx += threads) {
      const int64_t b = idx / cols, n = idx % cols;
      const scalar_t* a = A + b * L.lda;
      const scalar_t* w = W + n * L.ldw;
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t k = 0;
      for (; k + 4 <= depth; k += 4) {
        s0 += static_cast<acc_t>(a[k]) * static_cast<acc_t>(w[k]);
        s1 += static_cast<acc_t>(a[k + 1]) * static_cast<acc_t>(w[k + 1]);
        s2 += static_cast<acc_t>(a[k + 2]) * static_cast<acc_t>(w[k + 2]);
        s3 += static_cast<acc_t>(a[k + 3]) * static_cast<acc_t>(w[k + 3]);
      }
      for (; k < depth; ++k) s0 += static_cast<acc_t>(a[k]) * static_cast<acc_t>(w[k]);
      const acc_t sum = (s0 + s1) + (s2 + s3);
      part[b * L.cols + n] = accumulate ? part[b * L.cols + n] + sum : sum;
    }
  }
};

template <typename acc_t>
FASTSEQ_HOST_DEVICE acc_t sum_splits(const acc_t* part, const PersistentLayout& L, int64_t b,
                                     int64_t n) {
  acc_t sum = part[b * L.cols + n];
  for (int64_t s = 1; s < L.splits; ++s) sum += part[(s * L.rows + b) * L.cols + n];
  return sum;
}

// Shared memory regions of a CTA.
template <typename scalar_t, typename acc_t>
struct CtaBuffers {
  scalar_t* W;
  scalar_t* A;
  acc_t* part;
  FASTSEQ_HOST_DEVICE CtaBuffers(const CtaContext& cta, const PersistentLayout& L)
      : W(reinterpret_cast<scalar_t*>(cta.smem)),
        A(reinterpret_cast<scalar_t*>(cta.smem + L.a_offset)),
        part(reinterpret_cast<acc_t*>(cta.smem + L.part_offset)) {}
};

// Zeroes W and A (their padding must read zero) before a CTA loads its weights.
template <typename scalar_t>
FASTSEQ_HOST_DEVICE void zero_operands(scalar_t* W, scalar_t* A, const PersistentLayout& L,
                                       const CtaContext& cta) {
  for (int64_t i = cta.tid; i < L.cols * L.ldw; i += cta.threads) W[i] = scalar_t(0);
  for (int64_t i = cta.tid; i < L.rows * L.lda; i += cta.threads) A[i] = scalar_t(0);
  cta_sync();
}

// part[b][n] = sum_k src[b][k] * W[n][k] for the CTA's first `cols` W rows: src [B, width]
// row-major, written by every CTA at the step before, staged into A a chunk of columns at a
// time (columns past width read zero). Ends with the CTA synchronized.
template <typename Gemm, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void cta_product(const CtaBuffers<scalar_t, acc_t>& buf, const PersistentLayout& L,
                                     const scalar_t* src, int64_t B, int64_t width, int64_t cols,
                                     const CtaContext& cta) {
  for (int64_t k0 = 0; k0 < L.depth; k0 += L.chunk) {
    const int64_t len = L.depth - k0 < L.chunk ? L.depth - k0 : L.chunk;
    for (int64_t i = cta.tid; i < B * len; i += cta.threads) {
      const int64_t b = i / len, k = k0 + i % len;
      buf.A[b * L.lda + i % len] = k < width ? load_from_other_cta(src + b * width + k) : scalar_t(0);
    }
    cta_sync();
    Gemm::run(buf.A, buf.W + k0, buf.part, L, B, cols, len, k0 > 0, cta.tid, cta.threads);
    cta_sync();
  }
}

FASTSEQ_HOST_DEVICE int64_t cta_units(const PersistentLayout& L, int64_t cta, int64_t H) {
  const int64_t left = H - cta * L.units;
  return left < L.units ? left : L.units;
}

// ---------------------------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
struct PersistentForwardParams {
  LayerStepIO<scalar_t, acc_t> io;  // gates_x, y, ws at step 0 (gates_h unused)
  const scalar_t* w_hh;             // [G*H, H]
  scalar_t* exchange;               // [2, B, H]: slot 0 holds h0 at launch
  int64_t T, B;
  bool reverse;
  PersistentLayout layout;
};

template <CellMode M, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_forward_setup(const PersistentForwardParams<scalar_t, acc_t>& p,
                                                  const CtaContext& cta) {
  constexpr int G = CellMath<M>::kGates;
  const PersistentLayout& L = p.layout;
  const CtaBuffers<scalar_t, acc_t> buf(cta, L);
  const int64_t H = p.io.H, u0 = cta.cta * L.units, uc = cta_units(L, cta.cta, H);
  zero_operands(buf.W, buf.A, L, cta);
  for (int64_t i = cta.tid; i < G * uc * H; i += cta.threads) {
    const int64_t n = i / H, k = i % H, g = n / uc, u = n % uc;
    buf.W[(g * L.units + u) * L.ldw + k] = p.w_hh[(g * H + u0 + u) * H + k];
  }
  cta_sync();
}

// Step `step` of the launch (time t = step, or T-1-step in reverse). Ends without a CTA
// barrier: the grid barrier that follows each step orders everything.
template <CellMode M, typename Gemm, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_forward_step(const PersistentForwardParams<scalar_t, acc_t>& p,
                                                 const CtaContext& cta, int64_t step) {
  constexpr int G = CellMath<M>::kGates, WS = layer_workspace<M>();
  const PersistentLayout& L = p.layout;
  const CtaBuffers<scalar_t, acc_t> buf(cta, L);
  const int64_t B = p.B, H = p.io.H, u0 = cta.cta * L.units, uc = cta_units(L, cta.cta, H);
  const int64_t t = p.reverse ? p.T - 1 - step : step;
  const scalar_t* h_read = p.exchange + (step & 1) * B * H;
  scalar_t* h_write = p.exchange + ((step + 1) & 1) * B * H;

  cta_product<Gemm>(buf, L, h_read, B, H, G * L.units, cta);

  LayerStepIO<scalar_t, acc_t> io = p.io;
  io.gates_x += t * B * G * H;
  io.y += t * B * H;
  if (io.zoneout_h != nullptr) io.zoneout_h += t * B * H;
  if (io.zoneout_c != nullptr) io.zoneout_c += t * B * H;
  if (io.ws != nullptr) io.ws += t * B * WS * H;
  io.t = t;
  for (int64_t i = cta.tid; i < B * uc; i += cta.threads) {
    const int64_t b = i / uc, u = i % uc, j = u0 + u;
    acc_t recurrent[G];
    FASTSEQ_UNROLL
    for (int g = 0; g < G; ++g) recurrent[g] = sum_splits(buf.part, L, b, g * L.units + u);
    layer_step_forward_unit<M, scalar_t, acc_t>(io, b, j, recurrent);
    h_write[b * H + j] = static_cast<scalar_t>(io.h[b * H + j]);  // finished rows: h unchanged
  }
}

// --------------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct PersistentBackwardParams {
  LayerStepBackwardIO<scalar_t, acc_t> io;  // grad_y, y, ws, dgx, dgh at step 0
  const scalar_t* w_hh;                     // [G*H, H]
  int64_t B;
  PersistentLayout layout;
};

template <CellMode M, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_backward_setup(
    const PersistentBackwardParams<scalar_t, acc_t>& p, const CtaContext& cta) {
  constexpr int G = CellMath<M>::kGates;
  const PersistentLayout& L = p.layout;
  const CtaBuffers<scalar_t, acc_t> buf(cta, L);
  const int64_t H = p.io.H, u0 = cta.cta * L.units, uc = cta_units(L, cta.cta, H);
  zero_operands(buf.W, buf.A, L, cta);
  for (int64_t i = cta.tid; i < uc * G * H; i += cta.threads) {
    const int64_t u = i / (G * H), k = i % (G * H);
    buf.W[u * L.ldw + k] = p.w_hh[k * H + u0 + u];
  }
  cta_sync();
}

// part <- dgates_rec(t_done) @ W_hh[:, own units]: the recurrent part of dL/dh_{t_done - 1}.
template <CellMode M, typename Gemm, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_backward_gemm(const PersistentBackwardParams<scalar_t, acc_t>& p,
                                                  const CtaContext& cta, int64_t t_done) {
  constexpr int G = CellMath<M>::kGates;
  const PersistentLayout& L = p.layout;
  const CtaBuffers<scalar_t, acc_t> buf(cta, L);
  const int64_t B = p.B, H = p.io.H;
  const scalar_t* dgates = M == CellMode::kGRU ? p.io.dgh : p.io.dgx;
  cta_product<Gemm>(buf, L, dgates + t_done * B * G * H, B, G * H, L.units, cta);
}

template <typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void add_recurrent_dh(const PersistentBackwardParams<scalar_t, acc_t>& p,
                                          const CtaContext& cta, int64_t b, int64_t u) {
  const CtaBuffers<scalar_t, acc_t> buf(cta, p.layout);
  p.io.dh[b * p.io.H + cta.cta * p.layout.units + u] += sum_splits(buf.part, p.layout, b, u);
}

// Step `step` of the backward launch: the forward's time steps in reverse order.
template <CellMode M, typename Gemm, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_backward_step(
    const PersistentBackwardParams<scalar_t, acc_t>& p, const CtaContext& cta, int64_t step) {
  constexpr int G = CellMath<M>::kGates, WS = layer_workspace<M>();
  const int64_t B = p.B, H = p.io.H, T = p.io.T, u0 = cta.cta * p.layout.units;
  const int64_t uc = cta_units(p.layout, cta.cta, H);
  const int64_t t = p.io.reverse ? step : T - 1 - step;
  if (step > 0) persistent_backward_gemm<M, Gemm>(p, cta, p.io.reverse ? t - 1 : t + 1);

  const int64_t t_prev = previous_step(t, T, p.io.reverse);
  LayerStepBackwardIO<scalar_t, acc_t> io = p.io;
  io.grad_y += t * B * H;
  io.y = p.io.y + t * B * H;
  io.y_prev = p.io.y + t_prev * B * H;
  if (io.ws != nullptr) {
    io.ws = p.io.ws + t * B * WS * H;
    io.ws_prev = p.io.ws + t_prev * B * WS * H;
  }
  io.dgx += t * B * G * H;
  if (io.dgh != nullptr) io.dgh += t * B * G * H;
  if (io.zoneout_h != nullptr) io.zoneout_h += t * B * H;
  if (io.zoneout_c != nullptr) io.zoneout_c += t * B * H;
  io.t = t;
  for (int64_t i = cta.tid; i < B * uc; i += cta.threads) {
    const int64_t b = i / uc, u = i % uc;
    if (step > 0) add_recurrent_dh(p, cta, b, u);
    layer_step_backward_element<M, scalar_t, acc_t>(io, b, u0 + u);
  }
}

// After the last step's grid barrier: dL/dh0 gets the recurrent part of the last step done.
template <CellMode M, typename Gemm, typename scalar_t, typename acc_t>
FASTSEQ_HOST_DEVICE void persistent_backward_finish(
    const PersistentBackwardParams<scalar_t, acc_t>& p, const CtaContext& cta) {
  persistent_backward_gemm<M, Gemm>(p, cta, p.io.reverse ? p.io.T - 1 : 0);
  const int64_t uc = cta_units(p.layout, cta.cta, p.io.H);
  for (int64_t i = cta.tid; i < p.B * uc; i += cta.threads) add_recurrent_dh(p, cta, i / uc, i % uc);
}

// ------------------------------------------------------------------------------ host side

// What a device provides: where the plan must fit (for a dtype on a device index), and the
// launches.
struct PersistentDevice {
  PersistentTarget (*target)(at::ScalarType dtype, c10::DeviceIndex device);
  void (*forward)(const LayerForwardArgs& a, const PersistentLayout& L, const at::Tensor& exchange);
  void (*backward)(const LayerBackwardArgs& a, const PersistentLayout& L);
};

// Runs the op persistently on `device`; raises with the plan's reason when it does not fit.
// Whether a call runs here or in the GEMM-per-step loop is decided in Python, once, from the
// limits below (fastseq/ops/native_recurrence.py); these ops only run what they are given.
void rnn_persistent_forward(LayerForwardArgs& a, const PersistentDevice& device);
void rnn_persistent_backward(LayerBackwardArgs& a, const PersistentDevice& device);

// Threads per CTA of the CUDA kernel: 8 warps, one per GEMM tile or K split of the B=16 case.
constexpr int kPersistentThreads = 256;

// A GPU's target from its properties (the CUDA device reads them off the device; a described
// GPU, fastseq.explain_on_gpu, gives them): one CTA per multiprocessor, the opt-in shared
// memory per block, tensor cores for fp16/bf16; fp64 and GPUs without cooperative launch
// refused.
PersistentTarget gpu_persistent_target(at::ScalarType dtype, int64_t multiprocessors,
                                       int64_t smem_optin, bool cooperative_launch);

// The largest batch the plan fits at each hidden size 0 .. size()-1 (0: none; past the end
// nothing fits, the W_hh slice alone being too big), on `target`, for a mode, direction of the
// pass and dtype. Entry H holds the largest B such that every batch 1..B fits, so
// "B <= limits[H]" is a rule Python can evaluate under torch.compile with symbolic sizes. An
// empty vector: the target refuses every call (its refusal says why).
std::vector<int64_t> persistent_batch_limits(CellMode mode, bool backward, at::ScalarType dtype,
                                             const PersistentTarget& target);

// Why one call does not fit (the plan's own words), or "" when it does: what explain reports.
std::string persistent_refusal(CellMode mode, bool backward, int64_t B, int64_t H,
                               at::ScalarType dtype, const PersistentTarget& target);

// The kernels' parameters from the prepared op arguments.
template <typename scalar_t, typename acc_t>
PersistentForwardParams<scalar_t, acc_t> persistent_forward_params(const LayerForwardArgs& a,
                                                                   const PersistentLayout& L,
                                                                   const at::Tensor& exchange) {
  PersistentForwardParams<scalar_t, acc_t> p;
  p.io = {a.gates_x.data_ptr<scalar_t>(), nullptr, data_or_null<scalar_t>(a.b_hh),
          a.h.data_ptr<acc_t>(), data_or_null<acc_t>(a.c), a.y.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(a.ws), data_or_null<int32_t>(a.lengths),
          data_or_null<scalar_t>(a.zoneout_h), data_or_null<scalar_t>(a.zoneout_c), 0, a.H};
  p.w_hh = a.w_hh.data_ptr<scalar_t>();
  p.exchange = exchange.data_ptr<scalar_t>();
  p.T = a.T;
  p.B = a.B;
  p.reverse = a.reverse;
  p.layout = L;
  return p;
}

template <typename scalar_t, typename acc_t>
PersistentBackwardParams<scalar_t, acc_t> persistent_backward_params(const LayerBackwardArgs& a,
                                                                     const PersistentLayout& L) {
  PersistentBackwardParams<scalar_t, acc_t> p;
  const scalar_t* y = a.y.data_ptr<scalar_t>();
  const scalar_t* ws = data_or_null<scalar_t>(a.ws);
  p.io = {a.grad_y.data_ptr<scalar_t>(), a.dh.data_ptr<acc_t>(), data_or_null<acc_t>(a.dc),
          y, y, a.h0.data_ptr<scalar_t>(), ws, ws, data_or_null<scalar_t>(a.c0),
          a.dgx.data_ptr<scalar_t>(), data_or_null<scalar_t>(a.dgh),
          data_or_null<int32_t>(a.lengths), data_or_null<scalar_t>(a.zoneout_h),
          data_or_null<scalar_t>(a.zoneout_c), 0, a.T, a.H, a.reverse};
  p.w_hh = a.w_hh.data_ptr<scalar_t>();
  p.B = a.B;
  p.layout = L;
  return p;
}

// The CUDA device (csrc/cuda/rnn_persistent.cu; CUDA builds only) and the CPU twin
// (csrc/cpu/rnn_persistent.cpp).
const PersistentDevice& cuda_persistent_device();
const PersistentDevice& cpu_persistent_device();

}  // namespace fastseq
