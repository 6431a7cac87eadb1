// pybind11 module fusedce._cuda: the CUDA kernels behind plain integers (device pointers, sizes,
// strides, dtype codes, the device index and the stream handle). Compiled by the host compiler, with
// no CUDA or torch header; python/fusedce/backends/cuda.py is the one caller and documents each argument.
#include <pybind11/pybind11.h>

#include "params.h"

namespace py = pybind11;
using fusedce::cuda::Launch;
using fusedce::cuda::Params;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

Params make_params(uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype,
                   uintptr_t target_index, uintptr_t target_prob, int64_t target_row_stride, int target_dtype,
                   uintptr_t weight, uintptr_t weight_sum, int64_t ignore_index, double label_smoothing, double z_loss,
                   double softcap, uintptr_t lse, uintptr_t grad_loss, int64_t grad_stride, uintptr_t dlogits,
                   int64_t dlogits_row_stride) {
  Params p;
  p.logits = ptr<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.rows = rows;
  p.vocab = vocab;
  p.dtype = dtype;
  p.target_index = ptr<const int64_t>(target_index);
  p.target_prob = ptr<const void>(target_prob);
  p.target_row_stride = target_row_stride;
  p.target_dtype = target_dtype;
  p.weight = ptr<const float>(weight);
  p.weight_sum = ptr<const float>(weight_sum);
  p.ignore_index = ignore_index;
  p.label_smoothing = float(label_smoothing);
  p.z_loss = float(z_loss);
  p.softcap = float(softcap);
  p.lse = ptr<float>(lse);
  p.grad_loss = ptr<const float>(grad_loss);
  p.grad_stride = grad_stride;
  p.dlogits = ptr<void>(dlogits);
  p.dlogits_row_stride = dlogits_row_stride;
  return p;
}

Launch make_launch(int layout, int threads, int64_t blocks, int splits, bool vectorized, int device, uintptr_t stream) {
  Launch l;
  l.layout = layout;
  l.threads = threads;
  l.blocks = blocks;
  l.splits = splits;
  l.vectorized = vectorized;
  l.device = device;
  l.stream = stream;
  return l;
}

#define FUSEDCE_ARGS                                                                                        \
  uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype, uintptr_t target_index, \
      uintptr_t target_prob, int64_t target_row_stride, int target_dtype, uintptr_t weight, uintptr_t weight_sum, \
      int64_t ignore_index, double label_smoothing, double z_loss, double softcap, uintptr_t lse,              \
      uintptr_t grad_loss, int64_t grad_stride, uintptr_t dlogits, int64_t dlogits_row_stride, int layout,     \
      int threads, int64_t blocks, int splits, bool vectorized, int device, uintptr_t stream
#define FUSEDCE_PARAMS                                                                                      \
  make_params(logits, logits_row_stride, rows, vocab, dtype, target_index, target_prob, target_row_stride,    \
              target_dtype, weight, weight_sum, ignore_index, label_smoothing, z_loss, softcap, lse, grad_loss, \
              grad_stride, dlogits, dlogits_row_stride)
#define FUSEDCE_LAUNCH make_launch(layout, threads, blocks, splits, vectorized, device, stream)
#define FUSEDCE_ARG_NAMES                                                                                      \
  py::arg("logits"), py::arg("logits_row_stride"), py::arg("rows"), py::arg("vocab"), py::arg("dtype"),        \
      py::arg("target_index"), py::arg("target_prob"), py::arg("target_row_stride"), py::arg("target_dtype"),  \
      py::arg("weight"), py::arg("weight_sum"), py::arg("ignore_index"), py::arg("label_smoothing"),           \
      py::arg("z_loss"), py::arg("softcap"), py::arg("lse"), py::arg("grad_loss"), py::arg("grad_stride"),     \
      py::arg("dlogits"), py::arg("dlogits_row_stride"), py::arg("layout"), py::arg("threads"),                \
      py::arg("blocks"), py::arg("splits"), py::arg("vectorized"), py::arg("device"), py::arg("stream")

// grad_loss = 0: loss and lse only; otherwise also the gradient into dlogits (the fused mode).
void forward(FUSEDCE_ARGS, uintptr_t loss, uintptr_t workspace) {
  Params p = FUSEDCE_PARAMS;
  p.loss = ptr<float>(loss);
  p.workspace = ptr<float>(workspace);
  fusedce::cuda::forward(p, FUSEDCE_LAUNCH);
}

void backward(FUSEDCE_ARGS) { fusedce::cuda::backward(FUSEDCE_PARAMS, FUSEDCE_LAUNCH); }

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedce CUDA kernels (no torch dependency; see fusedce.backends.cuda)";
  m.attr("archs") = FUSEDCE_CUDA_ARCHS;  // the -gencode targets it was built for
  py::dict dtypes;
  for (int code = 0; code < fusedce::kDTypeCount; ++code) dtypes[fusedce::kDTypeNames[code]] = code;
  m.attr("DTYPES") = dtypes;
  m.def("forward", &forward, FUSEDCE_ARG_NAMES, py::arg("loss"), py::arg("workspace"));
  m.def("backward", &backward, FUSEDCE_ARG_NAMES);
  m.def("scale", [](uintptr_t grad, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, uintptr_t scale,
                    int device, uintptr_t stream) {
    fusedce::cuda::scale(ptr<void>(grad), dtype, rows, vocab, row_stride, ptr<const float>(scale), device, stream);
  }, py::arg("grad"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("scale"),
        py::arg("device"), py::arg("stream"));
  m.def("device_info", [](int device) {
    const auto info = fusedce::cuda::device_info(device);
    return py::make_tuple(info.sms, info.threads_per_sm, info.l2_bytes, info.clusters, info.regs_per_sm);
  }, py::arg("device"),
        "(streaming multiprocessors, resident threads per SM, L2 bytes, whether the cluster layout runs, registers "
        "per SM) of a device");
}
