// The kernels of kernel_impl.h for any x86-64 CPU.
#include "kernel_table.h"  // standard headers first: the pragma below must not retarget them
// no target pragma: the x86-64 baseline (SSE2) the wheel is built for
#define FUSEDCE_ISA baseline
#define FUSEDCE_VEC_BYTES 16
#include "kernel_impl.h"
