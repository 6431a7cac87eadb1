// Arguments of the CUDA cross-entropy kernels. No torch and no CUDA header: the pybind11 module
// (module.cpp, compiled by the host compiler) fills these from plain integers that
// python/fusedce/backends/cuda.py passes, and the launchers (launch.cu) read them.
#pragma once
#include <cstdint>

#include "../dtypes.h"

namespace fusedce {
namespace cuda {

struct Params {
  // pointers (device memory)
  const void* logits = nullptr;          // [rows, vocab], unit stride along the vocabulary
  const int64_t* target_index = nullptr;  // [rows] class indices; null when the targets are probabilities
  const void* target_prob = nullptr;     // [rows, vocab] class probabilities (target_dtype)
  const float* weight = nullptr;         // [vocab] class weights, or null
  const float* weight_sum = nullptr;     // [] sum of the weights (class indices with weight and smoothing)
  float* loss = nullptr;                 // [rows] out (forward)
  float* lse = nullptr;                  // [rows] out (forward) or in (backward)
  const float* grad_loss = nullptr;      // [rows] any stride (backward); null: no gradient
  void* dlogits = nullptr;               // [rows, vocab] out in the logits dtype; may be the logits
  float* workspace = nullptr;            // [rows, splits, 5] partial softmax states (Launch::splits > 1)
  // sizes and strides, in elements
  int64_t rows = 0, vocab = 0;
  int64_t logits_row_stride = 0, target_row_stride = 0, grad_stride = 0, dlogits_row_stride = 0;
  int dtype = kFloat32, target_dtype = kFloat32;
  // options
  int64_t ignore_index = -100;
  float label_smoothing = 0, z_loss = 0, softcap = 0;  // softcap 0 = off
};

// How the rows are spread over the GPU; chosen by python/fusedce/backends/cuda.py (see there why).
enum Layout : int {
  kWarpPerRow = 0,          // short rows: a warp per row, several rows per block
  kBlockPerRow = 1,         // long rows: a block per row (or per segment of a row, with splits > 1)
  kBlockPerRowCached = 2,   // fused mode, rows that fit in the block's registers: read from memory once
  kClusterRowCached = 3,    // fused mode, longer rows in the registers of a thread-block cluster (sm_90+):
                            // one segment per block, states merged through distributed shared memory
};

struct Launch {
  int layout = kBlockPerRow;
  int threads = 256;        // threads per block
  int64_t blocks = 1;       // blocks along the rows; each loops over rows with a stride of the grid
  int splits = 1;           // segments per row: kBlockPerRow, so that few long rows still fill the GPU;
                            // kClusterRowCached, the blocks of a cluster (at most kMaxCluster)
  bool vectorized = true;   // 16-byte loads and stores (logits and dlogits rows share their alignment)
  int device = 0;
  uintptr_t stream = 0;     // cudaStream_t of torch.cuda.current_stream()
};

// Per-row loss and lse; with p.grad_loss also the gradient (the fused mode).
void forward(const Params& p, const Launch& l);
// dlogits from the lse of the forward.
void backward(const Params& p, const Launch& l);
// grad[rows, vocab] *= *scale, skipped on the device when *scale == 1.
void scale(void* grad, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, const float* scale, int device,
           uintptr_t stream);
// What launch planning needs of a device; no sync, safe under graph capture.
struct DeviceInfo {
  int sms;
  int threads_per_sm;  // resident threads per SM: 2048 on sm_80/90/100, 1536 on sm_86/89/120
  int regs_per_sm;     // 32-bit registers per SM: 65536 on sm_80 to sm_120
  int64_t l2_bytes;
  bool clusters;       // kClusterRowCached can run: an sm_90+ device, and cluster code built for it
};
DeviceInfo device_info(int device);

}  // namespace cuda
}  // namespace fusedce
