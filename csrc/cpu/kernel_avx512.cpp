// The kernels of kernel_impl.h for AVX-512 (Skylake-SP and newer).
#include "kernel_table.h"  // standard headers first: the pragma below must not retarget them
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FUSEDCE_ISA avx512
#define FUSEDCE_VEC_BYTES 64
#include "kernel_impl.h"
