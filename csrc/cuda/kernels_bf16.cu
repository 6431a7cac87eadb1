// The kernels for __nv_bfloat16 logits (one file per dtype, so nvcc compiles them in parallel).
#include "kernels.cuh"

namespace fusedce {
namespace cuda {
FUSEDCE_INSTANTIATE(__nv_bfloat16)
}  // namespace cuda
}  // namespace fusedce
