// pybind11 module fusedce._cuda: the CUDA kernels behind plain integers (device pointers, sizes,
// strides, dtype codes, the device index and the stream handle), and their launch planning. Compiled by
// the host compiler, with no CUDA or torch header; python/fusedce/backends/cuda.py is the one caller and
// documents each argument. Arguments are positional: pybind11 matches keywords by name on every call.
#include <pybind11/pybind11.h>

#include "params.h"

namespace py = pybind11;
using fusedce::cuda::DeviceInfo;
using fusedce::cuda::Launch;
using fusedce::cuda::Params;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The arguments every entry point starts with; see struct Params.
Params make_params(uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype,
                   uintptr_t target, bool target_is_prob, int64_t target_row_stride, int target_dtype,
                   uintptr_t weight, uintptr_t weight_sum, int64_t ignore_index, double label_smoothing, double z_loss,
                   double softcap, uintptr_t lse, uintptr_t grad_loss, int64_t grad_stride, uintptr_t dlogits,
                   int64_t dlogits_row_stride, int64_t class_start, int64_t classes, uintptr_t target_mass,
                   uintptr_t states) {
  Params p;
  p.logits = ptr<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.rows = rows;
  p.vocab = vocab;
  p.dtype = dtype;
  p.target_index = target_is_prob ? nullptr : ptr<const int64_t>(target);
  p.target_prob = target_is_prob ? ptr<const void>(target) : nullptr;
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
  p.class_start = class_start;
  p.classes = classes;
  p.target_mass = ptr<const float>(target_mass);
  p.states = ptr<float>(states);
  return p;
}

#define FUSEDCE_ARGS                                                                                          \
  uintptr_t logits, int64_t logits_row_stride, int64_t rows, int64_t vocab, int dtype, uintptr_t target,        \
      bool target_is_prob, int64_t target_row_stride, int target_dtype, uintptr_t weight, uintptr_t weight_sum, \
      int64_t ignore_index, double label_smoothing, double z_loss, double softcap, uintptr_t lse,              \
      uintptr_t grad_loss, int64_t grad_stride, uintptr_t dlogits, int64_t dlogits_row_stride, int64_t class_start, \
      int64_t classes, uintptr_t target_mass, uintptr_t states
#define FUSEDCE_PARAMS                                                                                    \
  make_params(logits, logits_row_stride, rows, vocab, dtype, target, target_is_prob, target_row_stride,    \
              target_dtype, weight, weight_sum, ignore_index, label_smoothing, z_loss, softcap, lse, grad_loss, \
              grad_stride, dlogits, dlogits_row_stride, class_start, classes, target_mass, states)

