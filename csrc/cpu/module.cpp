// pybind11 module fusedce._C: the CPU kernels behind plain integers (pointers, sizes, strides, dtype
// codes). python/fusedce/backends/cpu.py is the one caller and documents each argument. Arguments are
// positional: pybind11 matches keywords by name on every call, which costs more than the kernel on
// small inputs.
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

// The arguments every entry point starts with; see struct CrossEntropyArgs.
CrossEntropyArgs make_args(uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype,
                           uintptr_t target, bool target_is_prob, int64_t target_row_stride, int target_dtype,
                           uintptr_t weight, int64_t ignore_index, double label_smoothing, double z_loss,
                           double softcap) {
  CrossEntropyArgs a;
  a.logits = ptr<void>(logits);
  a.logits_row_stride = logits_row_stride;
  a.rows = rows;
  a.vocab = vocab;
  a.dtype = dtype;
  a.target_index = target_is_prob ? nullptr : ptr<int64_t>(target);
  a.target_prob = target_is_prob ? ptr<void>(target) : nullptr;
  a.target_row_stride = target_row_stride;
  a.target_dtype = target_dtype;
  a.weight = ptr<void>(weight);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.classes = vocab;
  return a;
}

#define FUSEDCE_ARGS                                                                                   \
  uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype, uintptr_t target, \
      bool target_is_prob, int64_t target_row_stride, int target_dtype, uintptr_t weight,              \
      int64_t ignore_index, double label_smoothing, double z_loss, double softcap
#define FUSEDCE_ARG_VALUES                                                                            \
  logits, logits_row_stride, rows, vocab, dtype, target, target_is_prob, target_row_stride,           \
      target_dtype, weight, ignore_index, label_smoothing, z_loss, softcap

// reduction kNone: loss holds rows in the accumulation type; kSum / kMean: one element in loss_dtype.
// lse = 0: not wanted. dlogits = 0: no gradient; otherwise the gradient, scaled per row by grad_loss
// (grad_loss = 0 in a reduced forward: the gradient of the reduced loss).
void forward(FUSEDCE_ARGS, int reduction, uintptr_t loss, int loss_dtype, uintptr_t lse, uintptr_t grad_loss,
             int64_t grad_stride, uintptr_t dlogits, int64_t dlogits_row_stride, int num_threads) {
  CrossEntropyArgs a = make_args(FUSEDCE_ARG_VALUES);
  BackwardIO io{ptr<void>(grad_loss), grad_stride, ptr<void>(lse), reinterpret_cast<void*>(dlogits),
                dlogits_row_stride};
  ForwardOut out{reinterpret_cast<void*>(loss), reinterpret_cast<void*>(lse), reduction, loss_dtype};
  py::gil_scoped_release release;
  fusedce::cross_entropy_forward(a, out, dlogits ? &io : nullptr, num_threads);
}

// class_start, classes, target_mass: a vocabulary-parallel shard's backward (the global classes
// [class_start, class_start + vocab) of `classes`, the global K per row); 0, vocab, 0 for a whole row.
void backward(FUSEDCE_ARGS, int64_t class_start, int64_t classes, uintptr_t grad_loss, int64_t grad_stride,
              uintptr_t lse, uintptr_t target_mass, uintptr_t dlogits, int64_t dlogits_row_stride, int num_threads) {
  CrossEntropyArgs a = make_args(FUSEDCE_ARG_VALUES);
  a.class_start = class_start;
  a.classes = classes;
  BackwardIO io{ptr<void>(grad_loss), grad_stride, ptr<void>(lse), reinterpret_cast<void*>(dlogits),
                dlogits_row_stride};
  io.target_mass = ptr<void>(target_mass);
  py::gil_scoped_release release;
  fusedce::cross_entropy_backward(a, io, num_threads);
}

// A shard's softmax states (rows x 4, the accumulation type) of `classes` classes in all (where its columns
// start does not matter: c_j does not depend on the target).
void shard_states(FUSEDCE_ARGS, int64_t classes, uintptr_t states, int num_threads) {
  CrossEntropyArgs a = make_args(FUSEDCE_ARG_VALUES);
  a.classes = classes;
  py::gil_scoped_release release;
  fusedce::cross_entropy_shard_states(a, reinterpret_cast<void*>(states), num_threads);
}

// weight: in the accumulation type of `dtype` (the logits' dtype code), or 0.
double mean_denominator(uintptr_t target, bool target_is_prob, int64_t rows, int64_t vocab, uintptr_t weight,
                        int dtype, int64_t ignore_index) {
  CrossEntropyArgs a;
  a.target_index = target_is_prob ? nullptr : ptr<int64_t>(target);
  a.rows = rows;
  a.vocab = vocab;
  a.weight = ptr<void>(weight);
  a.dtype = dtype;
  a.ignore_index = ignore_index;
  return fusedce::mean_denominator(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedce CPU kernels (no torch dependency; see fusedce.backends.cpu)";
  py::dict dtypes;
  for (int code = 0; code < fusedce::kDTypeCount; ++code) dtypes[fusedce::kDTypeNames[code]] = code;
  m.attr("DTYPES") = dtypes;
  m.attr("REDUCTIONS") = py::make_tuple("none", "sum", "mean");  // enum Reduction, in code order
  m.def("isa", &fusedce::cpu_isa, "instruction set the kernels were dispatched to");
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("shard_states", &shard_states);
  m.def("mean_denominator", &mean_denominator);
}
