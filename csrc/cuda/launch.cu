// Host side of the CUDA kernels: makes the tensors' device current, picks the kernels for the dtype
// and the options, launches them on the caller's stream and turns every CUDA error into an exception
// (RuntimeError in Python). No allocation and no synchronisation, so the calls can be captured in a
// CUDA graph; the split-row workspace comes from the caller.
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels.cuh"

namespace fusedce {
namespace cuda {

FUSEDCE_DECLARE(float)
FUSEDCE_DECLARE(__half)
FUSEDCE_DECLARE(__nv_bfloat16)

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fusedce CUDA kernels: ") + what + " failed: " + cudaGetErrorName(status) +
                             ": " + cudaGetErrorString(status));
}

// Makes `device` current for the call, as torch's device guard does, and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ == device)
      previous_ = -1;
    else
      check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {
  check_dtype(dtype);
  switch (dtype) {
    case kFloat16: return fn(__half());
    case kBFloat16: return fn(__nv_bfloat16());
    default: return fn(float());
  }
}

// Whether kClusterRowCached can run on `device` (the current one): cluster launches, and cluster code
// built for it. Cached per device: forward() asks on every cluster launch.
bool clusters_run(int device) {
  static std::atomic<signed char> known[64];  // 0: not asked yet, 1: no, 2: yes
  if (device >= 0 && device < 64 && known[device] != 0) return known[device] == 2;
  int cluster_launch = 0;
  check(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device), "cudaDeviceGetAttribute");
  bool runs = false;
  if (cluster_launch && cluster_code_runs<float>(&runs) != cudaSuccess) {
    cudaGetLastError();  // no code for this device at all: not an error of this query's caller
    runs = false;
  }
  if (device >= 0 && device < 64) known[device] = runs ? 2 : 1;
  return runs;
}

}  // namespace

void forward(const Params& p, const Launch& l) {
  if (p.rows == 0) return;
  const bool fused = p.grad_loss != nullptr;
  check_launch(p, l, true, fused);
  DeviceGuard guard(l.device);
  if (l.layout == kClusterRowCached && !clusters_run(l.device))
    throw std::invalid_argument("fusedce CUDA kernels: the cluster layout needs an sm_90+ GPU and fusedce built "
                                "for it (FUSEDCE_CUDA_ARCHS with 90 or later)");
  const auto stream = reinterpret_cast<cudaStream_t>(l.stream);
  const bool general = is_general(p);
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // segment states (or a shard's row states), merged per row, then (fused) the gradient
    if ((l.layout == kBlockPerRow && l.splits > 1) || p.states) {
      launch_rows<T>(p, l, kPartial, stream, general);
      check(cudaGetLastError(), "launching the split-row forward kernel");
      launch_finalize<T>(p, l.splits, stream, general);
      check(cudaGetLastError(), "launching the split-row finalize kernel");
      if (fused) launch_rows<T>(p, l, kBackward, stream, general);
    } else {
      launch_rows<T>(p, l, kForward | (fused ? kBackward : 0), stream, general);
    }
    check(cudaGetLastError(), fused ? "launching the fused forward-with-gradient kernel" : "launching the forward kernel");
  });
}

void backward(const Params& p, const Launch& l) {
  if (p.rows == 0) return;
  check_launch(p, l, false, false);
  DeviceGuard guard(l.device);
  const auto stream = reinterpret_cast<cudaStream_t>(l.stream);
  by_dtype(p.dtype, [&](auto tag) { launch_rows<decltype(tag)>(p, l, kBackward, stream, is_general(p)); });
  check(cudaGetLastError(), "launching the backward kernel");
}

void scale(void* grad, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, const float* scale, int device,
           uintptr_t stream) {
  if (rows == 0 || vocab == 0) return;
  check_dtype(dtype);
  DeviceGuard guard(device);
  by_dtype(dtype, [&](auto tag) {
    launch_scale<decltype(tag)>(grad, rows, vocab, row_stride, scale, reinterpret_cast<cudaStream_t>(stream));
  });
  check(cudaGetLastError(), "launching the gradient scale kernel");
}

namespace {

DeviceInfo query_device(int device) {
  DeviceInfo info;
  int l2 = 0;
  check(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&info.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device),
        "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&info.regs_per_sm, cudaDevAttrMaxRegistersPerMultiprocessor, device),
        "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute");
  info.l2_bytes = l2;
  DeviceGuard guard(device);  // a kernel's attributes are those of the code loaded for the current device
  info.clusters = clusters_run(device);
  check(kernel_registers<float>(&info.row_registers[kFloat32], &info.cached_registers[kFloat32]),
        "cudaFuncGetAttributes");
  check(kernel_registers<__half>(&info.row_registers[kFloat16], &info.cached_registers[kFloat16]),
        "cudaFuncGetAttributes");
  check(kernel_registers<__nv_bfloat16>(&info.row_registers[kBFloat16], &info.cached_registers[kBFloat16]),
        "cudaFuncGetAttributes");
  return info;
}

}  // namespace

const DeviceInfo& device_info(int device) {
  constexpr int kDevices = 64;
  static std::once_flag once[kDevices];
  static DeviceInfo info[kDevices];
  if (device < 0 || device >= kDevices) throw std::invalid_argument("fusedce CUDA kernels: device index out of range");
  std::call_once(once[device], [&] { info[device] = query_device(device); });  // an exception: asked again next time
  return info[device];
}

}  // namespace cuda
}  // namespace fusedce
