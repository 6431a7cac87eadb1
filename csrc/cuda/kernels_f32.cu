// The kernels for float logits (one file per dtype, so nvcc compiles them in parallel).
#include "kernels.cuh"

namespace fusedce {
namespace cuda {
FUSEDCE_INSTANTIATE(float)
}  // namespace cuda
}  // namespace fusedce
