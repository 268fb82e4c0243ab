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
