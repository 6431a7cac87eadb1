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
  float* workspace = nullptr;            // [rows, splits, 5] partial softmax states (Launch::splits > 1, states)
  // a vocabulary-parallel shard: its forward writes each row's state (m, s - 1, cx, k) of its columns, [rows, 4],
  // instead of loss and lse; its backward takes the global K, [rows]. Null for whole rows.
  float* states = nullptr;
  const float* target_mass = nullptr;
  // sizes and strides, in elements
  int64_t rows = 0, vocab = 0;
  // the columns are the global classes [class_start, class_start + vocab) of `classes` (0 and vocab: whole
  // rows); class-index targets are global ids, and a shard's target on another shard adds no term to it
  int64_t class_start = 0, classes = 0;
  int64_t logits_row_stride = 0, target_row_stride = 0, grad_stride = 0, dlogits_row_stride = 0;
  int dtype = kFloat32, target_dtype = kFloat32;
  // options
  int64_t ignore_index = -100;
  float label_smoothing = 0, z_loss = 0, softcap = 0;  // softcap 0 = off
};

// Host and device: the launch rules below are planned on the host (plan.cpp) and obeyed by the kernels.
#ifdef __CUDACC__
#define FUSEDCE_HOST_DEVICE __host__ __device__
#else
#define FUSEDCE_HOST_DEVICE
#endif

// How the rows are spread over the GPU; chosen by plan() (plan.cpp, which says why).
enum Layout : int {
  kWarpPerRow = 0,          // short rows: a warp per row, several rows per block
  kBlockPerRow = 1,         // long rows: a block per row (or per segment of a row, with splits > 1)
  kBlockPerRowCached = 2,   // fused mode, rows that fit in the block's registers: read from memory once
  kClusterRowCached = 3,    // fused mode, longer rows in the registers of a thread-block cluster (sm_90+):
                            // one segment per block, states merged through distributed shared memory
};

// The launch rules, written once: the planner picks layouts by them, check_launch() enforces them, the
// kernels are built for them, and fusedce._cuda exports them to Python (its tests).
constexpr int kWarpRowMaxBytes = 4096;  // up to here a warp per row: a block per row would leave most threads idle
constexpr int kBlockMaxThreads = 512;   // uncached rows: two or more blocks per SM overlap one's reduction with
                                        // another's loads
constexpr int kSegmentMinBytes = 16384;  // a split row's segments stay long enough to stream
// cached_row_kernel: 16-byte packs per thread, and threads per block (__launch_bounds__: 128 registers a
// thread), 128 KiB per block. 16 packs rather than 8 at 1024 threads: twice the elements a thread, so the
// per-row work (merging the states, the loss) weighs half as much per element, and the cache does not spill.
constexpr int kCachePacks = 16;
constexpr int kCachedThreads = 512;
constexpr int kMaxCluster = 8;  // blocks per cluster: the portable limit (more needs an opt-in per kernel)
constexpr int kStateFloats = 5;  // a softmax state (State in kernels.cuh) in the split-row workspace

// Elements per segment of a row cut into `parts` (blocks of a split row or of a cluster): a multiple of 8
// elements, so each segment keeps its row's 16-byte phase.
FUSEDCE_HOST_DEVICE inline int segment_length(int vocab, int parts) { return ((vocab + parts - 1) / parts + 7) / 8 * 8; }

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

// Per-row loss and lse; with p.grad_loss also the gradient (the fused mode). With p.states, a shard's states.
void forward(const Params& p, const Launch& l);
// dlogits from the lse of the forward.
void backward(const Params& p, const Launch& l);
// grad[rows, vocab] *= *scale, skipped on the device when *scale == 1.
void scale(void* grad, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, const float* scale, int device,
           uintptr_t stream);
// What launch planning needs of a device; no sync, safe under graph capture.
struct DeviceInfo {
  int sms = 0;
  int threads_per_sm = 0;  // resident threads per SM: 2048 on sm_80/90/100, 1536 on sm_86/89/120
  int regs_per_sm = 0;     // 32-bit registers per SM: 65536 on sm_80 to sm_120
  int64_t l2_bytes = 0;
  bool clusters = false;   // kClusterRowCached can run: an sm_90+ device, and cluster code built for it
  // registers a thread of the kernels use, as the CUDA runtime reports them for this device's code, by
  // dtype code (kFloat32, kFloat16, kBFloat16): the 16-byte row kernels (the most of their variants) and
  // the cached layouts' kernel
  int row_registers[3] = {64, 64, 64};
  int cached_registers[3] = {128, 128, 128};
};
// Queried once per device, then cached.
const DeviceInfo& device_info(int device);

// The kernels without the code of the rarer options serve the common case (see RowMath in kernels.cuh).
bool is_general(const Params& p);
// Whether every row of logits and dlogits starts at the same offset from a 16-byte boundary: the
// 16-byte kernels need it.
bool same_phase(const Params& p);
// The launch for p (fused: the forward also writes the gradient) on a device; see plan.cpp.
Launch plan(const Params& p, bool fused, const DeviceInfo& device);
// Floats of workspace a forward with this launch needs (0: none): the segments' states of split rows, and
// of every row for a shard's states (states: Params::states is set).
int64_t workspace_floats(int64_t rows, bool states, const Launch& l);
// Raises std::invalid_argument for a dtype code the kernels do not take (float32, float16, bfloat16).
void check_dtype(int dtype);
// Raises std::invalid_argument for a launch the kernels cannot run; called by forward() and backward().
void check_launch(const Params& p, const Launch& l, bool forward, bool fused);

}  // namespace cuda
}  // namespace fusedce
