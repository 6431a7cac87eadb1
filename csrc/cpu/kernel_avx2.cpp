// The kernels of kernel_impl.h for AVX2 + FMA + F16C (Haswell and newer); x86-64 only.
#include "kernel_table.h"  // standard headers first: the target below must not retarget them
#if FUSEDCE_X86
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define FUSEDCE_ISA avx2
#define FUSEDCE_VEC_BYTES 32
#include "kernel_impl.h"
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif
