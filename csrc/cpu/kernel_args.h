// Arguments of the CPU cross-entropy kernels. No torch header: Python owns the tensors and passes
// raw pointers, sizes and strides (see python/fusedce/_native.py, the one place that declares them).
#pragma once
#include <cstdint>

#include "../dtypes.h"

namespace fusedce {

// What the forward makes of the per-row losses.
enum Reduction : int { kNone = 0, kSum = 1, kMean = 2 };

struct CrossEntropyArgs {
  // logits: rows x vocab, unit stride along the vocabulary
  const void* logits = nullptr;
  int64_t logits_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;
  int dtype = kFloat32;
  // targets: class indices (int64, one per row) or class probabilities (rows x vocab)
  const int64_t* target_index = nullptr;  // null when the targets are probabilities
  const void* target_prob = nullptr;
  int64_t target_row_stride = 0;
  int target_dtype = kFloat32;
  // optional class weight: vocab entries in the accumulation type (double for fp64 logits, else float)
  const void* weight = nullptr;
  double weight_sum = 0;  // sum of the class weights (vocab when there are none); set by the dispatcher
  // vocabulary-parallel shard: the columns are the global classes [class_start, class_start + vocab) of
  // `classes`; class-index targets are global ids (one outside the shard adds no term here). A whole row:
  // 0 and vocab.
  int64_t class_start = 0;
  int64_t classes = 0;
  // options
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  double z_loss = 0;
  double softcap = 0;  // 0 = off
};

// Per-row outputs are in the accumulation type: double for fp64 logits, float otherwise.
struct ForwardOut {
  void* loss;          // kNone: rows; kSum / kMean: one element in loss_dtype
  void* lse;           // rows, or null when not wanted
  int reduction = kNone;
  int loss_dtype = kFloat32;
  // rows x 4 (m, s - 1, cx, k): a shard's softmax states instead of loss and lse (see forward_row)
  void* states = nullptr;
};

struct BackwardIO {
  // rows, any stride (0 when the loss was summed or averaged); null in a reduced forward: the gradient
  // of the reduced loss (1 per row for kSum, 1 / the mean's denominator for kMean)
  const void* grad_loss;
  int64_t grad_stride;
  const void* lse;        // rows, from the forward
  void* dlogits;          // rows x vocab in the logits dtype, unit stride along the vocabulary
  int64_t dlogits_row_stride;
  bool streaming = false;  // non-temporal stores for dlogits; set by the dispatcher (see with_store_mode)
  // rows: the global target mass k = sum of c_j over every shard (a shard's backward); null: from the row
  const void* target_mass = nullptr;
};

}  // namespace fusedce
