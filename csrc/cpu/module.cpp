// pybind11 module fusedce._C: the CPU kernels behind plain integers (pointers, sizes, strides, dtype
// codes). python/fusedce/_native.py is the one caller and documents each argument.
#include <pybind11/pybind11.h>

#include "dispatch.h"

namespace py = pybind11;
using fusedce::BackwardIO;
using fusedce::CrossEntropyArgs;
using fusedce::ForwardOut;

namespace {

template <typename T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

CrossEntropyArgs make_args(uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype,
                           uintptr_t target_index, uintptr_t target_prob, int64_t target_row_stride,
                           int target_dtype, uintptr_t weight, int64_t ignore_index, double label_smoothing,
                           double z_loss, double softcap) {
  CrossEntropyArgs a;
  a.logits = ptr<void>(logits);
  a.logits_row_stride = logits_row_stride;
  a.rows = rows;
  a.vocab = vocab;
  a.dtype = dtype;
  a.target_index = ptr<int64_t>(target_index);
  a.target_prob = ptr<void>(target_prob);
  a.target_row_stride = target_row_stride;
  a.target_dtype = target_dtype;
  a.weight = ptr<void>(weight);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  return a;
}

#define FUSEDCE_ARGS                                                                                  \
  uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype,               \
      uintptr_t target_index, uintptr_t target_prob, int64_t target_row_stride, int target_dtype,    \
      uintptr_t weight, int64_t ignore_index, double label_smoothing, double z_loss, double softcap
#define FUSEDCE_ARG_VALUES                                                                             \
  logits, logits_row_stride, rows, vocab, dtype, target_index, target_prob, target_row_stride,       \
      target_dtype, weight, ignore_index, label_smoothing, z_loss, softcap
#define FUSEDCE_ARG_NAMES                                                                              \
  py::arg("logits"), py::arg("logits_row_stride"), py::arg("rows"), py::arg("vocab"), py::arg("dtype"), \
      py::arg("target_index"), py::arg("target_prob"), py::arg("target_row_stride"),                  \
      py::arg("target_dtype"), py::arg("weight"), py::arg("ignore_index"), py::arg("label_smoothing"), \
      py::arg("z_loss"), py::arg("softcap")

// dlogits = 0: loss and lse only; otherwise also the gradient, scaled per row by grad_loss.
void forward(FUSEDCE_ARGS, uintptr_t loss, uintptr_t lse, uintptr_t grad_loss, int64_t grad_stride,
             uintptr_t dlogits, int64_t dlogits_row_stride, int num_threads) {
  CrossEntropyArgs a = make_args(FUSEDCE_ARG_VALUES);
  BackwardIO io{ptr<void>(grad_loss), grad_stride, ptr<void>(lse), reinterpret_cast<void*>(dlogits),
                dlogits_row_stride};
  py::gil_scoped_release release;
  fusedce::cross_entropy_forward(a, ForwardOut{reinterpret_cast<void*>(loss), reinterpret_cast<void*>(lse)},
                                 dlogits ? &io : nullptr, num_threads);
}

void backward(FUSEDCE_ARGS, uintptr_t grad_loss, int64_t grad_stride, uintptr_t lse, uintptr_t dlogits,
              int64_t dlogits_row_stride, int num_threads) {
  CrossEntropyArgs a = make_args(FUSEDCE_ARG_VALUES);
  BackwardIO io{ptr<void>(grad_loss), grad_stride, ptr<void>(lse), reinterpret_cast<void*>(dlogits),
                dlogits_row_stride};
  py::gil_scoped_release release;
  fusedce::cross_entropy_backward(a, io, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedce CPU kernels (no torch dependency; see fusedce._native)";
  m.def("isa", &fusedce::cpu_isa, "instruction set the kernels were dispatched to");
  m.def("forward", &forward, FUSEDCE_ARG_NAMES, py::arg("loss"), py::arg("lse"), py::arg("grad_loss"),
        py::arg("grad_stride"), py::arg("dlogits"), py::arg("dlogits_row_stride"), py::arg("num_threads"));
  m.def("backward", &backward, FUSEDCE_ARG_NAMES, py::arg("grad_loss"), py::arg("grad_stride"), py::arg("lse"),
        py::arg("dlogits"), py::arg("dlogits_row_stride"), py::arg("num_threads"));
  m.def("advise_huge_pages", &fusedce::advise_huge_pages, py::arg("ptr"), py::arg("nbytes"));
}
