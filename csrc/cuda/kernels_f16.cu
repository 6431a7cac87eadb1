// The kernels for __half logits (one file per dtype, so nvcc compiles them in parallel).
#include "kernels.cuh"

namespace fusedce {
namespace cuda {
FUSEDCE_INSTANTIATE(__half)
}  // namespace cuda
}  // namespace fusedce
