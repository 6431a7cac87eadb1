// The kernels of kernel_impl.h for AVX2 + FMA + F16C (Haswell and newer).
#include "kernel_table.h"  // standard headers first: the pragma below must not retarget them
#pragma GCC target("avx2,fma,f16c")
#define FUSEDCE_ISA avx2
#define FUSEDCE_VEC_BYTES 32
#include "kernel_impl.h"