Launch on(Launch l, int device, uintptr_t stream) {
  l.device = device;
  l.stream = stream;
  return l;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  namespace cuda = fusedce::cuda;
  m.doc() = "fusedce CUDA kernels (no torch dependency; see fusedce.backends.cuda)";
  m.attr("archs") = FUSEDCE_CUDA_ARCHS;  // the -gencode targets it was built for
  py::dict dtypes;
  for (int code = 0; code < fusedce::kDTypeCount; ++code) dtypes[fusedce::kDTypeNames[code]] = code;
  m.attr("DTYPES") = dtypes;
  // the launch rules of params.h, for the tests of the planner
  m.attr("LAYOUTS") = py::make_tuple("warp_per_row", "block_per_row", "block_per_row_cached", "cluster_row_cached");
  m.attr("CACHE_PACKS") = cuda::kCachePacks;
  m.attr("CACHED_THREADS") = cuda::kCachedThreads;
  m.attr("MAX_CLUSTER") = cuda::kMaxCluster;
  m.attr("SEGMENT_MIN_BYTES") = cuda::kSegmentMinBytes;
  m.attr("WARP_ROW_MAX_BYTES") = cuda::kWarpRowMaxBytes;
  m.def("segment_length", &cuda::segment_length, py::arg("vocab"), py::arg("parts"));

  py::class_<DeviceInfo>(m, "DeviceInfo", "what launch planning needs of a device (params.h)")
      .def(py::init([](int sms, int threads_per_sm, int64_t l2_bytes, bool clusters, int regs_per_sm, int row_registers,
                       int cached_registers) {
             DeviceInfo d;
             d.sms = sms, d.threads_per_sm = threads_per_sm, d.l2_bytes = l2_bytes, d.clusters = clusters;
             d.regs_per_sm = regs_per_sm;
             for (int dtype = 0; dtype < 3; ++dtype) d.row_registers[dtype] = row_registers, d.cached_registers[dtype] = cached_registers;
             return d;
           }),
           py::arg("sms"), py::arg("threads_per_sm"), py::arg("l2_bytes"), py::arg("clusters") = false,
           py::arg("regs_per_sm") = 65536, py::arg("row_registers") = 64, py::arg("cached_registers") = 128)
      .def_readonly("sms", &DeviceInfo::sms)
      .def_readonly("threads_per_sm", &DeviceInfo::threads_per_sm)
      .def_readonly("regs_per_sm", &DeviceInfo::regs_per_sm)
      .def_readonly("l2_bytes", &DeviceInfo::l2_bytes)
      .def_readonly("clusters", &DeviceInfo::clusters)
      .def_property_readonly("row_registers", [](const DeviceInfo& d) { return py::make_tuple(d.row_registers[0], d.row_registers[1], d.row_registers[2]); })
      .def_property_readonly("cached_registers", [](const DeviceInfo& d) { return py::make_tuple(d.cached_registers[0], d.cached_registers[1], d.cached_registers[2]); });

  py::class_<Launch>(m, "Launch", "how the rows are spread over the GPU (params.h)")
      .def(py::init([](int layout, int threads, int64_t blocks, int splits, bool vectorized) {
             Launch l;
             l.layout = layout, l.threads = threads, l.blocks = blocks, l.splits = splits, l.vectorized = vectorized;
             return l;
           }),
           py::arg("layout"), py::arg("threads"), py::arg("blocks"), py::arg("splits") = 1, py::arg("vectorized") = true)
      .def_readonly("layout", &Launch::layout)
      .def_readonly("threads", &Launch::threads)
      .def_readonly("blocks", &Launch::blocks)
      .def_readonly("splits", &Launch::splits)
      .def_readonly("vectorized", &Launch::vectorized)
      .def("__repr__", [](const Launch& l) {
        return "Launch(layout=" + std::to_string(l.layout) + ", threads=" + std::to_string(l.threads) + ", blocks=" +
               std::to_string(l.blocks) + ", splits=" + std::to_string(l.splits) + ", vectorized=" +
               (l.vectorized ? "True" : "False") + ")";
      });

  m.def("device_info", [](int device) { return cuda::device_info(device); },
        "what launch planning needs of a device (queried once, then cached)");
  // fused: the forward also writes the gradient. The device: an index (its DeviceInfo), or a DeviceInfo.
  m.def("plan", [](FUSEDCE_ARGS, bool fused, const DeviceInfo& d) { return cuda::plan(FUSEDCE_PARAMS, fused, d); });
  m.def("plan", [](FUSEDCE_ARGS, bool fused, int device) {
    return cuda::plan(FUSEDCE_PARAMS, fused, cuda::device_info(device));
  });
  m.def("workspace_floats", &cuda::workspace_floats,
        "floats of workspace a forward with this launch needs (rows, states: a shard's states, launch)");
  // grad_loss = 0: loss and lse only; otherwise also the gradient into dlogits (the fused mode). states != 0:
  // a shard's states instead (class_start, classes, target_mass: see struct Params).
  m.def("forward", [](FUSEDCE_ARGS, const Launch& l, int device, uintptr_t stream, uintptr_t loss, uintptr_t workspace) {
    Params p = FUSEDCE_PARAMS;
    p.loss = ptr<float>(loss);
    p.workspace = ptr<float>(workspace);
    cuda::forward(p, on(l, device, stream));
  });
  m.def("backward", [](FUSEDCE_ARGS, const Launch& l, int device, uintptr_t stream) {
    cuda::backward(FUSEDCE_PARAMS, on(l, device, stream));
  });
  m.def("scale", [](uintptr_t grad, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, uintptr_t scale,
                    int device, uintptr_t stream) {
    cuda::scale(ptr<void>(grad), dtype, rows, vocab, row_stride, ptr<const float>(scale), device, stream);
  });
}
