// One set of row kernels per instruction set (kernel_<isa>.cpp); dispatch.cpp picks one at run time.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernel_args.h"
#include "platform.h"

namespace fusedce {

struct KernelTable {
  const char* isa;
  void (*forward_rows)(const CrossEntropyArgs&, const ForwardOut&, const BackwardIO* grad, int64_t begin,
                       int64_t end);
  void (*backward_rows)(const CrossEntropyArgs&, const BackwardIO&, int64_t begin, int64_t end);
};

// baseline: SSE2 on x86-64, the target's own vectors elsewhere (NEON on aarch64)
extern const KernelTable kTable_baseline;
#if FUSEDCE_X86
extern const KernelTable kTable_avx512, kTable_avx2;
#endif

}  // namespace fusedce
