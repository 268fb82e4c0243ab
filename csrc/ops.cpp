// Every C++ op schema of fastseq, in one place, and the Python module fastseq._C.
// Device implementations register themselves in csrc/cpu/ and csrc/cuda/; fakes and autograd
// are registered from Python (fastseq/ops/), the same way for C++ and Triton ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastseq, m) {
  // One recurrent cell step. mode: "lstm" | "gru" | "rnn_tanh" | "rnn_relu".
  // Returns (hy, cy, workspace): cy is empty unless mode is lstm; workspace holds what the
  // backward needs ([B, 4H]: LSTM gates i,f,g,o or GRU r,z,n,hn) and is empty when
  // save_workspace is false (inference: the gates never reach memory) or mode is a plain RNN.
  m.def(
      "rnn_cell_forward(str mode, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool save_workspace) -> (Tensor hy, Tensor cy, Tensor workspace)");
  // Gradient of one cell step with respect to its gate pre-activations (the weight, input and
  // hidden-state gradients are GEMMs over these, done by the caller).
  // Returns (dgates_ih [B,G*H], dgates_hh [B,G*H] (GRU, else empty), dh_prev_direct [B,H]
  // (GRU: z*dh, else empty), dcx [B,H] (LSTM, else empty)).
  m.def(
      "rnn_cell_backward(str mode, Tensor grad_hy, Tensor? grad_cy, Tensor hx, Tensor? cx, "
      "Tensor hy, Tensor? cy, Tensor workspace) -> (Tensor dgates_ih, Tensor dgates_hh, "
      "Tensor dh_prev_direct, Tensor dcx)");
  // One recurrent layer, one direction, over a sequence. gates_x [T, B, G*H] = x W_ih^T + b_ih
  // for every step (one GEMM by the caller); lengths int32 [B] or None (padded sequences: a
  // finished row keeps its state and outputs zeros); zoneout_h/zoneout_c [T, B, H] or None
  // (h_t = m h_{t-1} + (1 - m) h~_t; LSTM h and c, GRU h; fastseq/rnn_layer.h); reverse runs
  // the steps backwards.
  // Returns (y [T, B, H], h_n, c_n (LSTM, else empty), workspace [T, B, WS*H]: LSTM i,f,g,o,c_t;
  // GRU r,z,n,hn; empty for plain RNNs or when save_workspace is false).
  m.def(
      "rnn_layer_forward(str mode, Tensor gates_x, Tensor h0, Tensor? c0, Tensor w_hh, "
      "Tensor? b_hh, Tensor? lengths, Tensor? zoneout_h, Tensor? zoneout_c, bool reverse, "
      "bool save_workspace) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor workspace)");
  // Backward through time. Returns (dgates_x [T, B, G*H], dgates_h [T, B, G*H] (GRU: the
  // recurrent pre-activations' gradients; else empty), dh0, dc0 (LSTM, else empty)); the caller
  // forms dW_hh as one GEMM over all steps.
  m.def(
      "rnn_layer_backward(str mode, Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, Tensor h0, "
      "Tensor? c0, Tensor w_hh, Tensor y, Tensor workspace, Tensor? lengths, Tensor? zoneout_h, "
      "Tensor? zoneout_c, bool reverse) -> (Tensor dgates_x, Tensor dgates_h, Tensor dh0, "
      "Tensor dc0)");
  // The same two ops run by the persistent recurrence (fastseq/rnn_persistent.h): one launch
  // for all steps, W_hh on chip. CUDA: raises when the call does not fit (rnn_layer_forward
  // falls back to its loop instead); CPU: the kernel's twin, for tests.
  m.def(
      "rnn_layer_forward_persistent(str mode, Tensor gates_x, Tensor h0, Tensor? c0, "
      "Tensor w_hh, Tensor? b_hh, Tensor? lengths, Tensor? zoneout_h, Tensor? zoneout_c, "
      "bool reverse, bool save_workspace) -> (Tensor y, Tensor h_n, Tensor c_n, "
      "Tensor workspace)");
  m.def(
      "rnn_layer_backward_persistent(str mode, Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, "
      "Tensor h0, Tensor? c0, Tensor w_hh, Tensor y, Tensor workspace, Tensor? lengths, "
      "Tensor? zoneout_h, Tensor? zoneout_c, bool reverse) -> (Tensor dgates_x, "
      "Tensor dgates_h, Tensor dh0, Tensor dc0)");
}

namespace {

#ifdef FASTSEQ_WITH_CUDA
constexpr int kWithCuda = 1;
constexpr const char* kCudaVersion = FASTSEQ_CUDA_VERSION;
#else
constexpr int kWithCuda = 0;
constexpr const char* kCudaVersion = "";
#endif

PyModuleDef fastseq_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                "fastseq's C++/CUDA kernels (registered as torch.ops.fastseq.*)",
                                -1, nullptr};

}  // namespace

// Importing the module registers the ops; its constants describe how it was built.
PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&fastseq_c_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "torch_version", FASTSEQ_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", kWithCuda) < 0 ||
      PyModule_AddStringConstant(module, "cuda_version", kCudaVersion) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", kWithCuda ? FASTSEQ_CUDA_ARCHS : "") < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
