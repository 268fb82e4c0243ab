// Every C++ op schema of fastseq, in one place, and the Python module fastseq._C (its build
// constants and the persistent recurrence's plan queries).
// Device implementations register themselves in csrc/cpu/ and csrc/cuda/; fakes and autograd
// are registered from Python (fastseq/ops/), the same way for C++ and Triton ops.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <vector>

#include "fastseq/rnn_cell.h"
#include "fastseq/rnn_persistent.h"

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
  // for all steps, W_hh on chip; raises when the call does not fit. CUDA: the kernel; CPU: its
  // twin. rnn_layer_forward/backward are the GEMM-per-step loop on every device; Python
  // chooses between the two per pass (fastseq/ops/native_recurrence.py), from the plan
  // queries below.
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

// The persistent plan's target, dtype and mode from Python's arguments (mode, dtype,
// device_type, device_index, multiprocessors, smem_optin, cooperative_launch): device_type
// "cpu" the CPU twin's target, "cuda" the CUDA device's (read off it), "gpu" a described GPU's
// (the last three arguments; ignored otherwise). A Python exception on anything else.
struct PlanQuery {
  fastseq::CellMode mode;
  at::ScalarType dtype;
  fastseq::PersistentTarget target;
};

PlanQuery plan_query(const char* mode, const char* dtype, const char* device_type, int index,
                     long long multiprocessors, long long smem_optin, int cooperative) {
  const std::string d = dtype;
  at::ScalarType scalar;
  if (d == "float32") scalar = at::kFloat;
  else if (d == "float64") scalar = at::kDouble;
  else if (d == "float16") scalar = at::kHalf;
  else if (d == "bfloat16") scalar = at::kBFloat16;
  else TORCH_CHECK(false, "fastseq: the persistent plan has no dtype ", d);
  const fastseq::CellMode cell = fastseq::parse_cell_mode(mode);
  const std::string type = device_type;
  const auto device_index = static_cast<c10::DeviceIndex>(index);
  if (type == "cpu") return {cell, scalar, fastseq::cpu_persistent_device().target(scalar, device_index)};
  if (type == "gpu") {
    TORCH_CHECK(multiprocessors > 0 && smem_optin > 0,
                "fastseq: a described GPU needs multiprocessors and shared memory > 0");
    return {cell, scalar, fastseq::gpu_persistent_target(scalar, multiprocessors, smem_optin, cooperative != 0)};
  }
#ifdef FASTSEQ_WITH_CUDA
  if (type == "cuda") return {cell, scalar, fastseq::cuda_persistent_device().target(scalar, device_index)};
#endif
  TORCH_CHECK(false, "fastseq: this build has no persistent recurrence for ", type);
}

// persistent_batch_limits(mode, backward, dtype, device_type, device_index, multiprocessors,
// smem_optin, cooperative_launch) -> tuple of ints: the largest batch the plan fits at each
// hidden size (fastseq/rnn_persistent.h).
PyObject* persistent_batch_limits(PyObject*, PyObject* args) {
  const char *mode, *dtype, *device_type;
  int backward, index, cooperative;
  long long multiprocessors, smem_optin;
  if (!PyArg_ParseTuple(args, "spssiLLp", &mode, &backward, &dtype, &device_type, &index,
                        &multiprocessors, &smem_optin, &cooperative))
    return nullptr;
  try {
    const PlanQuery q = plan_query(mode, dtype, device_type, index, multiprocessors, smem_optin, cooperative);
    const std::vector<int64_t> limits =
        fastseq::persistent_batch_limits(q.mode, backward != 0, q.dtype, q.target);
    PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(limits.size()));
    if (result == nullptr) return nullptr;
    for (size_t h = 0; h < limits.size(); ++h)
      PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(h), PyLong_FromLongLong(limits[h]));
    return result;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// persistent_refusal(mode, backward, batch, hidden, dtype, device_type, device_index,
// multiprocessors, smem_optin, cooperative_launch) -> str: why that call's plan does not fit,
// "" when it does.
PyObject* persistent_refusal(PyObject*, PyObject* args) {
  const char *mode, *dtype, *device_type;
  int backward, index, cooperative;
  long long batch, hidden, multiprocessors, smem_optin;
  if (!PyArg_ParseTuple(args, "spLLssiLLp", &mode, &backward, &batch, &hidden, &dtype,
                        &device_type, &index, &multiprocessors, &smem_optin, &cooperative))
    return nullptr;
  try {
    const PlanQuery q = plan_query(mode, dtype, device_type, index, multiprocessors, smem_optin, cooperative);
    const std::string why =
        fastseq::persistent_refusal(q.mode, backward != 0, batch, hidden, q.dtype, q.target);
    return PyUnicode_FromStringAndSize(why.data(), static_cast<Py_ssize_t>(why.size()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef fastseq_c_methods[] = {
    {"persistent_batch_limits", persistent_batch_limits, METH_VARARGS,
     "Largest batch the persistent recurrence's plan fits at each hidden size."},
    {"persistent_refusal", persistent_refusal, METH_VARARGS,
     "Why the persistent recurrence's plan does not fit a call ('' when it does)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef fastseq_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                "fastseq's C++/CUDA kernels (registered as torch.ops.fastseq.*)",
                                -1, fastseq_c_methods};

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
