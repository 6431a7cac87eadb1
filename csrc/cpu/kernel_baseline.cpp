// The kernels of kernel_impl.h for any CPU: on x86-64 the baseline (SSE2) the wheel is built for,
// elsewhere 16-byte vectors of the target's own (NEON on aarch64), or scalar code where it has none.
#include "kernel_table.h"  // standard headers first, as in the other kernel_<isa>.cpp
#define FUSEDCE_ISA baseline
#define FUSEDCE_VEC_BYTES 16
#include "kernel_impl.h"
